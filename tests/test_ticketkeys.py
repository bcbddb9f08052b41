"""Shared ticket keys: rotation, renewal, erasure, convergence and a store that is down.

Time is an injected clock; handshakes are real (pyOpenSSL over memory BIOs, both ends here).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from OpenSSL import SSL

from tests.tlsutil import client_context, handshake_over_memory
from tlscache.deadline import Deadline
from tlscache.exceptions import ConfigurationError, StoreError
from tlscache.keyring import KeyRing
from tlscache.resumption import configure_resumption
from tlscache.sealing import Sealer
from tlscache.stores.base import WrappingStore
from tlscache.stores.memory import MemoryStore
from tlscache.ticketkeys import TicketKeyPolicy, TicketKeys

PERIOD = 3600.0


@dataclass
class Clock:
    now: float = 1_000 * PERIOD

    def __call__(self) -> float:
        return self.now


class Switchable(WrappingStore):
    """A real MemoryStore that can be made unreachable."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise StoreError("store down")

    def add(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> bool:
        self._check()
        return super().add(session_id, value, ttl_s, deadline)

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        self._check()
        return super().fetch(session_id, deadline)

    def delete(self, session_id: bytes, deadline: Deadline) -> None:
        self._check()
        super().delete(session_id, deadline)


@pytest.fixture(scope="module")
def cert_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    import trustme

    d = tmp_path_factory.mktemp("tk")
    cert = trustme.CA().issue_cert("localhost")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    return str(d / "cert.pem"), str(d / "key.pem")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.generate()


@pytest.fixture
def store(clock: Clock) -> Iterator[Switchable]:
    with Switchable(MemoryStore(clock=clock)) as s:
        yield s


def make_keys(store: Switchable, ring: KeyRing, clock: Clock) -> TicketKeys:
    return TicketKeys(store, Sealer(ring, clock=clock), policy=TicketKeyPolicy(), clock=clock)


def server(cert_files: tuple[str, str], keys: TicketKeys) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_file(cert_files[0])
    ctx.use_privatekey_file(cert_files[1])
    configure_resumption(ctx, "stateless", ticket_keys=keys)
    return ctx


def test_rotation_keeps_previous_keys_then_erases_them(
    store: Switchable, ring: KeyRing, clock: Clock
) -> None:
    keys = make_keys(store, ring, clock)
    keys.refresh()
    first = keys.current
    assert first is not None and first.shared, keys.stats()
    seen = [first]
    for _ in range(3):
        clock.now += PERIOD
        keys.refresh()
        assert keys.current is not None
        seen.append(keys.current)
    stats = keys.stats()
    assert len({k.name for k in seen}) == 4, stats
    assert stats.rotations == 3 and stats.retired == 1 and stats.keys_held == 3, stats
    assert first.erased and not seen[1].erased, stats
    assert keys.key_for_decryption(first.name) is None
    assert keys.key_for_decryption(seen[1].name) == (seen[1], True)
    assert keys.key_for_decryption(seen[3].name) == (seen[3], False)
    # The retired key is gone from the store too.
    assert store.fetch(keys.store_id(first.period), Deadline.after(1)) is None
    assert store.fetch(keys.store_id(seen[3].period), Deadline.after(1)) is not None


def test_next_key_is_fetched_ahead(store: Switchable, ring: KeyRing, clock: Clock) -> None:
    keys = make_keys(store, ring, clock)
    due = keys.refresh()
    assert due == pytest.approx(0.8 * PERIOD)
    clock.now += due
    keys.refresh()
    periods = [k.period for k in keys.held()]
    current = keys.current
    assert current is not None and periods == [current.period, current.period + 1]
    # A ticket under the next key (a server whose clock is ahead) is accepted, not renewed.
    nxt = keys.held()[-1]
    assert keys.key_for_decryption(nxt.name) == (nxt, False)


def test_two_rings_with_one_store_converge(store: Switchable, ring: KeyRing, clock: Clock) -> None:
    a = make_keys(store, ring, clock)
    a.refresh()
    clock.now += 0.5 * PERIOD  # b starts half a period later
    b = make_keys(store, ring, clock)
    b.refresh()
    assert a.current is not None and b.current is not None
    assert a.current.name == b.current.name, (a.stats(), b.stats())
    assert bytes(a.current.aes_key) == bytes(b.current.aes_key)
    clock.now += 0.35 * PERIOD  # past 80 %: both fetch the next key; b adds, a reads
    b.refresh()
    a.refresh()
    clock.now += 0.2 * PERIOD
    a.refresh()
    b.refresh()
    assert a.current is not None and b.current is not None
    assert a.current.name == b.current.name, (a.stats(), b.stats())
    assert a.stats().rotations == b.stats().rotations == 1, (a.stats(), b.stats())


def test_store_down_keeps_keys_and_counts(
    store: Switchable, ring: KeyRing, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    keys = make_keys(store, ring, clock)
    keys.refresh()
    held = keys.current
    store.down = True
    clock.now += PERIOD
    # Retries come soon at first (a store still starting), then every retry_s.
    waits = [keys.refresh() for _ in range(7)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0], waits
    keys.refresh()
    stats = keys.stats()
    assert keys.current is held and stats.store_failures == 8 and stats.local_keys == 0, stats
    assert sum("store unavailable" in r.getMessage() for r in caplog.records) == 1  # rate-limited
    # Beyond the window, a local key instead of stretching the old one's life.
    clock.now += 3 * PERIOD
    keys.refresh()
    stats = keys.stats()
    assert keys.current is not held and not stats.current_shared and stats.local_keys == 1, stats
    local = keys.current
    assert local is not None
    # Back up: the local key is offered to the store and becomes the farm's.
    store.down = False
    keys.refresh()
    assert keys.current is local and keys.stats().current_shared, keys.stats()


def test_no_store_at_all_makes_a_local_key(store: Switchable, ring: KeyRing, clock: Clock) -> None:
    store.down = True
    keys = make_keys(store, ring, clock)
    keys.refresh()
    stats = keys.stats()
    assert keys.current is not None and stats.local_keys == 1 and stats.store_failures == 1, stats


def test_store_sees_neither_period_nor_key(store: Switchable, ring: KeyRing, clock: Clock) -> None:
    keys = make_keys(store, ring, clock)
    keys.refresh()
    current = keys.current
    assert current is not None
    sid = keys.store_id(current.period)
    value = store.fetch(sid, Deadline.after(1))
    assert value is not None and len(sid) == 32
    assert current.name not in value and bytes(current.aes_key) not in value
    assert str(current.period).encode() not in sid


def test_policy_is_checked() -> None:
    with pytest.raises(ConfigurationError):
        TicketKeyPolicy(period_s=0)
    with pytest.raises(ConfigurationError):
        TicketKeyPolicy(fetch_ahead=1.0)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_handshakes_resume_renew_and_refuse(
    cert_files: tuple[str, str], store: Switchable, ring: KeyRing, clock: Clock, version: str
) -> None:
    keys_a = make_keys(store, ring, clock)
    keys_b = make_keys(store, ring, clock)
    a, b = server(cert_files, keys_a), server(cert_files, keys_b)
    client = client_context(version)
    reused, sess = handshake_over_memory(a, client)
    assert not reused
    reused, sess = handshake_over_memory(b, client, sess)  # issued by a, accepted by b
    assert reused, (keys_a.stats(), keys_b.stats())
    assert keys_b.stats().decrypted == 1, keys_b.stats()
    # One rotation: the old key still decrypts, and the client gets a renewed ticket.
    clock.now += PERIOD
    keys_a.refresh()
    keys_b.refresh()
    reused, _ = handshake_over_memory(b, client, sess)
    stats = keys_b.stats()
    assert reused and stats.renewed == 1 and stats.rotations == 1, stats
    # Three more: the first key is erased everywhere: a full handshake, counted.
    for _ in range(3):
        clock.now += PERIOD
        keys_a.refresh()
        keys_b.refresh()
    reused, _ = handshake_over_memory(a, client, sess)
    stats = keys_a.stats()
    assert not reused and stats.rejected == 1, stats
    assert stats.issued >= 2 and stats.failed == 0, stats


def test_tls13_resumption_gets_a_fresh_ticket_every_time(
    cert_files: tuple[str, str], store: Switchable, ring: KeyRing, clock: Clock
) -> None:
    """A TLS 1.3 client never shows one ticket twice (RFC 8446, appendix C.4)."""
    keys = make_keys(store, ring, clock)
    ctx = server(cert_files, keys)
    client = client_context("1.3")
    _, sess = handshake_over_memory(ctx, client)
    for _ in range(3):
        issued = keys.stats().issued
        reused, sess = handshake_over_memory(ctx, client, sess)
        stats = keys.stats()
        # A ticket issued on every resumption, under the current key: never renewed
        # for an old key, yet fresh each time.
        assert reused and stats.issued > issued and stats.renewed == 0, stats


def test_hmac_callback_also_works(
    cert_files: tuple[str, str], store: Switchable, ring: KeyRing, clock: Clock
) -> None:
    from tlscache.openssl.tickets import install_ticket_callback

    keys = make_keys(store, ring, clock)
    keys.refresh()
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_file(cert_files[0])
    ctx.use_privatekey_file(cert_files[1])
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    assert install_ticket_callback(ctx, keys, kind="hmac") == "hmac"
    client = client_context("1.2")
    _, sess = handshake_over_memory(ctx, client)
    reused, _ = handshake_over_memory(ctx, client, sess)
    assert reused, keys.stats()


def test_start_waits_briefly_for_a_store_still_coming_up(
    store: Switchable, ring: KeyRing, clock: Clock
) -> None:
    """A server started beside a store that answers only a moment later shares its key."""
    first = make_keys(store, ring, clock)
    first.refresh()
    store.down = True
    policy = TicketKeyPolicy(startup_wait_s=30.0)
    late = TicketKeys(store, Sealer(ring, clock=clock), policy=policy, clock=clock)
    threading.Timer(0.3, lambda: setattr(store, "down", False)).start()
    try:
        late.start()
        stats = late.stats()
        assert late.current is not None and first.current is not None, stats
        assert late.current.name == first.current.name and stats.local_keys == 0, stats
    finally:
        late.close()
