"""memcached's meta protocol, the few commands a session store needs: sans-IO.

Requests are encoded to bytes (``mg``, ``ms``, ``md``, ``mn``); replies are read by a
:class:`ReplyParser` fed whatever bytes arrived and returning typed :class:`Reply`
records. No sockets and no clock: the blocking shell in
:mod:`tlscache.memcache.connection` moves the bytes.

Hand-written because no maintained Python client speaks the meta protocol (pymemcache
4.0 has no meta commands), and the meta protocol is the only one with a compare-and-delete
(``md <key> C<cas>``), which an atomic take needs. Only what memcached 1.6 documents in
``doc/protocol.txt`` is accepted; anything else raises
:class:`~tlscache.exceptions.ProtocolError`, whose text never quotes the server's bytes.
"""

from __future__ import annotations

import enum
import re
from typing import Final, NamedTuple

from tlscache.exceptions import ProtocolError

__all__ = [
    "MAX_KEY_LEN",
    "MAX_LINE_LEN",
    "MAX_RELATIVE_TTL",
    "MAX_VALUE_LEN",
    "Reply",
    "ReplyKind",
    "ReplyParser",
    "ServerAddress",
    "check_key",
    "delete_request",
    "expiry",
    "get_request",
    "noop_request",
    "parse_server",
    "set_request",
]

#: memcached refuses longer keys.
MAX_KEY_LEN: Final = 250
#: The longest TTL memcached reads as relative seconds; larger ones are absolute Unix times.
MAX_RELATIVE_TTL: Final = 30 * 24 * 3600
#: The largest absolute expiry memcached parses (a signed 32-bit time).
MAX_ABSOLUTE_EXPIRY: Final = 2**31 - 1
#: The longest reply line the parser waits for (flags included) before calling it garbage.
MAX_LINE_LEN: Final = 2048
#: The largest value the parser accepts by default (memcached's default item size limit).
MAX_VALUE_LEN: Final = 1024 * 1024

_CRLF: Final = b"\r\n"
#: Bytes memcached does not allow in a key: whitespace and control characters.
_BAD_KEY_BYTE: Final = re.compile(rb"[\x00-\x20\x7f]")


class ReplyKind(enum.Enum):
    """The reply codes of the meta commands (and the errors any command may get)."""

    VALUE = "VA"  #: mg hit with a value
    HEADER = "HD"  #: success without a value (mg hit without ``v``, ms stored, md deleted)
    MISS = "EN"  #: mg miss
    NOT_FOUND = "NF"  #: md/ms (with a mode needing the item): no such item
    NOT_STORED = "NS"  #: ms: not stored (e.g. add of an existing key)
    EXISTS = "EX"  #: ms/md with ``C<cas>``: the item changed meanwhile
    NOOP = "MN"  #: mn
    ERROR = "ERROR"  #: unknown command
    CLIENT_ERROR = "CLIENT_ERROR"  #: the server refused the request's syntax
    SERVER_ERROR = "SERVER_ERROR"  #: the server failed (e.g. out of memory)


_FLAG_CODES: Final = {
    k.value.encode(): k
    for k in ReplyKind
    if k not in (ReplyKind.ERROR, ReplyKind.CLIENT_ERROR, ReplyKind.SERVER_ERROR)
}
_ERROR_CODES: Final = {
    b"ERROR": ReplyKind.ERROR,
    b"CLIENT_ERROR": ReplyKind.CLIENT_ERROR,
    b"SERVER_ERROR": ReplyKind.SERVER_ERROR,
}


class Reply(NamedTuple):
    """One parsed reply. ``cas`` and ``ttl`` are set when the request asked for them."""

    kind: ReplyKind
    value: bytes | None = None  #: the data of a ``VA`` reply
    cas: int | None = None  #: ``c`` flag
    ttl: int | None = None  #: ``t`` flag (-1: never expires)
    opaque: bytes | None = None  #: ``O`` flag, echoed as sent

    @property
    def is_error(self) -> bool:
        return self.kind in (ReplyKind.ERROR, ReplyKind.CLIENT_ERROR, ReplyKind.SERVER_ERROR)


class ServerAddress(NamedTuple):
    """A memcached server: TCP ``host``/``port``, or a unix socket ``path``."""

    text: str  #: as configured
    host: str | None
    port: int | None
    path: str | None

    @property
    def is_unix(self) -> bool:
        return self.path is not None


def parse_server(text: str) -> ServerAddress:
    """``host:port``, ``[v6addr]:port`` or a unix socket path (anything with a ``/``)."""
    if "/" in text:
        return ServerAddress(text, None, None, text)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("an IPv6 server is written [address]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("a server is host:port, [v6addr]:port or a socket path")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("a server needs a host and a port in 1..65535")
    return ServerAddress(text, host, int(port_text), None)


def check_key(key: bytes) -> bytes:
    """``key`` if memcached accepts it as is: 1..250 bytes, no whitespace or control chars."""
    if not 0 < len(key) <= MAX_KEY_LEN:
        raise ValueError(f"memcached key length {len(key)} outside 1..{MAX_KEY_LEN}")
    if _BAD_KEY_BYTE.search(key) is not None:
        raise ValueError("memcached keys may not hold whitespace or control characters")
    return key


def expiry(ttl_s: float, now_unix: float) -> int:
    """The ``T`` token for a TTL of ``ttl_s`` (> 0) seconds at wall-clock ``now_unix``.

    At least 1 (0 means "never expires"); above 30 days memcached reads the number as an
    absolute Unix time, so such TTLs are sent as one (capped at the largest it parses).
    """
    if ttl_s <= 0:
        raise ValueError("a stored value needs a positive ttl")
    seconds = max(1, int(-(-ttl_s // 1)))  # ceil, so the value never outlives less
    if seconds <= MAX_RELATIVE_TTL:
        return seconds
    return min(MAX_ABSOLUTE_EXPIRY, int(now_unix) + seconds)


def get_request(key: bytes, *, cas: bool = False) -> bytes:
    """``mg <key> v [c]``: the value (and its CAS with ``cas``); ``EN`` on a miss."""
    return b"mg " + check_key(key) + (b" v c\r\n" if cas else b" v\r\n")


def set_request(key: bytes, value: bytes, expires: int, *, add: bool = False) -> bytes:
    """``ms <key> <len> T<expires>``: store (add or replace); ``HD`` when stored.

    ``expires`` is the ``T`` token from :func:`expiry`, never 0 (that would never expire).
    ``add`` sets mode ``ME`` (add): stored only if the key is absent, else ``NS``.
    """
    if expires <= 0:
        raise ValueError("expiry must be positive (0 would never expire)")
    mode = b" ME" if add else b""
    head = b"ms %s %d T%d%s\r\n" % (check_key(key), len(value), expires, mode)
    return head + value + _CRLF


def delete_request(key: bytes, *, cas: int | None = None) -> bytes:
    """``md <key> [C<cas>]``: ``HD`` deleted, ``NF`` absent, ``EX`` changed since ``cas``."""
    if cas is None:
        return b"md " + check_key(key) + _CRLF
    if cas < 0:
        raise ValueError("cas must not be negative")
    return b"md %s C%d\r\n" % (check_key(key), cas)


def noop_request() -> bytes:
    """``mn``: answered ``MN`` once every earlier request on the connection is answered."""
    return b"mn\r\n"


class ReplyParser:
    """Turns the bytes of a connection into :class:`Reply` records, in order.

    Feed it any fragments; it keeps what it cannot parse yet. After a
    :class:`ProtocolError` the connection is out of step and must be closed.
    """

    __slots__ = ("_buf", "_max_value", "_pending", "_pending_size")

    def __init__(self, max_value: int = MAX_VALUE_LEN) -> None:
        self._buf = bytearray()
        self._max_value = max_value
        self._pending: Reply | None = None  # a VA header whose data is still arriving
        self._pending_size = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a reply."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Reply]:
        """The replies completed by ``data`` (possibly none)."""
        if not self._buf and self._pending is None and data[:3] == b"VA ":
            one = self._one_value(data)
            if one is not None:
                return [one]
        self._buf += data
        replies: list[Reply] = []
        while (reply := self._next()) is not None:
            replies.append(reply)
        return replies

    def _one_value(self, data: bytes) -> Reply | None:
        """The reply ``data`` holds if it is exactly one ``VA <size>`` reply without flags
        (the answer to a plain ``mg <key> v``), else None and nothing consumed: the
        commonest read of all, a session lookup's hit, without the buffer's copies."""
        end = data.find(_CRLF, 3, MAX_LINE_LEN + 2)
        if end < 0:
            return None
        token = data[3:end]
        if not token.isdigit() or len(token) > 20:
            return None  # flags follow the size, or a malformed size: the full parser decides
        size = int(token)
        start = end + 2
        if size > self._max_value or len(data) != start + size + 2 or data[-2:] != _CRLF:
            return None
        return Reply(ReplyKind.VALUE, data[start : start + size])

    def _next(self) -> Reply | None:
        if self._pending is not None:
            return self._finish_value(self._pending)
        end = self._buf.find(_CRLF, 0, MAX_LINE_LEN + 2)
        if end < 0:
            if len(self._buf) > MAX_LINE_LEN:
                raise ProtocolError("memcached reply line too long")
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return self._parse_line(line)

    def _finish_value(self, head: Reply) -> Reply | None:
        size = self._pending_size
        if len(self._buf) < size + 2:
            return None
        if self._buf[size : size + 2] != _CRLF:
            raise ProtocolError("memcached value not followed by CRLF")
        data = bytes(self._buf[:size])
        del self._buf[: size + 2]
        self._pending = None
        return head._replace(value=data)

    def _parse_line(self, line: bytes) -> Reply | None:
        code, _, rest = line.partition(b" ")
        if code in _ERROR_CODES:
            # The rest is the server's text: kept out of the record, never logged.
            return Reply(_ERROR_CODES[code])
        kind = _FLAG_CODES.get(code)
        if kind is None:
            raise ProtocolError("unknown memcached reply code")
        tokens = rest.split(b" ") if rest else []
        if any(not t for t in tokens):
            raise ProtocolError("empty token in memcached reply")
        if kind is ReplyKind.NOOP and tokens:
            raise ProtocolError("memcached MN reply with flags")
        if kind is not ReplyKind.VALUE:
            return _with_flags(Reply(kind), tokens)
        if not tokens:
            raise ProtocolError("memcached VA reply without a size")
        size = _number(tokens[0], "value size")
        if size > self._max_value:
            raise ProtocolError("memcached value larger than allowed")
        self._pending = _with_flags(Reply(kind), tokens[1:])
        self._pending_size = size
        return self._finish_value(self._pending)


def _number(token: bytes, what: str) -> int:
    if not token.isdigit() or len(token) > 20:
        raise ProtocolError(f"memcached {what} is not a number")
    return int(token)


def _with_flags(reply: Reply, tokens: list[bytes]) -> Reply:
    cas = ttl = None
    opaque = None
    for token in tokens:
        flag, arg = token[:1], token[1:]
        if not flag.isalpha():
            raise ProtocolError("malformed flag in memcached reply")
        if flag == b"c":
            cas = _number(arg, "cas")
        elif flag == b"t":
            ttl = -1 if arg == b"-1" else _number(arg, "ttl")
        elif flag == b"O":
            opaque = arg
        # Other flags (k, f, s, h, l, b, W, X, Z...) carry nothing this store reads.
    return reply._replace(cas=cas, ttl=ttl, opaque=opaque)
