"""The shared store is untrusted: attacks on it, end to end, with real processes.

Whoever reaches a dc_server can read, delete and write any entry. These tests play
that attacker with a raw distcache :class:`~tlscache.distcache.client.Client`
against pyOpenSSL server processes (``tlscache_farm.tlsserver``) whose
SessionCache seals sessions with a key ring, and real pyOpenSSL clients:

* what the store holds is neither a session nor its master secret, and the
  master secret is in no byte of the dc_server and dc_client processes;
* an id read off the wire finds nothing; a stolen value is only a sealed blob;
* a planted, replaced, tampered, truncated, swapped, foreign, expired or
  retired-key value is a counted refusal of the right kind, then a full
  handshake (never an error, never another client's identity);
* a key rotation under traffic drops no valid session;
* two services (different client CAs) sharing one store and one ring cannot
  resume each other's sessions;
* a fatal alert on one server makes the connection's sessions unresumable on
  every server of the farm.

Every server writes one line per connection to a log file (``--log``), failed
handshakes included, with its counters; the tests read the counters' change
across a connection. TLS 1.2 resumes by session id, TLS 1.3 by stateful
tickets (the ticket is the server's session id); clients are pyOpenSSL
``set_session``. Writes are synchronous and the tests wait for the store (HAVE)
before a reconnect, which rules out the TLS 1.2 race of a client back before
the write.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from tests.procs import free_port, running, tool, wait_proxy_connected
from tests.tlsutil import client_context
from tlscache.distcache.client import Client
from tlscache.keyring import KeyRing
from tlscache.sealing import Sealer
from tlscache_farm.tlsclient import server_argv

pytestmark = pytest.mark.integration

VERSIONS = ["1.2", "1.3"]
#: The servers' session id context (tlsserver's default ``--session-id-context``).
CONTEXT = b"tlscache-test"
#: What the servers give a session (``SessionCache(timeout=300)``), for opening values.
LIFETIME_S = 300
SEAL_KINDS = ("malformed", "unknown_key", "retired_key", "tampered", "expired")
#: Bounds of every wait for another process.
WAIT_S = 10.0


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    chain: Path  # the server certificate (localhost), one for every service
    key: Path
    ca: Path  # what clients trust for the server
    ca1: Path  # service 1's client CA: issued alice
    ca2: Path  # service 2's client CA: issued mallory
    evil_ca: Path  # the attacker's own CA: issued another "alice"
    alice: Path  # certificate chain and key in one file
    mallory: Path
    evil_alice: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    import trustme

    d = tmp_path_factory.mktemp("pki")
    server_ca, ca1, ca2, evil = trustme.CA(), trustme.CA(), trustme.CA(), trustme.CA()
    cert = server_ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(d / "chain.pem"), append=i > 0)
    for name, ca in (("ca", server_ca), ("ca1", ca1), ("ca2", ca2), ("evil_ca", evil)):
        ca.cert_pem.write_to_path(str(d / f"{name}.pem"))
    for name, ca, cn in (
        ("alice", ca1, "alice"),
        ("mallory", ca2, "mallory"),
        ("evil_alice", evil, "alice"),
    ):
        ca.issue_cert(f"{cn}.example", common_name=cn).private_key_and_cert_chain_pem.write_to_path(
            str(d / f"{name}.pem")
        )
    return Pki(
        d / "chain.pem",
        d / "key.pem",
        d / "ca.pem",
        d / "ca1.pem",
        d / "ca2.pem",
        d / "evil_ca.pem",
        d / "alice.pem",
        d / "mallory.pem",
        d / "evil_alice.pem",
    )


def new_ring(path: Path) -> Path:
    KeyRing.generate().save(path)
    return path


# ---------------------------------------------------------------- servers


def parse_fields(line: str) -> dict[str, str]:
    return dict(f.split("=", 1) for f in line.split() if "=" in f)


@dataclass
class Server:
    name: str
    port: int
    log: Path
    keys: Path
    proc: subprocess.Popen[bytes]
    request: bool  # the client speaks first (``--request``)

    def lines(self) -> list[dict[str, str]]:
        if not self.log.exists():
            return []
        text = self.log.read_text(encoding="utf-8")
        return [parse_fields(line) for line in text.splitlines() if line.strip()]

    def counters(self) -> dict[str, int]:
        """The cache's counters after the last connection (zeros before the first)."""
        lines = self.lines()
        last = lines[-1] if lines else {}
        names = ("hits", "misses", *(f"seal_{k}" for k in SEAL_KINDS))
        return {n: int(last.get(n, "0")) if last.get(n, "0").isdigit() else -1 for n in names}


@contextlib.contextmanager
def tls_server(
    pki: Pki, store: str, keys: Path, name: str, log_dir: Path, *extra: str
) -> Iterator[Server]:
    port = free_port()
    log = log_dir / f"{name}-{port}.log"
    # A lookup deadline (2 s) that a loaded machine meets: these tests count outcomes, and a
    # timed-out lookup would be a miss they did not expect. ``extra`` may set its own.
    argv = server_argv(
        *(pki.chain, pki.key, port, store, "--sync-writes", "--deadline-ms", "2000"),
        *("--log", str(log), *extra),
        keys=keys,
    )
    with running(argv, ready=f"IP:127.0.0.1:{port}", stderr=subprocess.DEVNULL) as proc:
        yield Server(name, port, log, keys, proc, "--request" in extra)


@dataclass
class Farm:
    """One dc_server, one dc_client in front of it, one ring; A via the proxy, B direct."""

    dc_server: str
    dc_client: str
    keys: Path
    a: Server
    b: Server
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)


@contextlib.contextmanager
def cache_processes(d: Path) -> Iterator[tuple[str, str, dict[str, subprocess.Popen[bytes]]]]:
    dc = f"IP:127.0.0.1:{free_port()}"
    proxy = f"UNIX:{d / 'dc_client.sock'}"
    with (
        running(tool("dc_server", "-listen", dc), ready=dc, stderr=subprocess.DEVNULL) as server,
        running(
            tool("dc_client", "-listen", proxy, "-server", dc, "-retry", "100"),
            ready=proxy,
            stderr=subprocess.DEVNULL,
        ) as client,
    ):
        wait_proxy_connected(proxy)
        yield dc, proxy, {"dc_server": server, "dc_client": client}


@contextlib.contextmanager
def make_farm(pki: Pki, d: Path) -> Iterator[Farm]:
    keys = new_ring(d / "keys.json")
    with (
        cache_processes(d) as (dc, proxy, procs),
        tls_server(pki, f"dc:{proxy}", keys, "a", d) as a,
        tls_server(pki, f"dc:{dc}", keys, "b", d) as b,
    ):
        yield Farm(dc, proxy, keys, a, b, procs)


@pytest.fixture(scope="module")
def farm(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    with make_farm(pki, tmp_path_factory.mktemp("farm")) as f:
        yield f


# ---------------------------------------------------------------- clients


@dataclass
class Outcome:
    """One client connection, as the client, the wire and the server saw it."""

    server: str
    fields: dict[str, str] | None  # the server's line to the client; None: no line
    log: dict[str, str]  # the server's log line for this connection ({} if none came)
    session: SSL.Session | None
    client_reused: bool
    master_key: bytes
    offered: list[bytes]  # from the ClientHello: the TLS 1.2 session id, TLS 1.3 tickets
    error: str

    @property
    def new_keys(self) -> list[bytes]:
        """The store keys of the sessions the server made on this connection."""
        new = (self.fields or self.log).get("new", "")
        return [bytes.fromhex(h) for h in new.split(",") if h]

    @property
    def reused(self) -> bool:
        return (self.fields or self.log).get("reused") == "1"

    def __repr__(self) -> str:
        return (
            f"<{self.server}: line={self.fields} log={self.log} client_reused={self.client_reused}"
            f" offered={[o.hex() for o in self.offered]} error={self.error!r}>"
        )


def master_key(sess: SSL.Session) -> bytes:
    raw = sess._session
    n = lib.SSL_SESSION_get_master_key(raw, ffi.NULL, 0)
    buf = ffi.new("unsigned char[]", n)
    got = lib.SSL_SESSION_get_master_key(raw, buf, n)
    return bytes(ffi.buffer(buf, got))


def parses_as_session(value: bytes) -> bool:
    """Whether OpenSSL's ``d2i_SSL_SESSION`` accepts ``value``."""
    buf = ffi.new("unsigned char[]", value)
    pp = ffi.new("unsigned char **", buf)
    sess = lib.d2i_SSL_SESSION(ffi.NULL, pp, len(value))
    if sess == ffi.NULL:
        lib.ERR_clear_error()
        return False
    lib.SSL_SESSION_free(sess)
    return True


#: An application data record that cannot decrypt: the server's answer is a fatal alert.
BAD_RECORD = b"\x17\x03\x03\x00\x30" + bytes(range(0x30))


def copy_session(sess: SSL.Session) -> SSL.Session:
    """A fresh SSL_SESSION from ``sess``'s DER (what a client that saved it would offer)."""
    n = lib.i2d_SSL_SESSION(sess._session, ffi.NULL)
    buf = ffi.new("unsigned char[]", n)
    lib.i2d_SSL_SESSION(sess._session, ffi.new("unsigned char **", buf))
    raw = lib.d2i_SSL_SESSION(ffi.NULL, ffi.new("unsigned char **", buf), n)
    assert raw != ffi.NULL, "the client's own session does not decode"
    copy = SSL.Session.__new__(SSL.Session)
    copy._session = ffi.gc(raw, lib.SSL_SESSION_free)
    return copy


def offered_ids(flight: bytes) -> list[bytes]:
    """What a ClientHello offers to resume: its legacy session id (when it is not a TLS 1.3
    client's random one) or the identities of its pre_shared_key extension (TLS 1.3)."""
    assert flight[0] == 22 and flight[5] == 1, f"not a ClientHello: {flight[:8].hex()}"
    body = flight[9:]
    at = 2 + 32
    sid = body[at + 1 : at + 1 + body[at]]
    at += 1 + body[at]
    at += 2 + int.from_bytes(body[at : at + 2], "big")  # cipher suites
    at += 1 + body[at]  # compression methods
    end = at + 2 + int.from_bytes(body[at : at + 2], "big")
    at += 2
    identities: list[bytes] = []
    tls13 = False
    while at < end:
        kind, size = struct.unpack(">HH", body[at : at + 4])
        data = body[at + 4 : at + 4 + size]
        at += 4 + size
        if kind == 43:  # supported_versions
            tls13 = b"\x03\x04" in data[1:]
        elif kind == 41:  # pre_shared_key: identities first
            stop = 2 + int.from_bytes(data[:2], "big")
            i = 2
            while i < stop:
                n = int.from_bytes(data[i : i + 2], "big")
                identities.append(data[i + 2 : i + 2 + n])
                i += 2 + n + 4  # identity, obfuscated ticket age
    if tls13:
        return identities
    return [sid] if sid else []


def connect(
    pki: Pki,
    server: Server,
    version: str,
    session: SSL.Session | None = None,
    cert: Path | None = None,
    corrupt: bool = False,
) -> Outcome:
    """One connection: handshake, (a request line,) the server's line, a clean shutdown.

    The client runs over memory BIOs so that the test sees its bytes on the wire.
    ``corrupt``: send a record that cannot decrypt instead of the request line (or,
    to a server that does not read first, instead of close_notify); the client's
    session is then copied so that it can still be offered.
    """
    ctx = client_context(version)
    ctx.load_verify_locations(str(pki.ca))
    ctx.set_verify(SSL.VERIFY_PEER)
    if cert is not None:
        ctx.use_certificate_chain_file(str(cert))
        ctx.use_privatekey_file(str(cert))
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    conn.set_tlsext_host_name(b"localhost")
    if session is not None:
        # pyOpenSSL's set_session insists on the Context that made the session; OpenSSL
        # does not (an attacker offers a session from any client it likes).
        assert lib.SSL_set_session(conn._ssl, session._session) == 1
    logged = len(server.lines())
    sent: list[bytes] = []
    data, error = b"", ""

    def flush(sock: socket.socket) -> None:
        for _ in range(64):
            try:
                out = conn.bio_read(65536)
            except SSL.WantReadError:
                return
            sent.append(out)
            sock.sendall(out)

    def step(sock: socket.socket, call: Callable[[], bytes | None]) -> bytes | None:
        """``call`` until it needs no more input from the server (bounded)."""
        for _ in range(64):
            try:
                result = call()
            except SSL.WantReadError:
                flush(sock)
                incoming = sock.recv(65536)
                if not incoming:
                    conn.bio_shutdown()
                else:
                    conn.bio_write(incoming)
                continue
            flush(sock)
            return result
        raise AssertionError("no progress after 64 reads")

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        try:
            step(sock, conn.do_handshake)
            if server.request and corrupt:
                sock.sendall(BAD_RECORD)
            elif server.request:
                conn.send(b"hello\n")
                flush(sock)
            for _ in range(64):
                try:
                    chunk = step(sock, lambda: conn.recv(4096))
                except SSL.ZeroReturnError:
                    break
                data += chunk or b""
                if data.endswith(b"\n"):
                    break
        except (SSL.Error, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        sess = conn.get_session()
        reused = bool(lib.SSL_session_reused(conn._ssl))
        if corrupt:
            if not server.request and not error:
                sock.sendall(BAD_RECORD)
                with contextlib.suppress(OSError):
                    sock.recv(65536)  # until the server's alert, or its close
            # OpenSSL marks a session whose connection failed as not resumable, in this
            # client; a copy made from its DER has no such mark and can be offered again.
            conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
            sess = copy_session(sess) if sess is not None else None
        elif not error:
            with contextlib.suppress(SSL.Error, OSError):
                conn.shutdown()
                flush(sock)
    deadline = time.monotonic() + WAIT_S
    lines = server.lines()
    while len(lines) <= logged and time.monotonic() < deadline:
        time.sleep(0.01)
        lines = server.lines()
    line = data.decode(errors="replace")
    return Outcome(
        server=server.name,
        fields=parse_fields(line) if line.startswith("reused=") else None,
        log=lines[logged] if len(lines) > logged else {},
        session=sess,
        client_reused=reused,
        master_key=master_key(sess) if sess is not None else b"",
        offered=offered_ids(b"".join(sent)) if sent else [],
        error=error,
    )


# ---------------------------------------------------------------- the store


def lookup_key(keys: Path, session_id: bytes, context: bytes = CONTEXT) -> bytes:
    return Sealer(KeyRing.load(keys)).lookup_key(context, session_id)


def open_value(keys: Path, lk: bytes, value: bytes, context: bytes = CONTEXT) -> bytes:
    return Sealer(KeyRing.load(keys)).open(lk, context, value, LIFETIME_S)


def seal_value(
    ring: KeyRing, lk: bytes, der: bytes, clock: Callable[[], float] = time.time
) -> bytes:
    """``der`` sealed under ``ring`` as a server of that ring would (``clock``: when)."""
    return Sealer(ring, clock=clock).seal(lk, CONTEXT, der, LIFETIME_S)


def wait_stored(dc: str, lookup_keys: list[bytes]) -> None:
    assert lookup_keys, "the handshake created no session"
    deadline = time.monotonic() + WAIT_S
    with Client(dc) as client:
        for lk in lookup_keys:
            while not client.have(lk):
                assert time.monotonic() < deadline, (
                    f"{lk.hex()} never reached the store; expected under {len(lookup_keys)} keys"
                )
                time.sleep(0.01)


def replace_entry(dc: str, lk: bytes, value: bytes) -> None:
    """What anyone who reaches dc_server can do: REMOVE, then ADD another value."""
    with Client(dc) as client:
        client.remove(lk)
        result = client.add(lk, value, LIFETIME_S * 1000)
        assert client.get(lk) == value, f"ADD under {lk.hex()} gave {result}, value not stored"


def stored(dc: str, out: Outcome) -> dict[bytes, bytes]:
    """The stored value of each session the connection created, by store key."""
    lks = out.new_keys
    wait_stored(dc, lks)
    with Client(dc) as client:
        values = {lk: client.get(lk) for lk in lks}
    missing = [lk.hex() for lk, v in values.items() if v is None]
    assert not missing, f"{out}: nothing stored under {missing}"
    return {lk: v for lk, v in values.items() if v is not None}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def seal_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in delta(before, after).items() if k.startswith("seal_")}


# ---------------------------------------------------------------- 1, 4: what the store holds


@pytest.mark.parametrize("version", VERSIONS)
def test_stored_values_are_sealed(farm: Farm, pki: Pki, version: str) -> None:
    """The bytes dc_server holds do not parse as a session and do not hold the master key."""
    out = connect(pki, farm.b, version)
    assert out.fields is not None and out.master_key, out
    values = stored(farm.dc_server, out)
    ring = KeyRing.load(farm.keys)
    state = {
        lk.hex()[:16]: {
            "len": len(v),
            "head": v[:8].hex(),
            "d2i": parses_as_session(v),
            "master_key_inside": out.master_key in v,
        }
        for lk, v in values.items()
    }
    for v in values.values():
        assert not parses_as_session(v) and out.master_key not in v, (out, state)
        assert v[0] == 1 and struct.unpack(">I", v[1:5])[0] == ring.current.key_id, (out, state)
    # Control: the values do hold this session, sealed; opened, it parses and holds the key.
    opened = [open_value(farm.keys, lk, v) for lk, v in values.items()]
    assert all(parses_as_session(der) for der in opened), (out, state)
    assert any(out.master_key in der for der in opened), (out, state)


@pytest.mark.parametrize("version", VERSIONS)
def test_id_seen_on_the_wire_finds_nothing(farm: Farm, pki: Pki, version: str) -> None:
    """An eavesdropper's session id (TLS 1.2 ServerHello id, TLS 1.3 ticket) is not a key."""
    out = connect(pki, farm.a, version)
    assert out.fields is not None, out
    values = stored(farm.dc_server, out)
    again = connect(pki, farm.b, version, session=out.session)
    assert again.reused and len(again.offered) == 1, again
    wire = again.offered[0]  # TLS 1.2: the session id; TLS 1.3: the ticket
    with Client(farm.dc_server) as client:
        found = (client.have(wire), client.get(wire))
    lk = lookup_key(farm.keys, wire)
    state = f"{out}; {again}; by the wire id: {found}; stored under {[k.hex() for k in values]}"
    assert found == (False, None), state
    # What the store does hold under HMAC(lookup secret, context, id): a sealed value.
    assert lk in values, state
    value = values[lk]
    assert value[0] == 1 and not parses_as_session(value), (state, value.hex())
    assert out.master_key not in value, (state, value.hex())
    assert out.master_key in open_value(farm.keys, lk, value), state  # the right session


# ---------------------------------------------------------------- 2: process memory


def rw_memory(pid: int) -> Iterator[bytes]:
    """The readable and writable mappings of process ``pid``."""
    with (
        open(f"/proc/{pid}/maps", encoding="ascii") as maps,
        open(f"/proc/{pid}/mem", "rb", 0) as mem,
    ):
        for line in maps:
            parts = line.split()
            if not parts[1].startswith("rw") or (len(parts) > 5 and parts[5].startswith("[v")):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            try:
                mem.seek(start)
                yield mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue


def found_in(pid: int, needles: dict[str, bytes]) -> set[str]:
    hits: set[str] = set()
    for region in rw_memory(pid):
        hits.update(name for name, needle in needles.items() if needle in region)
    return hits


@pytest.mark.skipif(os.geteuid() != 0, reason="reading another process's memory needs root")
def test_master_secret_not_in_cache_process_memory(pki: Pki, tmp_path: Path) -> None:
    with make_farm(pki, tmp_path) as farm:
        keys: dict[str, bytes] = {}
        values: dict[str, bytes] = {}
        for version in VERSIONS:
            for i in range(3):
                out = connect(pki, farm.a, version)  # through dc_client to dc_server
                assert out.fields is not None, out
                for lk, v in stored(farm.dc_server, out).items():
                    values[f"value {lk.hex()[:12]}"] = v
                    values[f"lookup key {lk.hex()[:12]}"] = lk
                again = connect(pki, farm.a, version, session=out.session)
                assert again.reused, again  # the value went back through dc_client
                keys[f"TLS {version} #{i}"] = out.master_key
                if again.session is not None:
                    keys[f"TLS {version} #{i} resumed"] = master_key(again.session)
        assert all(len(k) >= 32 for k in keys.values()), keys
        proxy_path = farm.dc_client.removeprefix("UNIX:").encode()
        dc = farm.procs["dc_server"].pid
        proxy = farm.procs["dc_client"].pid
        in_server = found_in(dc, {**keys, **values})
        in_proxy = found_in(proxy, {**keys, **values, "listen path": proxy_path})
    state = (
        f"dc_server holds {sorted(in_server)}; dc_client holds {sorted(in_proxy)}; "
        f"master keys searched: {sorted(keys)}"
    )
    # Controls: the search finds what each process does hold.
    assert set(values) <= in_server, state
    assert "listen path" in in_proxy, state
    leaked = (in_server | in_proxy) & set(keys)
    assert not leaked, f"master keys found: {sorted(leaked)}; {state}"


# ---------------------------------------------------------------- 3: planting an identity


@dataclass
class Planting:
    attacker: Server  # its own dc_server and ring; trusts the attacker's CA
    attacker_dc: str
    required: Server  # the victim service, client certificates from ca1 required
    optional: Server  # the victim service, client certificates from ca1 asked for
    victim_dc: str


@pytest.fixture(scope="module")
def planting(pki: Pki, farm: Farm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Planting]:
    d = tmp_path_factory.mktemp("planting")
    own_dc = f"IP:127.0.0.1:{free_port()}"
    evil = ("--client-ca", str(pki.evil_ca), "--require-client-cert")
    with (
        running(tool("dc_server", "-listen", own_dc), ready=own_dc, stderr=subprocess.DEVNULL),
        tls_server(pki, f"dc:{own_dc}", new_ring(d / "evil.json"), "attacker", d, *evil) as att,
        tls_server(
            pki,
            f"dc:{farm.dc_server}",
            farm.keys,
            "required",
            d,
            *("--client-ca", str(pki.ca1), "--require-client-cert"),
        ) as required,
        tls_server(
            pki, f"dc:{farm.dc_server}", farm.keys, "optional", d, "--client-ca", str(pki.ca1)
        ) as optional,
    ):
        yield Planting(att, own_dc, required, optional, farm.dc_server)


@pytest.mark.parametrize("victim", ["required", "optional"])
@pytest.mark.parametrize("form", ["sealed", "raw"])
@pytest.mark.parametrize("version", VERSIONS)
def test_planted_identity_is_refused(
    planting: Planting, farm: Farm, pki: Pki, version: str, form: str, victim: str
) -> None:
    """A session carrying "alice", made on the attacker's server and written under the
    victim's lookup key, neither resumes nor lends alice to a client without a certificate."""
    target = planting.required if victim == "required" else planting.optional
    # The victim knows the real alice (control): her certificate is accepted.
    real = connect(pki, target, version, cert=pki.alice)
    assert real.fields is not None and real.fields["peer"] == "alice", real
    # The attacker's own server makes a session whose client identity is "alice".
    made = connect(pki, planting.attacker, version, cert=pki.evil_alice)
    assert made.fields is not None and made.fields["peer"] == "alice", made
    # The id the attacker's client offers for that session, read off its own ClientHello.
    probe = connect(pki, planting.attacker, version, session=made.session, cert=pki.evil_alice)
    assert probe.reused and len(probe.offered) == 1, probe
    sid = probe.offered[0]
    theirs = stored(planting.attacker_dc, made)
    their_lk = lookup_key(planting.attacker.keys, sid)
    assert their_lk in theirs, (made, probe)
    value = theirs[their_lk]
    if form == "raw":
        value = open_value(planting.attacker.keys, their_lk, value)
        assert parses_as_session(value), made
    planted = {lookup_key(farm.keys, sid): value}
    for lk, value in planted.items():
        replace_entry(planting.victim_dc, lk, value)
    victim_ring = KeyRing.load(farm.keys)
    attacker_key = KeyRing.load(planting.attacker.keys).current.key_id
    if form == "raw":
        kind = "malformed"
    else:
        kind = "tampered" if attacker_key in victim_ring.by_id() else "unknown_key"
    before = target.counters()
    out = connect(pki, target, version, session=made.session)  # no client certificate
    after = target.counters()
    state = f"{out}; counters {before} -> {after}; planted under {[k.hex() for k in planted]}"
    assert not out.reused and not out.client_reused, state
    assert out.log.get("peer") == "-", state
    if victim == "required":
        assert out.fields is None and out.error, f"a client without certificate got in: {state}"
        assert out.log.get("handshake", "").startswith("failed"), state
    else:
        assert out.fields is not None and not out.error, state
    assert seal_delta(before, after) == {f"seal_{kind}": 1}, state


# ---------------------------------------------------------------- 5, 6: damaged entries


def forged_header(ring: KeyRing, length: int) -> bytes:
    """Random bytes shaped like a value sealed under ``ring``'s current key."""
    head = struct.pack(">BIQI", 1, ring.current.key_id, int(time.time() * 1000), LIFETIME_S)
    return head + os.urandom(max(0, length - len(head)))


def damage(kind: str, farm: Farm, values: dict[bytes, bytes], other: dict[bytes, bytes]) -> None:
    """Rewrite the entries ``values`` (lookup key -> value) of one session in the farm's store.

    ``other``: the entries of a second session (for swapping and raw replacement).
    """
    ring = KeyRing.load(farm.keys)
    others = list(other.items())
    for i, (lk, value) in enumerate(values.items()):
        olk, ovalue = others[i % len(others)]
        if kind == "flipped":
            new = bytearray(value)
            new[-20] ^= 0x01
            changed = bytes(new)
        elif kind == "truncated":
            changed = value[:-1]
        elif kind == "short":
            changed = value[:20]
        elif kind == "forged":
            changed = forged_header(ring, len(value))
        elif kind == "raw":
            changed = open_value(farm.keys, olk, ovalue)  # another session's DER, unsealed
        elif kind == "swapped":
            changed = ovalue
            replace_entry(farm.dc_server, olk, value)
        elif kind == "foreign":
            foreign = KeyRing.generate().rotated().rotated()  # keys 1..3, 3 seals
            changed = seal_value(foreign, lk, open_value(farm.keys, lk, value))
        elif kind == "expired":
            der = open_value(farm.keys, lk, value)
            changed = seal_value(ring, lk, der, clock=lambda: time.time() - 2 * LIFETIME_S)
        else:
            raise AssertionError(kind)
        replace_entry(farm.dc_server, lk, changed)


EXPECTED = {
    "flipped": "tampered",
    "truncated": "tampered",
    "short": "malformed",
    "forged": "tampered",
    "raw": "malformed",
    "swapped": "tampered",
    "foreign": "unknown_key",
    "expired": "expired",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
@pytest.mark.parametrize("version", VERSIONS)
def test_damaged_entry_is_a_counted_miss(farm: Farm, pki: Pki, version: str, kind: str) -> None:
    """Replaced (forged, raw DER), tampered, truncated, swapped, foreign-key or expired
    entries: a counted refusal of the right kind, then a full handshake, never an error."""
    out = connect(pki, farm.b, version)
    second = connect(pki, farm.b, version)
    values = stored(farm.dc_server, out)
    other = stored(farm.dc_server, second)
    # Control: the session resumes on the other server while its entry is intact.
    control = connect(pki, farm.a, version, session=out.session)
    assert control.reused and control.client_reused, control
    damage(kind, farm, values, other)
    before = farm.a.counters()
    again = connect(pki, farm.a, version, session=out.session)
    after = farm.a.counters()
    state = f"{kind}: {again}; counters {before} -> {after}"
    assert again.fields is not None and not again.error, f"not a clean full handshake: {state}"
    assert not again.reused and not again.client_reused, state
    assert seal_delta(before, after) == {f"seal_{EXPECTED[kind]}": 1}, state
    if kind == "swapped":  # the other session's entry was swapped too
        before = farm.a.counters()
        swapped = connect(pki, farm.a, version, session=second.session)
        after = farm.a.counters()
        state = f"{kind}: {swapped}; counters {before} -> {after}"
        assert not swapped.reused and swapped.fields is not None, state
        assert seal_delta(before, after) == {"seal_tampered": 1}, state


@pytest.mark.parametrize("version", VERSIONS)
def test_retired_key_is_a_counted_miss(pki: Pki, tmp_path: Path, version: str) -> None:
    """A session sealed under a key retired (in the file) since: refused once servers reload."""
    with make_farm(pki, tmp_path) as farm:
        out = connect(pki, farm.a, version)
        old = stored(farm.dc_server, out)
        control = connect(pki, farm.b, version, session=out.session)
        assert control.reused, control
        KeyRing.load(farm.keys).rotated().retire(1).save(farm.keys)
        # Wait (bounded) until B seals new sessions under key 2: it has read the new file.
        seen: list[int] = []
        deadline = time.monotonic() + WAIT_S
        while not seen or seen[-1] != 2:
            assert time.monotonic() < deadline, f"B never sealed under key 2: {seen}"
            fresh = connect(pki, farm.b, version)
            seen += [struct.unpack(">I", v[1:5])[0] for v in stored(farm.dc_server, fresh).values()]
            time.sleep(0.2)
        before = farm.b.counters()
        again = connect(pki, farm.b, version, session=out.session)
        after = farm.b.counters()
        heads = [v[:5].hex() for v in old.values()]
        state = f"{again}; counters {before} -> {after}; old values begin {heads}"
    assert again.fields is not None and not again.error, state
    assert not again.reused and not again.client_reused, state
    assert seal_delta(before, after) == {"seal_retired_key": 1}, state


# ---------------------------------------------------------------- 7: rotation under traffic


def test_rotation_under_traffic_drops_no_session(pki: Pki, tmp_path: Path) -> None:
    with make_farm(pki, tmp_path) as farm:
        servers = [farm.a, farm.b]
        sessions: list[tuple[str, SSL.Session]] = []
        for version in VERSIONS:
            for i in range(4):
                out = connect(pki, servers[i % 2], version)
                stored(farm.dc_server, out)
                assert out.session is not None, out
                sessions.append((version, out.session))
        attempts: list[tuple[int, str, str, bool]] = []
        rotated_at = -1
        sealing_key = {farm.a.name: 1, farm.b.name: 1}
        deadline = time.monotonic() + 60.0
        for rnd in range(40):
            if time.monotonic() > deadline:
                break
            if rnd == 2:
                rotated = subprocess.run(
                    tool("tlscache_keys", "rotate", str(farm.keys)),
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
                assert rotated.returncode == 0, rotated
                rotated_at = rnd
            for n, (version, sess) in enumerate(sessions):
                server = servers[(n + rnd) % 2]
                out = connect(pki, server, version, session=sess)
                attempts.append((rnd, server.name, version, out.reused))
                if out.fields is not None and out.new_keys:
                    # Which key this server seals with now (it follows the file).
                    values = stored(farm.dc_server, out)
                    sealing_key[server.name] = max(
                        struct.unpack(">I", v[1:5])[0] for v in values.values()
                    )
            if rotated_at >= 0 and rnd >= rotated_at + 3 and set(sealing_key.values()) == {2}:
                break
        # Sessions made after the rotation resume across servers too.
        late = {}
        for version in VERSIONS:
            out = connect(pki, farm.a, version)
            stored(farm.dc_server, out)
            late[version] = connect(pki, farm.b, version, session=out.session)
    dropped = [a for a in attempts if not a[3]]
    state = (
        f"rotated in round {rotated_at}; sealing keys now {sealing_key}; "
        f"{len(attempts)} attempts, not resumed: {dropped}; after rotation: {late}"
    )
    assert rotated_at >= 0 and set(sealing_key.values()) == {2}, state
    assert not dropped, state
    assert all(o.reused for o in late.values()), state


# ---------------------------------------------------------------- 8: two services


def test_services_with_other_client_cas_do_not_share_sessions(
    pki: Pki, farm: Farm, tmp_path: Path
) -> None:
    """Same certificate, same store, same ring, default contexts: no resumption across."""
    default = ("--session-id-context", "default")
    store = f"dc:{farm.dc_server}"
    s1 = (*default, "--client-ca", str(pki.ca1))
    s2 = (*default, "--client-ca", str(pki.ca2))
    with (
        tls_server(pki, store, farm.keys, "x1", tmp_path, *s1) as x1,
        tls_server(pki, store, farm.keys, "x2", tmp_path, *s1) as x2,
        tls_server(pki, store, farm.keys, "y", tmp_path, *s2) as y,
    ):
        for version in VERSIONS:
            for home, twin, away, cert, who in (
                (x1, x2, y, pki.alice, "alice"),
                (y, None, x1, pki.mallory, "mallory"),
            ):
                out = connect(pki, home, version, cert=cert)
                assert out.fields is not None and out.fields["peer"] == who, out
                # An instant reconnect can beat the store write (TLS 1.2): wait for it.
                wait_stored(farm.dc_server, out.new_keys)
                if twin is not None:  # control: the same service resumes it elsewhere
                    same = connect(pki, twin, version, session=out.session)
                    assert same.reused and same.log.get("peer") == who, same
                else:
                    same = connect(pki, home, version, session=out.session)
                    assert same.reused and same.log.get("peer") == who, same
                before = away.counters()
                cross = connect(pki, away, version, session=out.session)
                after = away.counters()
                state = f"TLS {version}, {who}'s session: {cross}; counters {before} -> {after}"
                assert not cross.reused and not cross.client_reused, state
                assert cross.log.get("peer") == "-", state
                assert delta(before, after).get("misses") == 1, state
                assert not seal_delta(before, after), state


# ---------------------------------------------------------------- 9: fatal alerts


@pytest.fixture(scope="module")
def alerting(pki: Pki, farm: Farm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    """Two servers of the farm's store and ring that read a request before answering.

    The bad record must reach a server before its close_notify: once a server has sent
    close_notify, OpenSSL sends no alert for a record that fails to decrypt (the read
    fails, no alert goes out, and the connection's sessions stay in the store).
    """
    d = tmp_path_factory.mktemp("alerting")
    with (
        tls_server(pki, f"dc:{farm.dc_client}", farm.keys, "ra", d, "--request") as a,
        tls_server(pki, f"dc:{farm.dc_server}", farm.keys, "rb", d, "--request") as b,
    ):
        yield Farm(farm.dc_server, farm.dc_client, farm.keys, a, b)


@pytest.mark.parametrize("where", ["full", "resumed"])
@pytest.mark.parametrize("version", VERSIONS)
def test_fatal_alert_ends_the_session_on_every_server(
    alerting: Farm, pki: Pki, version: str, where: str
) -> None:
    """A record that fails to decrypt after the handshake: the server sends a fatal alert,
    and the connection's sessions resume nowhere in the farm."""
    farm = alerting
    if where == "full":
        first = connect(pki, farm.a, version, corrupt=True)
        bad, offered = first, first
    else:
        first = connect(pki, farm.a, version)
        stored(farm.dc_server, first)
        bad = connect(pki, farm.b, version, session=first.session, corrupt=True)
        assert bad.reused, bad
        offered = first
    assert bad.fields is None and bad.error, f"the server answered a bad record: {bad}"
    assert bad.log.get("end", "").startswith("error"), f"the server saw no bad record: {bad}"
    # The connection's sessions: those it made, and (resumed) the one it resumed.
    lks = {lk.hex(): lk for lk in bad.new_keys}
    if where == "resumed":
        assert len(bad.offered) == 1, bad
        lks[bad.offered[0].hex()] = lookup_key(farm.keys, bad.offered[0])
    assert lks, f"the connection had no session: {bad}"
    deadline = time.monotonic() + WAIT_S
    with Client(farm.dc_server) as client:
        present = {h for h, lk in lks.items() if client.have(lk)}
        while present and time.monotonic() < deadline:
            time.sleep(0.05)
            present = {h for h, lk in lks.items() if client.have(lk)}
    tries = [connect(pki, s, version, session=offered.session) for s in (farm.a, farm.b)]
    if bad.session is not None and version == "1.3":
        tries += [connect(pki, s, version, session=bad.session) for s in (farm.a, farm.b)]
    state = f"alert on {bad}; still stored after {WAIT_S:g} s: {sorted(present)}; then {tries}"
    assert not present, state
    assert not any(t.reused or t.client_reused for t in tries), state
    assert all(t.fields is not None and not t.error for t in tries), state
