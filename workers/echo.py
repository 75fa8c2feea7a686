"""The echo server from Twisted's UDP how-to, in Python 3.

Run it on every core:  shardudp run echo --bind 0.0.0.0:9999
(``echo`` is short for shardudp.workers.echo:Echo)
"""

from twisted.internet.protocol import DatagramProtocol


class Echo(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)
