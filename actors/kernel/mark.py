"""The firewall mark (SO_MARK) on the node's own underlay sockets: with an exit
node in use, policy routing sends what carries it by the underlay, never into
the tunnel (as wg-quick's fwmark). Setting one needs CAP_NET_ADMIN."""

from __future__ import annotations

import socket


def set_mark(sock: socket.socket, mark: int) -> None:
    """Mark what ``sock`` sends (0: unmarked). Raises OSError without the capability."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
