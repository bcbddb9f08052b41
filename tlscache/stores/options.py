"""How a networked store talks to its servers, as one value (in the style of urllib3's
``Timeout`` and ``Retry``).

The memcached and Redis stores take a :class:`RemoteOptions`; a store string's options
(``prefix``, ``timeout_ms``, ``retry``, ``pool``) are read into one by
:func:`tlscache.stores.spec.open_store`. Each field names its store-string option in its
metadata, so an option is declared once here and both the constructors and the string
parser follow. The stores' keyword arguments (``key_prefix=``, ``retry_s=``, ...) still
work: given ones replace the fields of ``options``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from tlscache.exceptions import ConfigurationError

__all__ = ["SPEC_OPTIONS", "RemoteOptions", "SpecOption", "WithRemoteOptions"]

SpecKind = Literal["text", "integer", "number"]


@dataclass(frozen=True)
class SpecOption:
    """How a field is written in a store string: ``name=value``, field = value / ``divisor``."""

    name: str
    kind: SpecKind
    divisor: float = 1.0  #: e.g. 1000 for an option in ms of a field in seconds


def _spec(name: str, kind: SpecKind, divisor: float = 1.0) -> dict[str, SpecOption]:
    return {"spec": SpecOption(name, kind, divisor)}


@dataclass(frozen=True)
class RemoteOptions:
    """The options shared by the memcached and Redis stores (defaults as documented)."""

    #: key = prefix + the id in lowercase hex (Apache's is ``mod_ssl-sess:``)
    key_prefix: str = field(default="tlscache:", metadata=_spec("prefix", "text"))
    #: the longest a new connection may take (never more than the call's deadline)
    connect_timeout_s: float = field(
        default=0.05, metadata=_spec("timeout_ms", "number", divisor=1000.0)
    )
    #: the down period of a server after a failure (see :mod:`tlscache.stores.health`)
    retry_s: float = field(default=5.0, metadata=_spec("retry", "number"))
    #: connections kept per server
    pool_size: int = field(default=8, metadata=_spec("pool", "integer"))

    def __post_init__(self) -> None:
        if not isinstance(self.key_prefix, str):
            raise ConfigurationError("key_prefix must be a string")
        if not (0 < self.connect_timeout_s < math.inf):
            raise ConfigurationError("connect_timeout_s must be a positive number")
        if not (0 <= self.retry_s < math.inf):
            raise ConfigurationError("retry_s must be a number 0 or more")
        if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int):
            raise ConfigurationError("pool_size must be a whole number")
        if self.pool_size < 0:
            raise ConfigurationError("pool_size must be 0 or more")

    def merged(self, **changes: object) -> RemoteOptions:
        """A copy with the given fields replaced; None leaves a field as it is."""
        given: dict[str, Any] = {k: v for k, v in changes.items() if v is not None}
        try:
            return dataclasses.replace(self, **given)
        except TypeError as exc:  # a keyword that is not a field
            raise ConfigurationError(str(exc)) from None

    @classmethod
    def from_spec(cls, values: Mapping[str, object]) -> RemoteOptions:
        """The options from a store string's values by option name (None: not given)."""
        changes: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            spec: SpecOption = f.metadata["spec"]
            value = values.get(spec.name)
            if value is None:
                continue
            if spec.kind == "number" and isinstance(value, int | float):
                value = float(value) / spec.divisor
            changes[f.name] = value
        return cls().merged(**changes)


#: The store-string options of the networked stores, by name, in field order.
SPEC_OPTIONS: Final[Mapping[str, SpecOption]] = {
    f.metadata["spec"].name: f.metadata["spec"] for f in dataclasses.fields(RemoteOptions)
}


class WithRemoteOptions:
    """A store's options as read-only attributes (``store.retry_s``, ...), as before they
    were one value."""

    options: RemoteOptions

    @property
    def key_prefix(self) -> str:
        return self.options.key_prefix

    @property
    def connect_timeout_s(self) -> float:
        return self.options.connect_timeout_s

    @property
    def retry_s(self) -> float:
        return self.options.retry_s

    @property
    def pool_size(self) -> int:
        return self.options.pool_size
