"""The IO half: maps and programs with the bpf() system call, a program attached to a TUN.

No libbpf: ``bpf(BPF_MAP_CREATE)``, ``bpf(BPF_PROG_LOAD)`` and the map element
commands through ctypes with a hand-packed ``union bpf_attr``, and the TUN's
own ioctl to attach. Needs CAP_BPF (root) for maps and for programs longer
than 4096 instructions, CAP_BPF and CAP_NET_ADMIN for a traffic-control
program, and CAP_NET_ADMIN on the TUN.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import re
import struct
from typing import Final

_SYS_BPF: Final = {"x86_64": 321, "aarch64": 280}
BPF_MAP_CREATE: Final = 0
BPF_MAP_LOOKUP_ELEM: Final = 1
BPF_MAP_UPDATE_ELEM: Final = 2
BPF_MAP_DELETE_ELEM: Final = 3
BPF_PROG_LOAD: Final = 5
BPF_PROG_TEST_RUN: Final = 10
BPF_PROG_TYPE_SOCKET_FILTER: Final = 1
BPF_PROG_TYPE_SCHED_CLS: Final = 3
BPF_MAP_TYPE_LPM_TRIE: Final = 11
BPF_F_NO_PREALLOC: Final = 1  # which an LPM trie requires: its nodes are allocated as they are added
BPF_ANY: Final = 0  # an update creates the element or replaces its value
# _IOR('T', 224, int) from <linux/if_tun.h>: the argument points to a program
# fd, or to -1 to detach.
TUNSETSTEERINGEBPF: Final = 0x800454E0

# The MAP_CREATE head of union bpf_attr: map_type, key_size, value_size,
# max_entries, map_flags, inner_map_fd, numa_node, map_name[16].
_MAP_CREATE: Final = struct.Struct("<IIIIIII16s")
# The element commands': map_fd, padding, key, value, flags.
_MAP_ELEM: Final = struct.Struct("<IIQQQ")
# The PROG_LOAD head of union bpf_attr: prog_type, insn_cnt, insns, license,
# log_level, log_size, log_buf, kern_version, prog_flags, prog_name[16]. The
# rest stays zero, which the kernel requires of fields it does not expect.
_PROG_LOAD: Final = struct.Struct("<IIQQIIQII16s")
# The PROG_TEST_RUN head: prog_fd, retval, data_size_in, data_size_out,
# data_in, data_out, repeat.
_TEST_RUN: Final = struct.Struct("<IIIIQQI")
_ATTR_SIZE: Final = 128
# The kernel's test run pulls an ethernet header off the data (eth_type_trans)
# before the program sees it. Its ethertype is the local experimental one:
# with IPv4's or IPv6's the kernel would refuse packets shorter than their
# header, which are just what a steering program must survive.
_TEST_RUN_ETHERNET: Final = b"\0" * 12 + struct.pack("!H", 0x88B5)
_LOG_SIZE: Final = 64 * 1024
_LOG_TAIL_LINES: Final = 12
_INSN_SIZE: Final = 8
# The kernel's bpf_obj_name_cpy() rules.
_NAME: Final = re.compile(r"[A-Za-z0-9_.]{0,15}")

_libc = ctypes.CDLL(None, use_errno=True)


def _sys_bpf() -> int:
    machine = platform.machine()
    if machine not in _SYS_BPF:
        raise OSError(errno.ENOSYS, f"bpf() syscall number unknown on {machine}")
    return _SYS_BPF[machine]


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    """bpf(cmd, attr): its result, or -1 with ctypes' errno set."""
    return int(_libc.syscall(ctypes.c_long(_sys_bpf()), ctypes.c_long(cmd), attr, ctypes.c_uint(len(attr))))


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid name {name!r}: up to 15 of [A-Za-z0-9_.]")


def _refused(what: str) -> OSError:
    """The OSError for a bpf() call that just failed, from ctypes' errno."""
    err = ctypes.get_errno()
    return OSError(err, f"bpf({what}): {os.strerror(err)}")


def create_lpm_trie(key_size: int, value_size: int, max_entries: int, name: str) -> int:
    """A BPF_MAP_TYPE_LPM_TRIE map: keys are a u32 prefix length (host order)
    then ``key_size - 4`` address bytes (network order); a lookup of a full-length
    key finds the longest prefix holding it. Entries take memory only as they
    are added, up to ``max_entries``. Returns the map fd (close-on-exec), which
    the caller closes; OSError if the kernel refuses."""
    _check_name(name)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _MAP_CREATE.pack_into(
        attr, 0, BPF_MAP_TYPE_LPM_TRIE, key_size, value_size, max_entries, BPF_F_NO_PREALLOC, 0, 0, name.encode()
    )
    fd = _bpf(BPF_MAP_CREATE, attr)
    if fd < 0:
        raise _refused(f"BPF_MAP_CREATE {name!r}")
    return fd


def _map_elem(cmd: int, map_fd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None) -> int:
    key_buf = ctypes.create_string_buffer(key, len(key))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    value_at = 0 if value is None else ctypes.addressof(value)
    _MAP_ELEM.pack_into(attr, 0, map_fd, 0, ctypes.addressof(key_buf), value_at, BPF_ANY)
    return _bpf(cmd, attr)


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    """Set ``key``'s value (added or replaced); OSError if the kernel refuses
    (a key or value of the wrong size, a full map)."""
    if _map_elem(BPF_MAP_UPDATE_ELEM, map_fd, key, ctypes.create_string_buffer(value, len(value))) < 0:
        raise _refused("BPF_MAP_UPDATE_ELEM")


def map_delete(map_fd: int, key: bytes) -> None:
    """Remove ``key``; OSError if the kernel refuses (ENOENT: no such key)."""
    if _map_elem(BPF_MAP_DELETE_ELEM, map_fd, key, None) < 0:
        raise _refused("BPF_MAP_DELETE_ELEM")


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """``key``'s value as the kernel looks it up (for an LPM trie: the longest
    prefix holding the key's address), None if there is none."""
    value = ctypes.create_string_buffer(value_size)
    if _map_elem(BPF_MAP_LOOKUP_ELEM, map_fd, key, value) < 0:
        if ctypes.get_errno() == errno.ENOENT:
            return None
        raise _refused("BPF_MAP_LOOKUP_ELEM")
    return value.raw


def _prog_load(insns: bytes, name: str, prog_type: int, log: ctypes.Array[ctypes.c_char] | None) -> int:
    """One BPF_PROG_LOAD: the new fd, or -1 with ctypes' errno set."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _PROG_LOAD.pack_into(
        attr,
        0,
        prog_type,
        len(insns) // _INSN_SIZE,
        ctypes.addressof(code),
        ctypes.addressof(license),
        1 if log is not None else 0,
        len(log) if log is not None else 0,
        ctypes.addressof(log) if log is not None else 0,
        0,
        0,
        name.encode(),
    )
    return _bpf(BPF_PROG_LOAD, attr)


def load_socket_filter(insns: bytes, name: str) -> int:
    """``load_program`` as a BPF_PROG_TYPE_SOCKET_FILTER."""
    return load_program(insns, name, BPF_PROG_TYPE_SOCKET_FILTER)


def load_program(insns: bytes, name: str, prog_type: int) -> int:
    """Load ``insns`` (raw struct bpf_insn) as a program of ``prog_type``
    called ``name``; returns the program fd (close-on-exec), which the caller
    closes. Raises ValueError for a malformed program or name, OSError when
    the kernel refuses, its message ending with the verifier log's last lines.
    """
    if not insns or len(insns) % _INSN_SIZE:
        raise ValueError(f"{len(insns)} bytes is not a whole, non-empty number of instructions")
    _check_name(name)
    fd = _prog_load(insns, name, prog_type, None)
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    # Loaded again with a log only on failure, as libbpf does: a log that
    # overflows makes the kernel fail even a sound program with ENOSPC, and
    # the log of a long program overflows 64 KiB.
    log = ctypes.create_string_buffer(_LOG_SIZE)
    fd = _prog_load(insns, name, prog_type, log)
    if fd >= 0:
        return fd
    tail = log.value.decode(errors="replace").rstrip().splitlines()[-_LOG_TAIL_LINES:]
    raise OSError(err, f"bpf(BPF_PROG_LOAD) refused {name!r}: {os.strerror(err)}\n" + "\n".join(tail))


def run_on_packet(prog_fd: int, packet: bytes) -> int:
    """What the socket filter ``prog_fd`` returns for the L3 ``packet``, run
    once by the kernel (BPF_PROG_TEST_RUN) without sending anything: the full
    32-bit value, before the TUN cuts it to 16 bits and takes it modulo its
    queue count. Raises OSError if the kernel refuses."""
    data = _TEST_RUN_ETHERNET + packet
    data_in = ctypes.create_string_buffer(data, len(data))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _TEST_RUN.pack_into(attr, 0, prog_fd, 0, len(data), 0, ctypes.addressof(data_in), 0, 1)
    if _bpf(BPF_PROG_TEST_RUN, attr) < 0:
        raise _refused("BPF_PROG_TEST_RUN")
    return int(_TEST_RUN.unpack_from(attr)[1])


def attach_steering(tun_fd: int, prog_fd: int) -> None:
    """Make the program ``prog_fd`` choose the queue of every packet the
    kernel sends into the TUN ``tun_fd`` (an attached queue of it). The TUN
    holds its own reference: ``prog_fd`` may be closed afterwards."""
    fcntl.ioctl(tun_fd, TUNSETSTEERINGEBPF, struct.pack("i", prog_fd))


def detach_steering(tun_fd: int) -> None:
    """Give queue selection back to the kernel (its flow hash)."""
    attach_steering(tun_fd, -1)
