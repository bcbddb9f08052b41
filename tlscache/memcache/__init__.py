"""memcached's meta protocol: a sans-IO codec (``protocol``) and a blocking connection.

Why our own codec rather than pymemcache. pymemcache 4.0 has no meta commands, so its only
atomic take is ``gets`` + ``cas(key, b"", cas, expire=1)``: it leaves an empty item behind
for a second instead of deleting, and every reader must treat "empty" as a miss. The meta
protocol's ``mg <key> v c`` + ``md <key> C<cas>`` deletes for real, and only the caller
whose delete answers ``HD`` wins. pymemcache's thread-safe group client (``HashClient``
with pooling) also has no per-call deadline and hashes keys in pure Python.

Measured here (``python -m bench.memcached_bench``: one memcached 1.6.18 on 127.0.0.1,
one thread, 256-byte values, 5,000 operations a phase, 2 vCPUs shared with other work,
load average 8-9; ranges of three runs), operations per second and this process's CPU
time per operation:

=========================  ===============  ===============  ===============
client                     store            fetch            take
=========================  ===============  ===============  ===============
meta (``MemcachedStore``)  17,200-25,900/s  19,000-28,400/s  10,800-12,000/s
                           25-40 us         24-37 us         52-63 us
pymemcache ``Client``      16,400-30,800/s  25,200-33,900/s  10,100-17,700/s
                           19-21 us         17-22 us         33-48 us
pymemcache ``HashClient``  13,400-15,900/s  10,100-13,800/s   6,300-7,300/s
                           47-57 us         57-59 us         85-124 us
=========================  ===============  ===============  ===============

pymemcache's bare ``Client`` (one connection, not thread-safe, no placement, no deadline)
spends 5 to 15 us less CPU per call than the store; ``HashClient``, the pymemcache client
that does what the store does (a group of servers, pooled connections for threads), spends
twice as much. The store keeps its own codec: about ``HashClient``'s cost halved, a deadline
on every step, and a take that really deletes.
"""

from typing import Final

#: Modules that must not import socket, asyncio, selectors or logging.
SANS_IO_MODULES: Final = ("tlscache.memcache.protocol",)
