"""A session store backed by distcache: dc_client (local proxy) or dc_server directly."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from types import TracebackType
from typing import Literal

from tlscache.deadline import Deadline
from tlscache.distcache.client import Client
from tlscache.distcache.linktls import LinkTLS
from tlscache.distcache.protocol import MAX_ID_LEN, MAX_TIMEOUT_MS, Capabilities, Result
from tlscache.exceptions import (
    ClientError,
    ClientTimeout,
    ConfigurationError,
    StoreError,
    StoreTimeout,
    describe_error,
)

from .base import SessionStore, WriteStatus

__all__ = ["DistcacheStore"]

OnExists = Literal["keep", "replace"]


class _ClientErrors:
    """Turns the client's exceptions into the store contract's (timeout or error).

    The message names the failure (type and place), never the client's text,
    which may quote bytes the server sent.
    """

    __slots__ = ("op",)

    def __init__(self, op: str) -> None:
        self.op = op

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, ClientTimeout):
            raise StoreTimeout(f"distcache {self.op} timed out: {describe_error(exc)}") from exc
        if isinstance(exc, ClientError | ValueError | OSError):
            raise StoreError(f"distcache {self.op} failed: {describe_error(exc)}") from exc


_ADD, _GET, _REMOVE, _HAVE, _TAKE = (
    _ClientErrors(op) for op in ("add", "get", "remove", "have", "take")
)


class DistcacheStore(SessionStore):
    """Sessions kept by a distcache server, reached over the blocking client.

    ``address`` is a distcache address (``UNIX:/path`` of a dc_client, or
    ``IP:127.0.0.1:port`` of a dc_server). distcache's ADD never overwrites:
    ``on_exists="keep"`` (default) treats "a session with this id exists" as
    success, since session ids are random and the existing entry is that same
    session; ``"replace"`` removes and re-adds, spending two more round trips.
    C distcache has no atomic get-and-delete, so ``supports_take`` is False until
    the server says otherwise: the first :meth:`fetch` probes it (one more round
    trip, once; :meth:`store` is pipelined and never waits for it), as do
    :meth:`capabilities` and :meth:`take`. A tlscache dc_server, or a path through
    our dc_client to one, offers TAKE; then ``supports_take`` is True and
    :meth:`take` uses it. A store given its ``client`` leaves the probing to
    explicit :meth:`capabilities` and :meth:`take` calls.

    Writes are pipelined by default: :meth:`store` sends the ADD and returns
    without waiting for the reply (``Client.add_nowait``); the reply is read and
    checked by the next call on that connection. The ADD is in the kernel's
    hands when :meth:`store` returns, so the server sees it before any later
    request of this process (through a dc_client too: it forwards in order).
    Failures then surface late: a write that turns out not stored (refused,
    "no server", connection lost) makes the *next* :meth:`store` raise
    :class:`StoreError` after sending its own ADD, so a caller's failure counts
    and circuit breaker still see a failing store; :attr:`write_failures`
    counts them. A pipelined :meth:`store` returns ``WriteStatus.SENT``: no answer
    yet, so no verdict on the server's health for a circuit breaker (a stopped
    server's socket buffers take writes too); ``CONFIRMED`` when a reply was read
    meanwhile. ``confirm_writes=True`` waits for every reply instead (one
    round trip per write); ``on_exists="replace"`` always does.

    Each call hands its :class:`~tlscache.deadline.Deadline` to the client as it
    is, so every round trip of one call (``replace`` makes three) spends from it.

    ``tls`` talks mutual TLS to a dc_server at an ``IP:`` address
    (:class:`~tlscache.distcache.linktls.LinkTLS`; a connect's handshake spends from
    the call's deadline too, so give lookups room for it or keep connections pooled).
    """

    supports_take = False

    def __init__(
        self,
        address: str,
        *,
        on_exists: OnExists = "keep",
        persistent: bool = True,
        pool_size: int = 8,
        confirm_writes: bool = False,
        client: Client | None = None,
        tls: LinkTLS | None = None,
    ) -> None:
        if on_exists not in ("keep", "replace"):
            raise ConfigurationError("on_exists must be 'keep' or 'replace'")
        if client is not None and tls is not None:
            raise ConfigurationError("pass tls to the Client you give, not to the store")
        # Probe on the first fetch only with a client of our own making.
        self._auto_probe = client is None
        if client is None:
            client = Client(address, persistent=persistent, pool_size=pool_size, tls=tls)
        self.address = address
        self.on_exists: OnExists = on_exists
        self.confirm_writes = confirm_writes
        self._client = client
        self._failures_reported = client.nowait_failures
        self._probed = False

    @property
    def write_failures(self) -> int:
        """Pipelined writes found not stored (see the class docstring)."""
        return self._client.nowait_failures

    @staticmethod
    def _check_id(session_id: bytes) -> None:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            raise StoreError(f"session id length {len(session_id)} outside 1..{MAX_ID_LEN}")

    def capabilities(self, deadline: Deadline | None = None) -> Capabilities:
        """Probe the server (again) and set ``supports_take`` from its answer."""
        caps = self._client.capabilities(deadline=deadline)
        self.supports_take = caps.take
        self._probed = True
        return caps

    def _probe_once(self, deadline: Deadline) -> None:
        """Learn whether the server has TAKE, unless known (raises like any call)."""
        if not self._probed:
            self.capabilities(deadline)

    def store(
        self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline
    ) -> WriteStatus:
        self._check_id(session_id)
        if not value:
            raise StoreError("empty session value")
        timeout_ms = min(MAX_TIMEOUT_MS, max(0, math.ceil(ttl_s * 1000.0)))
        if not self.confirm_writes and self.on_exists == "keep":
            return self._store_nowait(session_id, value, timeout_ms, deadline)
        with self._reporting(), _ADD:
            result = self._client.add(session_id, value, timeout_ms, deadline=deadline)
            if result == Result.ADD_MATCHING_SESSION and self.on_exists == "replace":
                self._client.remove(session_id, deadline=deadline)
                result = self._client.add(session_id, value, timeout_ms, deadline=deadline)
        if result == Result.OK or (
            result == Result.ADD_MATCHING_SESSION and self.on_exists == "keep"
        ):
            return WriteStatus.CONFIRMED
        raise StoreError(f"distcache add refused: {Result(result).name}")

    def _store_nowait(
        self, session_id: bytes, value: bytes, timeout_ms: int, deadline: Deadline
    ) -> WriteStatus:
        """Send the ADD. ``SENT`` unless a reply the server sent was read meanwhile (an
        earlier write's, on the reused connection): that is an answer, ``CONFIRMED``."""
        confirmed = self._client.nowait_confirmed
        with self._reporting(), _ADD:
            self._client.add_nowait(session_id, value, timeout_ms, deadline=deadline)
        failures = self._client.nowait_failures
        if failures != self._failures_reported:
            new, self._failures_reported = failures - self._failures_reported, failures
            raise StoreError(f"{new} earlier distcache write(s) not stored")
        if self._client.nowait_confirmed != confirmed:
            return WriteStatus.CONFIRMED
        return WriteStatus.SENT

    @contextlib.contextmanager
    def _reporting(self) -> Iterator[None]:
        """A call that fails has reported the failure: the pipelined writes its broken
        connection took down with it are not reported again by the next :meth:`store`
        (that would count one outage twice, and fail a recovered store's first write)."""
        try:
            yield
        except BaseException:
            self._failures_reported = self._client.nowait_failures
            raise

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return None  # such an id can never have been stored
        if not self._probed and self._auto_probe:
            # Best effort: a failed probe is tried again at the next fetch, and the
            # fetch itself reports whatever is wrong with the server.
            with contextlib.suppress(ClientError):
                self.capabilities(deadline)
        try:  # _reporting() inlined: a generator context per lookup costs a few microseconds
            with _GET:
                return self._client.get(session_id, deadline=deadline)
        except BaseException:
            self._failures_reported = self._client.nowait_failures
            raise

    def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        """TAKE: the session, deleted by the server in the same step (one taker gets it).

        Raises :class:`StoreError` if the server has no TAKE (``supports_take`` False).
        """
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return None
        with self._reporting(), _TAKE:
            self._probe_once(deadline)
            if not self.supports_take:
                raise StoreError(f"distcache server at {self.address} has no atomic take")
            try:
                return self._client.take(session_id, deadline=deadline)
            except ClientError:
                self._probed = False  # the path may have changed: probe again next time
                raise

    def add(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> bool:
        """ADD, waiting for its reply: distcache's ADD never overwrites, and answers
        ``ADD_MATCHING_SESSION`` (False here) when the id is taken."""
        self._check_id(session_id)
        if not value:
            raise StoreError("empty session value")
        timeout_ms = min(MAX_TIMEOUT_MS, max(0, math.ceil(ttl_s * 1000.0)))
        with self._reporting(), _ADD:
            result = self._client.add(session_id, value, timeout_ms, deadline=deadline)
        if result == Result.OK:
            return True
        if result == Result.ADD_MATCHING_SESSION:
            return False
        raise StoreError(f"distcache add refused: {Result(result).name}")

    def delete(self, session_id: bytes, deadline: Deadline) -> None:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return
        with self._reporting(), _REMOVE:
            self._client.remove(session_id, deadline=deadline)

    def contains(self, session_id: bytes, deadline: Deadline | None = None) -> bool:
        """HAVE: whether the server holds ``session_id`` (for tests and health checks).

        Without a deadline, the client's default one applies.
        """
        with self._reporting(), _HAVE:
            return self._client.have(session_id, deadline=deadline)

    def close(self) -> None:
        self._client.close()
