"""Connected UDP, from Twisted's UDP how-to, in Python 3.

As the APP on port 0 each worker gets a private socket it may connect():

    HELLOER_HOST=127.0.0.1 HELLOER_PORT=1234 \
        shardudp run helloer --bind 127.0.0.1:0 --workers 2

(``helloer`` is short for shardudp.workers.helloer:Helloer.)

The upstream address comes from the environment (the how-to hard-codes it).
"""

import os

from twisted.internet.protocol import DatagramProtocol


class Helloer(DatagramProtocol):
    def startProtocol(self):
        host = os.environ.get("HELLOER_HOST", "127.0.0.1")
        port = int(os.environ.get("HELLOER_PORT", "1234"))
        self.transport.connect(host, port)
        print(f"now we can only send to host {host} port {port}", flush=True)
        self.transport.write(b"hello")  # no need for address

    def datagramReceived(self, data, addr):
        host, port = addr
        print(f"received {data!r} from {host}:{port}", flush=True)

    # Possibly invoked if there is no server listening on the
    # address to which we are sending.
    def connectionRefused(self):
        print("No one listening", flush=True)


class OpensHelloer(DatagramProtocol):
    """Echo that also opens a client socket from inside the worker, as in the how-to."""

    def startProtocol(self):
        from twisted.internet import reactor

        reactor.listenUDP(0, Helloer())

    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)
