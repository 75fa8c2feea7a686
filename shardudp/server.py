"""The server: the master plus what is attached to it (metrics, control)."""

from __future__ import annotations

from .master import Master


class Server(Master):
    pass
