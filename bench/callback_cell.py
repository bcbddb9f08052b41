"""One cell of :mod:`bench.callback_cost`: resumed handshakes over memory BIOs, in this process.

    python bench/callback_cell.py CONFIG VERSION N KEYS|-

``CONFIG``: ``internal`` (OpenSSL's internal cache), ``memory`` (a SessionCache over a
MemoryStore, unsealed), ``sealed`` (the same, sealed with the key ring ``KEYS``) or
``sealed-noinfo`` (sealed, with the Context's info callback not registered, in versions of
the library that had one: what that hook cost; the same as ``sealed`` now). Makes a server and a
client Context in this process, then resumes one session ``N`` times (handshake, one byte
from the server, clean shutdown) and checks every one resumed. Imports nothing of the
benchmarks, so that it runs against another copy of the library (``PYTHONPATH``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import trustme
from OpenSSL import SSL

from tlscache import MemoryStore, SessionCache
from tlscache_farm.tlsclient import handshake_over_memory

CONTEXT = b"tlscache-bench"
_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
_CONFIGS = ("internal", "memory", "sealed", "sealed-noinfo")


def server_context(config: str, keys: Path | None) -> SSL.Context:
    cert = trustme.CA().issue_cert("localhost")  # ECDSA P-256
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    cert.configure_cert(ctx)
    if config == "internal":
        ctx.set_session_id(CONTEXT)
        ctx.set_options(SSL.OP_NO_TICKET)
        return ctx
    if config == "sealed-noinfo":
        from tlscache.openssl import callbacks

        hook = getattr(callbacks, "_AlertHook", None)  # gone since alerts arrive via remove
        if hook is not None:
            hook.take_over = lambda self, raw: None
    sealed = config.startswith("sealed")
    SessionCache(
        MemoryStore(),
        deadline_ms=1000,
        async_writes=False,
        session_id_context=CONTEXT,
        keys=keys if sealed else None,
        insecure_unsealed_storage=not sealed,
    ).install(ctx)
    return ctx


def main(argv: list[str]) -> int:
    config, version, n_text, keys_text = argv
    if config not in _CONFIGS or version not in _VERSIONS:
        raise SystemExit(f"config: one of {_CONFIGS}; version: 1.2 or 1.3")
    keys = None if keys_text == "-" else Path(keys_text)
    server = server_context(config, keys)
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client.set_min_proto_version(_VERSIONS[version])
    client.set_max_proto_version(_VERSIONS[version])
    _, session = handshake_over_memory(server, client, None)
    for i in range(20 + int(n_text)):  # 20 to warm up: the same in every run
        reused, session = handshake_over_memory(server, client, session)
        if not reused:
            raise AssertionError(f"handshake {i} did not resume ({config}, TLS {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
