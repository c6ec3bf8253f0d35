"""`meshsup capture`: the node's packets to a pcap file, as Tailscale's capture hook feeds Wireshark.

How packets get from the crypto workers to the file: the CLI listens on a
unix seqpacket socket of its own in the node's runtime dir (root's alone)
and asks the supervisor to start the capture; the supervisor asks every
crypto worker (a Command, `fan_out`), and each worker sends what it sees as
CaptureBatch messages straight to that socket, stamped with its own clock
(actors.crypto.capture says which packets). No actor relays them: a capture
adds no hop and no load to the supervisor's loop. The worker's send never
waits: when this reader falls behind, the socket's buffer fills and the
worker drops and counts (reported at the end), so a capture can lose
packets but never slow the dataplane.

A capture is a lease: the CLI renews it every second, and a worker whose
lease runs out (the CLI was killed) stops on its own. Renewing also starts
the capture on workers that restarted or were added since. It stops on
--count, --seconds, Ctrl-C or SIGTERM; the last request stops the workers
and collects their counts.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import IO, Any

from meshsup.actors.bus import batch
from meshsup.actors.bus.codec import DecodeError, decode
from meshsup.actors.bus.datapath import MAX_MESSAGE
from meshsup.actors.bus.endpoints import Runtime
from meshsup.actors.bus.messages import Ack, CaptureBatch, CaptureKeys, Command
from meshsup.actors.kernel.files import UnsafePath
from meshsup.actors.wire import pcap
from meshsup.supervisor.control import NotRunning, call

LEASE = 5.0  # seconds a worker keeps capturing without hearing from the CLI
RENEW = 1.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-w", dest="write", required=True, metavar="FILE.pcap", help="the pcap file to write (-: stdout)")
    p.add_argument("--peer", help="only this peer's traffic (its name or public key)")
    until = p.add_mutually_exclusive_group()
    until.add_argument("--count", type=int, help="stop after N packets")
    until.add_argument("--seconds", type=float, help="stop after S seconds")
    p.add_argument("--outer", action="store_true", help="the encrypted WireGuard datagrams, not the packets inside")
    p.add_argument("--keylog", metavar="FILE", help="write session keys for tshark (wg.keylog_file), mode 0600")


def fan_out(hub: Any, workers: list[str], args: dict[str, Any], reply: Callable[..., None]) -> None:
    """The supervisor's part: `args` to every crypto worker; one reply once all answered (or timed out)."""
    if not workers:
        reply(False, "no crypto workers")
        return
    acks: dict[str, Ack | None] = {}

    def done(name: str, ack: Ack | None) -> None:
        acks[name] = ack
        if len(acks) < len(workers):
            return
        errors = {n: (a.error if a is not None else "did not answer") for n, a in acks.items() if a is None or not a.ok}
        counts = {n: a.result for n, a in acks.items() if a is not None and a.ok}
        reply(not errors, "; ".join(f"{n}: {e}" for n, e in sorted(errors.items())), {"workers": counts})

    for name in workers:
        hub.request(name, lambda req: Command(req=req, op="capture", args=dict(args)), partial(done, name))


def peer_key(peers: list[dict[str, Any]], target: str) -> str:
    """The public key of the peer named `target` (or whose key it is); ValueError if none."""
    for p in peers:
        if target in (p["name"], p["public_key"]):
            return str(p["public_key"])
    names = ", ".join(p["name"] for p in peers) or "none"
    raise ValueError(f"no peer {target!r} (peers: {names})")


class Writer:
    """Batches from the workers into the pcap file (and key lines into the key log)."""

    def __init__(self, out: IO[bytes], keys: IO[str] | None, count: int | None) -> None:
        self.out, self.keys, self.count = out, keys, count
        self.written = 0
        self.bad = 0  # messages that were not a capture's
        out.write(pcap.file_header())

    @property
    def done(self) -> bool:
        return self.count is not None and self.written >= self.count

    def take(self, frame: bytes) -> None:
        try:
            msg = decode(frame)
            if isinstance(msg, CaptureBatch):
                packets = batch.unpack(msg.packets)
                if self.count is not None:
                    packets = packets[: self.count - self.written]
                self.out.write(pcap.records(msg.ts, packets))
                self.written += len(packets)
            elif isinstance(msg, CaptureKeys) and self.keys is not None:
                self.keys.write("".join(line + "\n" for line in msg.lines))
            else:
                self.bad += 1
        except DecodeError:
            self.bad += 1

    def flush(self) -> None:
        self.out.flush()
        if self.keys is not None:
            self.keys.flush()


class Listener:
    """The socket the workers send to, and their connections."""

    def __init__(self, path: Path, take: Callable[[bytes], None]) -> None:
        self.path, self.take = path, take
        self.selector = selectors.DefaultSelector()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        path.unlink(missing_ok=True)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)
        self.sock.listen(64)
        self.selector.register(self.sock, selectors.EVENT_READ)

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(max(0.0, timeout)):
            if key.fileobj is self.sock:
                self._accept()
            else:
                self._drain(key.fileobj)  # type: ignore[arg-type]

    def drain(self) -> None:
        """What the workers queued before they stopped."""
        self._accept()
        for key in list(self.selector.get_map().values()):
            if key.fileobj is not self.sock:
                self._drain(key.fileobj, budget=1 << 30)  # type: ignore[arg-type]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            self.selector.register(conn, selectors.EVENT_READ)

    def _drain(self, conn: socket.socket, budget: int = 256) -> None:
        """Read what is ready, bounded: a busy worker must not keep the lease from being renewed."""
        for _ in range(budget):
            try:
                frame = conn.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                frame = b""
            if not frame:  # the worker stopped or went away
                self.selector.unregister(conn)
                conn.close()
                return
            self.take(frame)

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()
        self.path.unlink(missing_ok=True)


def _open_keylog(path: str) -> IO[str]:
    """Root's alone (0600), even where the file was there before; never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "w")


def _remove_stale(run: Path) -> None:
    """Sockets of captures whose CLI was killed."""
    for old in run.glob("pc*.sock"):
        pid = Runtime.capture_pid(old)
        if pid is None:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            old.unlink(missing_ok=True)
        except PermissionError:
            pass


def run(args: argparse.Namespace, runtime: Runtime) -> int:
    try:
        return _capture(args, runtime)
    except (NotRunning, UnsafePath, OSError) as err:
        print(f"meshsup: capture: {err}", file=sys.stderr)
        return 1


def _capture(args: argparse.Namespace, runtime: Runtime) -> int:
    if (args.count is not None and args.count < 1) or (args.seconds is not None and args.seconds <= 0):
        print("meshsup: capture: --count and --seconds must be positive", file=sys.stderr)
        return 2
    status = call(runtime, "status")
    peer = ""
    if args.peer:
        try:
            peer = peer_key(status.result.get("peers", []), args.peer)
        except ValueError as err:
            print(f"meshsup: capture: {err}", file=sys.stderr)
            return 2
    _remove_stale(runtime.dir)
    path = runtime.dir.resolve() / runtime.capture(os.getpid()).name
    request = {"socket": str(path), "peer": peer, "outer": args.outer, "keylog": bool(args.keylog), "lease": LEASE}
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stop.append(signum))
    keys = _open_keylog(args.keylog) if args.keylog else None
    to_stdout = args.write == "-"  # for a pipe into tshark or wireshark -k -i -
    with nullcontext(sys.stdout.buffer) if to_stdout else open(args.write, "wb") as out, keys or nullcontext():
        writer = Writer(out, keys, args.count)
        listener = Listener(path, writer.take)
        try:
            reply = call(runtime, "capture", request)
            if not reply.ok:  # the workers that took it let it go at once, not when the lease ends
                print(f"meshsup: capture: {reply.error}", file=sys.stderr)
                call(runtime, "capture", {**request, "stop": True})
                return 1
            print(f"capturing {'WireGuard datagrams' if args.outer else 'packets'} to {args.write}", file=sys.stderr)
            now = time.monotonic()
            deadline = now + args.seconds if args.seconds is not None else float("inf")
            renew = now + RENEW
            while not stop and not writer.done and now < deadline:
                listener.poll(min(renew, deadline) - now)
                writer.flush()
                now = time.monotonic()
                if now >= renew:
                    renew = now + RENEW
                    reply = call(runtime, "capture", request)
                    if not reply.ok:  # a worker restarting: the next renewal starts it again
                        print(f"meshsup: capture: {reply.error}", file=sys.stderr)
            final = call(runtime, "capture", {**request, "stop": True})
            listener.drain()
            writer.flush()
        finally:
            listener.close()
    dropped = sum(w.get("dropped", 0) for w in final.result.get("workers", {}).values())
    print(f"{writer.written} packets captured", file=sys.stderr)
    print(f"{dropped} packets dropped by meshsup (the capture fell behind)", file=sys.stderr)
    return 0
