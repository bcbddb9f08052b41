"""Every exception tlscache raises, in one place.

Callers catch ``TlsCacheError`` to handle anything of ours; the subclasses say
which layer failed so that operators can tell a bad peer from a dead cache.
:func:`describe_error` is how every layer logs an exception it swallows.
"""

from __future__ import annotations

import os
from typing import Literal


class TlsCacheError(Exception):
    """Base class of every tlscache exception."""


class AddressError(TlsCacheError, ValueError):
    """A distcache address string (``IP:host:port``, ``UNIX:/path``, ...) is malformed."""


class ProtocolError(TlsCacheError):
    """The peer sent bytes that are not valid distcache protocol.

    The connection that carried them must be closed; nothing else is affected.
    ``reason`` is a short, log-friendly description.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ClientError(TlsCacheError):
    """A distcache client call failed (connection refused, reset, bad reply)."""


class ClientTimeout(ClientError, TimeoutError):
    """A distcache client call did not complete before its deadline."""


class TakeUnsupported(ClientError):
    """TAKE was asked of a server (or a path through dc_client) whose capability probe
    did not offer it: it would close the connection for an unknown operation."""


class ServerUnavailable(ClientError):
    """dc_client answered that it has no connection to dc_server (empty reply),
    or that the connection dropped with the request outstanding (result 0x02)."""


class StoreError(TlsCacheError):
    """A session store could not complete an operation."""


class StoreTimeout(StoreError, TimeoutError):
    """A session store did not answer before its deadline."""


#: Why a sealed value did not open; each reason has its own counter.
SealFailure = Literal["malformed", "unknown_key", "retired_key", "tampered", "expired"]


class SealError(StoreError):
    """A value from the store failed authentication or could not be decoded.

    ``failure`` says which check refused it. A sealed value that fails to open
    is a miss: it never crashes anything and never reaches OpenSSL.
    """

    def __init__(self, failure: SealFailure, reason: str) -> None:
        super().__init__(reason)
        self.failure: SealFailure = failure
        self.reason = reason


class KeyRingError(TlsCacheError):
    """A key ring file is missing, unsafe (readable by others) or malformed."""


class ResolverError(TlsCacheError):
    """The OpenSSL functions tlscache needs could not be located and verified
    for the OpenSSL instance that pyOpenSSL uses. ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigurationError(TlsCacheError, ValueError):
    """An option or argument is out of range or inconsistent."""


def describe_error(exc: BaseException) -> str:
    """``exc``'s type and innermost source location, for logs: never its message or
    traceback text, which a store (or a wrapper) may have built from a session value."""
    tb = exc.__traceback__
    if tb is None:
        return type(exc).__name__
    while tb.tb_next is not None:
        tb = tb.tb_next
    name = os.path.basename(tb.tb_frame.f_code.co_filename)
    return f"{type(exc).__name__} at {name}:{tb.tb_lineno}"
