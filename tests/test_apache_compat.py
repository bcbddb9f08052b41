"""Apache httpd (mod_ssl) and a tlscache server resume each other's sessions.

Real processes on loopback: Apache httpd with ``SSLSessionCache memcache:`` (one server, then
two: apr-util's crc32 placement) or ``redis:``, the cache servers, and a pyOpenSSL server in this
process using :mod:`tlscache.apache`. ``openssl s_client`` saves the session of a full handshake
on one (``-sess_out``) and offers it to the other (``-sess_in``): ``Reused`` both ways, TLS 1.2
(session ids) and TLS 1.3 (stateful tickets). Each server says on its side too whether it
resumed: Apache's ``/info`` (mod_ssl's ``SSL_SESSION_RESUMED``), tlscache's status line.

Then through the farm (``tlscache-farm --with-apache``): ``s_client -reconnect`` through the
round-robin balancer resumes on Apache and on tlscache backends alike.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from OpenSSL import SSL

from tests import tlsutil
from tests.procs import free_port, running
from tests.tlsutil import Certs
from tlscache.apache import (
    APACHE_KEY_PREFIX,
    ApacheCompat,
    ApacheSessionCache,
    apache_key,
    apache_session_id_context,
)
from tlscache_farm.apache import ApacheConfig, apache_argv, find_apache, write_config
from tlscache_farm.tlsserver import serve_one

if TYPE_CHECKING:
    from tlscache_farm.orchestrator import Farm

APACHE = find_apache()
OPENSSL = shutil.which("openssl")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(APACHE is None, reason="Apache httpd (apache2 with mod_ssl) not installed"),
    pytest.mark.skipif(OPENSSL is None, reason="no openssl command"),
]

#: The name and port clients use (a balancer's), hence every server's session id context.
SERVER_NAME = "localhost"
PUBLIC_PORT = 8443
TIMEOUT = 300
DEADLINE_MS = 2000.0
REQUEST = b"GET /info HTTP/1.0\r\nHost: localhost\r\n\r\n"  # 1.0: no chunks


# ---------------------------------------------------------------- the pure parts


def test_session_id_context_is_md5_hex_of_name_and_port() -> None:
    # Observed on Apache 2.4: a vhost on :18443 with "ServerName www.example.com" (no port).
    assert apache_session_id_context("www.example.com", 0) == b"df43a30f8c0fa10e701728677c6ff86c"
    assert apache_session_id_context("www.example.com", 443) == b"df43a30f8c0fa10e701728677c6ff86c"
    assert apache_session_id_context("www.example.com", 0, ssl_engine=False) != (
        apache_session_id_context("www.example.com", 0)
    )
    ctx = apache_session_id_context("localhost", 8443)
    assert len(ctx) == 32 and ctx == ctx.lower()


def test_compat_from_directives() -> None:
    c = ApacheCompat.from_directives("localhost:8443", "memcache:127.0.0.1:1,[::1]:2,h", 120)
    assert (c.server_name, c.port, c.timeout) == ("localhost", 8443, 120)
    assert c.servers.addresses == ("127.0.0.1:1", "[::1]:2", "h:11211")
    assert c.session_id_context == apache_session_id_context("localhost", 8443)
    assert ApacheCompat.from_directives("localhost", "redis:h").servers.addresses == ("h:6379",)
    assert apache_key(b"\xab\x01") == APACHE_KEY_PREFIX + "ab01"


@pytest.mark.parametrize(
    "cache", ["shmcb:/tmp/x(512000)", "memcache:", "memcache:h:1,,h:2", "memcache:::1:1"]
)
def test_compat_refuses_caches_it_cannot_share(cache: str) -> None:
    from tlscache.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError):
        ApacheCompat(SERVER_NAME, PUBLIC_PORT, cache)


# ---------------------------------------------------------------- processes


@contextlib.contextmanager
def run_dir() -> Iterator[Path]:
    """Under /tmp, not pytest's tmp_path: httpd serves its pages as www-data, which must be
    able to pass through every parent directory (pytest's are root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="tlscache-apache-test-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def apache(certs: Certs, session_cache: str) -> Iterator[ApacheConfig]:
    with run_dir() as d:
        cfg = ApacheConfig(
            d,
            free_port(),
            str(certs.chain),
            str(certs.key),
            session_cache,
            server_name=SERVER_NAME,
            public_port=PUBLIC_PORT,
            session_timeout=TIMEOUT,
        )
        argv = apache_argv(write_config(cfg), APACHE)
        try:
            with running(argv, ready=f"IP:127.0.0.1:{cfg.port}", stderr=subprocess.STDOUT):
                yield cfg
        finally:
            print(
                cfg.error_log.read_text(errors="replace")[-3000:] if cfg.error_log.exists() else ""
            )


class CompatServer:
    """A pyOpenSSL server in this process, sharing sessions with Apache through tlscache.apache.

    One connection at a time: read the request, answer one status line (``reused=1 ...``),
    close cleanly (the session stays valid).
    """

    def __init__(self, certs: Certs, compat: ApacheCompat) -> None:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.use_certificate_chain_file(str(certs.chain))
        ctx.use_privatekey_file(str(certs.key))
        ctx.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)
        self.ctx = ctx
        # Generous deadlines: a loaded machine must not turn a store call into a miss.
        self.cache: ApacheSessionCache = compat.install(
            ctx, deadline_ms=DEADLINE_MS, breaker_reset_s=0.5
        )
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with sock:
                serve_one(sock, self.ctx, None, False, request=True)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self.listener.close()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the server thread did not stop"
        self.cache.close()


@dataclass
class Pair:
    """Apache and a tlscache server sharing one cache."""

    kind: str
    apache: ApacheConfig
    tls: CompatServer
    cache_addresses: list[str] = field(default_factory=list)


@pytest.fixture(scope="module", params=["memcached", "memcached-2", "redis"])
def pair(request: pytest.FixtureRequest, certs: Certs) -> Iterator[Pair]:
    kind: str = request.param
    with contextlib.ExitStack() as stack:
        if kind.startswith("memcached"):
            from tests.memcache.servers import MEMCACHED, memcached_servers

            if MEMCACHED is None:
                pytest.skip("memcached not installed")
            servers = stack.enter_context(memcached_servers(2 if kind.endswith("-2") else 1))
            addresses = [s.address for s in servers]
            directive = "memcache:" + ",".join(addresses)
        else:
            from tests.redisutil import REDIS_SERVER, redis_server

            if REDIS_SERVER is None:
                pytest.skip("redis-server not installed")
            server = stack.enter_context(redis_server())
            addresses = [server.address]
            directive = f"redis:{server.address}"
        cfg = stack.enter_context(apache(certs, directive))
        compat = ApacheCompat(SERVER_NAME, PUBLIC_PORT, directive, TIMEOUT)
        tls = CompatServer(certs, compat)
        stack.callback(tls.close)
        yield Pair(kind, cfg, tls, addresses)


def s_client(certs: Certs, port: int, version: str, *args: str) -> str:
    return tlsutil.s_client(certs, port, version, *args, request=REQUEST)


def outcome(out: str) -> str:
    """``New, TLSv1.3`` or ``Reused, TLSv1.2`` from s_client's output ('' if neither)."""
    m = re.search(r"^(New|Reused), (TLSv[\d.]+)", out, re.M)
    return f"{m[1]}, {m[2]}" if m else ""


def server_says_resumed(out: str) -> bool | None:
    """What the server reported: Apache's /info JSON, or tlscache's status line."""
    if '"server": "apache"' in out:
        return '"resumed": true' in out
    m = re.search(r"^reused=(\d)", out, re.M)
    return None if m is None else m[1] == "1"


def session_id(out: str) -> bytes:
    m = re.search(r"Session-ID: ([0-9A-F]+)", out)
    assert m, out
    return bytes.fromhex(m[1])


def stored(pair: Pair, sid: bytes) -> dict[str, tuple[bytes, int]]:
    """Every cache server holding Apache's key for ``sid``: address -> (value, TTL left)."""
    key = apache_key(sid)
    found = {}
    for address in pair.cache_addresses:
        host, port = address.rsplit(":", 1)
        if pair.kind == "redis":
            import redis

            r = redis.Redis(host=host, port=int(port), socket_timeout=5)
            try:
                value, ttl = r.get(key), r.ttl(key)
            finally:
                r.close()
            if value is not None:
                found[address] = (bytes(value), int(ttl))
            continue
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(f"mg {key} v t\r\nmn\r\n".encode())
            data = b""
            while not data.endswith(b"MN\r\n"):
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
        if data.startswith(b"VA "):
            header, _, rest = data.partition(b"\r\n")
            n, *flags = header.split()[1:]
            ttl = next(int(f[1:]) for f in flags if f.startswith(b"t"))
            found[address] = (rest[: int(n)], ttl)
    return found


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("origin", ["apache", "tlscache"])
def test_session_made_on_one_resumes_on_the_other(
    pair: Pair, certs: Certs, origin: str, version: str, tmp_path: Path
) -> None:
    ports = {"apache": pair.apache.port, "tlscache": pair.tls.port}
    other = "tlscache" if origin == "apache" else "apache"
    sess = tmp_path / "session.pem"
    first = s_client(certs, ports[origin], version, "-sess_out", str(sess))
    assert outcome(first) == f"New, TLSv{version}", first
    assert server_says_resumed(first) is False, first
    second = s_client(certs, ports[other], version, "-sess_in", str(sess))
    state = (pair.kind, origin, other, pair.tls.cache.cache.stats())
    assert outcome(second) == f"Reused, TLSv{version}", (state, second)
    assert server_says_resumed(second) is True, (state, second)
    if version == "1.2":
        # The key is Apache's, on the server apr-util's placement picks, with the raw DER
        # and mod_ssl's lifetime.
        entries = stored(pair, session_id(first))
        assert len(entries) == 1, (state, entries)
        ((address, (value, ttl)),) = entries.items()
        if pair.kind.startswith("memcached"):
            from tlscache.stores.memcached import apache_index

            key = apache_key(session_id(first)).encode()
            assert address == pair.cache_addresses[apache_index(key, len(pair.cache_addresses))]
        assert value[:1] == b"\x30", (state, value[:4])
        assert 0 < ttl <= TIMEOUT, (state, ttl)


@pytest.mark.parametrize("pair", ["memcached-2"], indirect=True)
def test_two_memcached_servers_both_used_by_both(pair: Pair, certs: Certs, tmp_path: Path) -> None:
    """Sessions spread over both servers as apr-util places them, and each resumes across."""
    used: dict[str, set[str]] = {"apache": set(), "tlscache": set()}
    ports = {"apache": pair.apache.port, "tlscache": pair.tls.port}
    for _ in range(16):  # each server lands on both within a few sessions (16: p < 1e-4)
        for origin, other in (("apache", "tlscache"), ("tlscache", "apache")):
            sess = tmp_path / f"{origin}.pem"
            first = s_client(certs, ports[origin], "1.2", "-sess_out", str(sess))
            used[origin].update(stored(pair, session_id(first)))
            second = s_client(certs, ports[other], "1.2", "-sess_in", str(sess))
            assert outcome(second) == "Reused, TLSv1.2", (origin, second)
        if all(len(u) == 2 for u in used.values()):
            break
    assert all(len(u) == 2 for u in used.values()), used


@pytest.mark.parametrize("pair", ["memcached"], indirect=True)
def test_other_server_name_is_a_miss(pair: Pair, certs: Certs, tmp_path: Path) -> None:
    """The session id context must match: a tlscache server named differently does not resume
    Apache's sessions (and makes a full handshake, not an error)."""
    compat = ApacheCompat("www.example.com", PUBLIC_PORT, pair.apache.session_cache, TIMEOUT)
    stranger = CompatServer(certs, compat)
    try:
        sess = tmp_path / "session.pem"
        first = s_client(certs, pair.apache.port, "1.2", "-sess_out", str(sess))
        assert outcome(first) == "New, TLSv1.2", first
        second = s_client(certs, stranger.port, "1.2", "-sess_in", str(sess))
        stats = stranger.cache.cache.stats()
        assert outcome(second) == "New, TLSv1.2", (stats, second)
        assert stats.hits == 1 and stats.errors == 0, stats  # found, then refused by OpenSSL
    finally:
        stranger.close()


# ---------------------------------------------------------------- through the farm


@pytest.fixture(scope="module", params=["memcached", "redis"])
def mixed_farm(request: pytest.FixtureRequest, certs: Certs) -> Iterator[Farm]:
    """``tlscache-farm --with-apache --backends 2``: backend-1, backend-2 and Apache behind the
    round-robin balancer, in that order, sharing one memcached pair (or one Redis)."""
    import tlscache_farm.cacheservers as cacheservers
    from tlscache_farm.certs import CertPaths
    from tlscache_farm.config import CacheConfig, CacheMode, FarmConfig
    from tlscache_farm.orchestrator import Farm

    mode: CacheMode = request.param
    if cacheservers.missing_binaries(mode):
        pytest.skip(str(cacheservers.missing_binaries(mode)))
    cfg = FarmConfig(
        certs=CertPaths(certs.chain, certs.key, certs.ca),
        backends=2,
        cache=CacheConfig(mode=mode, session_timeout=TIMEOUT, deadline_ms=DEADLINE_MS),
        port=free_port(),
        status_port=None,
        base_port=0,
        with_apache=True,
    )
    with Farm(cfg) as farm:
        yield farm


ORDER = ("backend-1", "backend-2", "apache")  # the balancer's round-robin order


def info(out: str) -> dict[str, object]:
    """The ``/info`` JSON line a farm server answered (a tlscache backend's or Apache's)."""
    import json

    lines = [json.loads(line) for line in out.splitlines() if line.startswith('{"backend"')]
    assert len(lines) == 1, out
    found: dict[str, object] = lines[0]
    return found


def balancer_counts(farm: Farm) -> dict[str, int]:
    """Connections the balancer sent to each server, by name."""
    status = farm.gather().balancer
    assert status is not None
    ports = {f"127.0.0.1:{p.tls}": f"backend-{i}" for i, p in enumerate(farm.ports.backends, 1)}
    ports[f"127.0.0.1:{farm.ports.apache}"] = "apache"
    return {ports[b.address]: b.connections for b in status.backends}


def test_farm_reconnect_resumes_across_apache_and_tlscache(mixed_farm: Farm, certs: Certs) -> None:
    """TLS 1.2 ``s_client -reconnect`` through the balancer: six connections, two on each
    server, the five reconnects all resumed, whichever server made the session."""
    assert OPENSSL is not None
    port = mixed_farm.config.port
    argv = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-reconnect"]
    argv += ["-CAfile", str(certs.ca), "-servername", "localhost"]
    origins = []
    for _ in range(3):
        # One request first: the server it names tells where the -reconnect run begins.
        before = info(s_client(certs, port, "1.2"))["backend"]
        origin = ORDER[(ORDER.index(str(before)) + 1) % len(ORDER)]
        # TLS 1.2 race: s_client reconnects the instant its handshake ends, which can beat
        # the server's store write (docs/operations.md); a reconnect that lost it makes a new
        # session, and the next reconnect races for that one. Only that shape is measured
        # again (full handshakes, then only resumed ones: once a session resumed it is
        # stored); six connections over three servers, so a second try begins on the same
        # one. A C server next in line (Apache after backend-2) often wins the race on a
        # loaded machine: 5 first tries of 8 with two CPU burners, none of 5 second tries.
        seen: list[list[str]] = []
        for _attempt in range(10):
            counts = balancer_counts(mixed_farm)
            out = subprocess.run(argv, input=b"", capture_output=True, timeout=30).stdout.decode()
            lines = re.findall(r"^(New|Reused), (TLSv[\d.]+)", out, re.M)
            sent = {k: v - counts[k] for k, v in balancer_counts(mixed_farm).items()}
            assert sent == dict.fromkeys(ORDER, 2), (sent, out)
            assert lines[0] == ("New", "TLSv1.2") and len(lines) == 6, out
            kinds = [kind for kind, _ in lines]
            seen.append(kinds)
            if all(kind == "Reused" for kind in kinds[1:]):
                break
            resumed_from = kinds.index("Reused") if "Reused" in kinds else len(kinds)
            stored = kinds[resumed_from:]
            assert "New" not in stored, f"a stored session was not resumed: {seen}\n{out}"
        else:
            pytest.fail(f"reconnects from a session made on {origin} did not all resume: {seen}")
        origins.append(origin)
    assert sorted(origins) == sorted(ORDER), origins  # sessions made by each server, Apache too


def test_farm_tls13_ticket_chain_through_every_server(
    mixed_farm: Farm, certs: Certs, tmp_path: Path
) -> None:
    """TLS 1.3: each connection offers the ticket the previous server issued; every server,
    Apache included, resumes tickets of the others."""
    port = mixed_farm.config.port
    sess = tmp_path / "session.pem"
    infos = []
    for i in range(6):
        args = ["-sess_out", str(sess)] + (["-sess_in", str(sess)] if i else [])
        infos.append(info(s_client(certs, port, "1.3", *args)))
    assert [i["resumed"] for i in infos] == [False] + [True] * 5, infos
    assert all(i["tls_version"] == "TLSv1.3" for i in infos), infos
    names = [str(i["backend"]) for i in infos]
    assert sorted(set(names)) == sorted(ORDER), names
    # A ticket Apache issued resumed on a tlscache backend, and one a backend issued on Apache.
    pairs = set(itertools.pairwise(names))
    assert any(a == "apache" and b != "apache" for a, b in pairs), names
    assert any(a != "apache" and b == "apache" for a, b in pairs), names
