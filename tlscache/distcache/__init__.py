"""distcache: the wire protocol, session table, server, clients, proxy and snoop.

The protocol logic is sans-IO (bytes and a clock in, bytes and values out, no
sockets, event loops or logging), so that it is tested without a network and
every I/O shell stays thin. :data:`SANS_IO_MODULES` names those modules;
tests/distcache/test_sansio.py holds each of them to it.
"""

from typing import Final

#: Modules that must not import socket, asyncio, selectors or logging.
SANS_IO_MODULES: Final = (
    "tlscache.distcache.protocol",
    "tlscache.distcache.address",
    "tlscache.distcache.table",
    "tlscache.distcache.serverconn",
    "tlscache.distcache.clientconn",
    "tlscache.distcache.multiplexer",
    "tlscache.distcache.analyser",
    "tlscache.deadline",
)
