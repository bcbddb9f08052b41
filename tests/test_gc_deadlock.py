"""OpenSSL's callbacks run from a garbage collection that starts while the cache's lock is held.

A Connection that ends without close_notify, caught in a reference cycle, is freed by the
collector; freeing it makes OpenSSL call the remove callback. If the collection starts at an
allocation inside a region that holds the cache's lock (``stats()``, or any other), a
callback that waits for that lock hangs the process. Each scenario runs in a child process
with a timeout, so that a hang fails the test instead of hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCENARIO = textwrap.dedent(
    """
    import contextlib, gc, ssl, sys, threading
    import trustme
    from OpenSSL import SSL
    import tlscache.session_cache as sc
    from tlscache import MemoryStore, SessionCache

    where, policy = sys.argv[1], sys.argv[2]
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    cert.configure_cert(sctx)
    store = MemoryStore()
    cache = SessionCache(store, remove_policy=policy)
    cache.install(sctx)
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    cctx.maximum_version = ssl.TLSVersion.TLSv1_2

    gc.disable()  # the collection must happen where the scenario says, not earlier
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = cctx.wrap_bio(cin, cout, server_hostname="localhost")
    server = SSL.Connection(sctx, None)
    server.set_accept_state()
    for _ in range(20):
        for step in (client.do_handshake, server.do_handshake):
            with contextlib.suppress(ssl.SSLWantReadError, SSL.WantReadError):
                step()
            if data := cout.read():
                server.bio_write(data)
            with contextlib.suppress(SSL.WantReadError):
                cin.write(server.bio_read(65536))
    (sid,) = list(store._data)
    server.cycle = server  # only the collector frees it; no close_notify: OpenSSL removes
    del server, step

    if where == "stats":
        real_replace = sc.replace

        def collecting_replace(obj):  # an allocation inside stats() that starts a collection
            gc.collect()
            return real_replace(obj)

        sc.replace = collecting_replace
        stats = cache.stats()
        sc.replace = real_replace
    else:
        with cache._lock:  # any code that holds the cache's lock
            gc.collect()
    stats = cache.stats()
    print(stats.removes_ignored, stats.removes, store.fetch(sid, sc.Deadline.after(1.0)) is None)
    """
)


@pytest.mark.parametrize("where", ["stats", "lock"])
@pytest.mark.parametrize("policy", ["alerts", "delete"])
def test_a_collection_inside_the_lock_does_not_deadlock(where: str, policy: str) -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCENARIO, where, policy],
            capture_output=True,
            text=True,
            timeout=120,  # generous: the scenario takes well under a second when it works
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"deadlock: the collection inside the lock never finished ({where}, {policy})")
    assert done.returncode == 0, done.stderr
    ignored, removes, gone = done.stdout.split()
    if policy == "alerts":
        assert (ignored, removes, gone) == ("1", "0", "False"), done.stdout
    else:  # the delete asked for inside the collection is carried out afterwards
        assert (ignored, removes, gone) == ("0", "1", "True"), done.stdout
