"""systemd's sd_notify, without libsystemd: one datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("shardudp.notify")


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) if we run under a notify-aware manager."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify %s to %s failed: %s", state, path, exc)
        return False
    return True
