"""A session store backed by distcache: dc_client (local proxy) or dc_server directly."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Literal

from tlscache.exceptions import (
    ClientError,
    ClientTimeout,
    ConfigurationError,
    StoreError,
    StoreTimeout,
)

from .base import MAX_ID_LEN, SessionStore

if TYPE_CHECKING:
    from tlscache.distcache.client import Client

__all__ = ["MAX_TIMEOUT_MS", "DistcacheStore"]

#: dc_server refuses ADD timeouts above 7 days (result 0x66).
MAX_TIMEOUT_MS = 604_800_000

OnExists = Literal["keep", "replace"]


class DistcacheStore(SessionStore):
    """Sessions kept by a distcache server, reached over the blocking client.

    ``address`` is a distcache address (``UNIX:/path`` of a dc_client, or
    ``IP:127.0.0.1:port`` of a dc_server). distcache's ADD never overwrites:
    ``on_exists="keep"`` (default) treats "a session with this id exists" as
    success, since session ids are random and the existing entry is that same
    session; ``"replace"`` removes and re-adds, spending two more round trips.
    distcache has no atomic get-and-delete, so ``supports_take`` is False.
    """

    supports_take = False

    def __init__(
        self,
        address: str,
        *,
        on_exists: OnExists = "keep",
        persistent: bool = True,
        pool_size: int = 8,
        client: Client | None = None,
    ) -> None:
        if on_exists not in ("keep", "replace"):
            raise ConfigurationError("on_exists must be 'keep' or 'replace'")
        if client is None:
            from tlscache.distcache.client import Client

            client = Client(address, persistent=persistent, pool_size=pool_size)
        self.address = address
        self.on_exists: OnExists = on_exists
        self._client = client

    @staticmethod
    def _ms(deadline_s: float) -> float:
        return max(0.001, deadline_s * 1000.0)

    @staticmethod
    def _check_id(session_id: bytes) -> None:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            raise StoreError(f"session id length {len(session_id)} outside 1..{MAX_ID_LEN}")

    def store(self, session_id: bytes, value: bytes, ttl_s: float, deadline_s: float) -> None:
        from tlscache.distcache.protocol import Result

        self._check_id(session_id)
        if not value:
            raise StoreError("empty session value")
        timeout_ms = min(MAX_TIMEOUT_MS, max(0, math.ceil(ttl_s * 1000.0)))
        end = time.monotonic() + deadline_s
        try:
            result = self._client.add(
                session_id, value, timeout_ms, deadline_ms=self._ms(deadline_s)
            )
            if result == Result.ADD_MATCHING_SESSION and self.on_exists == "replace":
                self._client.remove(session_id, deadline_ms=self._ms(end - time.monotonic()))
                result = self._client.add(
                    session_id, value, timeout_ms, deadline_ms=self._ms(end - time.monotonic())
                )
        except ClientTimeout as exc:
            raise StoreTimeout(f"distcache add timed out: {exc}") from exc
        except (ClientError, ValueError, OSError) as exc:
            raise StoreError(f"distcache add failed: {exc}") from exc
        if result == Result.OK or (
            result == Result.ADD_MATCHING_SESSION and self.on_exists == "keep"
        ):
            return
        raise StoreError(f"distcache add refused: {Result(result).name}")

    def fetch(self, session_id: bytes, deadline_s: float) -> bytes | None:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return None  # such an id can never have been stored
        try:
            return self._client.get(session_id, deadline_ms=self._ms(deadline_s))
        except ClientTimeout as exc:
            raise StoreTimeout(f"distcache get timed out: {exc}") from exc
        except (ClientError, ValueError, OSError) as exc:
            raise StoreError(f"distcache get failed: {exc}") from exc

    def delete(self, session_id: bytes, deadline_s: float) -> None:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return
        try:
            self._client.remove(session_id, deadline_ms=self._ms(deadline_s))
        except ClientTimeout as exc:
            raise StoreTimeout(f"distcache remove timed out: {exc}") from exc
        except (ClientError, ValueError, OSError) as exc:
            raise StoreError(f"distcache remove failed: {exc}") from exc

    def contains(self, session_id: bytes, deadline_s: float = 1.0) -> bool:
        """HAVE: whether the server holds ``session_id`` (for tests and health checks)."""
        try:
            return self._client.have(session_id, deadline_ms=self._ms(deadline_s))
        except ClientTimeout as exc:
            raise StoreTimeout(f"distcache have timed out: {exc}") from exc
        except (ClientError, ValueError, OSError) as exc:
            raise StoreError(f"distcache have failed: {exc}") from exc

    def close(self) -> None:
        self._client.close()
