"""The handshake bench's TLS server (``tlscache_farm.tlsserver``) over any store string.

    python -m bench.spec_tlsserver --store dc:STORE ...   (STORE as open_store takes it)

``tlscache_farm.tlsserver`` opens ``--store dc:ADDRESS`` as a DistcacheStore; here the part
after ``dc:`` is a store string instead (``memcached:...``, ``redis://...``,
``redis-cluster://...``, ``distcache:...``), so that every store is measured by the same
server, connection handling and per-connection report.
"""

from __future__ import annotations

import sys

from tlscache import SessionStore
from tlscache.stores import open_store
from tlscache_farm import tlsserver


def _open(spec: str) -> SessionStore:
    return open_store(spec)


if __name__ == "__main__":
    tlsserver.DistcacheStore = _open  # type: ignore[assignment,misc,unused-ignore]
    sys.exit(tlsserver.main())
