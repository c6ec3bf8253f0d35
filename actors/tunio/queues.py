"""One TUN's queue steering: the fixed program (bpf.steering) attached, and its two LPM maps.

The maps hold prefix -> crypto worker; ``held`` mirrors them, so that setting a
prefix to what it already holds costs no system call, and tun-io writes only
the prefixes a change touched.
"""

from __future__ import annotations

import os
from typing import Final

from meshsup.actors.routing.allowedips import Network
from meshsup.bpf import steering
from meshsup.bpf.syscall import attach_steering, create_lpm_trie, load_socket_filter, map_delete, map_update

# Room for a million prefixes of each IP version: an LPM trie allocates its
# entries as they are added, so room costs nothing until used.
MAX_PREFIXES: Final = 1 << 20


class QueueSteering:
    def __init__(self, tun_fd: int, default: int) -> None:
        """Make the maps, load the program and attach it to the TUN ``tun_fd``
        (any queue of it); unmatched packets go to worker ``default``. OSError
        if the kernel refuses (no CAP_BPF, an old kernel), with nothing left open."""
        self.maps: dict[int, int] = {}  # IP version -> map fd
        self.program = -1  # kept open: what a test run (bpf.syscall.run_on_packet) runs
        self.held: dict[Network, int] = {}
        try:
            for version in (4, 6):
                size = steering.KEY_SIZE[version]
                self.maps[version] = create_lpm_trie(size, steering.VALUE_SIZE, MAX_PREFIXES, f"meshsup_dst{version}")
            self.program = load_socket_filter(steering.program(self.maps[4], self.maps[6], default), "meshsup_steer")
            attach_steering(tun_fd, self.program)
        except BaseException:
            self.close()
            raise

    def set(self, network: Network, worker: int | None) -> bool:
        """Steer ``network``'s destinations to ``worker`` (None: remove it, so a
        shorter prefix or the default decides); whether the maps changed.
        OSError or ValueError if the write is refused: ``held`` keeps the old
        value, so the next change of that prefix tries again."""
        if self.held.get(network) == worker:
            return False
        fd = self.maps[network.version]
        if worker is None:
            map_delete(fd, steering.key(network))
            del self.held[network]
        else:
            map_update(fd, steering.key(network), steering.value(worker))
            self.held[network] = worker
        return True

    def close(self) -> None:
        """Close the fds; the TUN keeps the attached program, and the program its maps, until detached."""
        for fd in [*self.maps.values(), self.program]:
            if fd >= 0:
                os.close(fd)
        self.maps, self.program = {}, -1
