"""Ready-made shardudp apps (Twisted DatagramProtocols)."""
