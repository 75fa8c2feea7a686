"""Ready-made shardudp apps (Twisted DatagramProtocols).

Installed as ``shardudp.workers`` (this folder maps to that package, see
pyproject.toml), so it never shadows a user's own ``workers`` package. Each has
a short name (``shardudp run echo``), declared in ``shardudp.readymade``.
"""
