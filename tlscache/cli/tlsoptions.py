"""The mutual-TLS switches of the dc_* tools, spelled once for all of them.

dc_server takes ``-tls-cert FILE -tls-key FILE -tls-ca FILE`` for its listeners; the
tools that connect to a server (dc_client, dc_test) take ``-server-tls-cert``,
``-server-tls-key``, ``-server-tls-ca`` and ``-server-tls-name``. The three files go
together: giving only some of them is an error, not a plain-TCP fallback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tlscache.cli.options import Parser, fail
from tlscache.distcache.address import Address
from tlscache.distcache.linktls import DEFAULT_HANDSHAKE_TIMEOUT, LinkTLS
from tlscache.exceptions import ConfigurationError

__all__ = ["add_listen_tls_options", "add_server_tls_options", "listen_tls", "server_tls"]


def add_listen_tls_options(parser: Parser) -> None:
    """``-tls-cert``/``-tls-key``/``-tls-ca``: serve mutual TLS on every listener."""
    parser.add_argument(
        "-tls-cert",
        metavar="FILE",
        type=Path,
        help="serve TLS 1.3 with this certificate chain (PEM); needs -tls-key and -tls-ca, "
        "and IP: listen addresses only",
    )
    parser.add_argument("-tls-key", metavar="FILE", type=Path, help="private key (PEM)")
    parser.add_argument(
        "-tls-ca",
        metavar="FILE",
        type=Path,
        help="accept only clients with a certificate issued by this CA (PEM)",
    )
    parser.add_argument(
        "--tls-handshake-timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        help="close a connection whose TLS handshake is not done in this time "
        f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g})",
    )


def add_server_tls_options(parser: Parser) -> None:
    """``-server-tls-*``: mutual TLS on the connection to the server."""
    parser.add_argument(
        "-server-tls-cert",
        metavar="FILE",
        type=Path,
        help="talk TLS 1.3 to the server, presenting this certificate chain (PEM); needs "
        "-server-tls-key and -server-tls-ca",
    )
    parser.add_argument("-server-tls-key", metavar="FILE", type=Path, help="private key (PEM)")
    parser.add_argument(
        "-server-tls-ca",
        metavar="FILE",
        type=Path,
        help="accept only a server certificate issued by this CA (PEM)",
    )
    parser.add_argument(
        "-server-tls-name",
        metavar="NAME",
        help="name the server's certificate must carry (default: the host of the server "
        "address; an IP address must be an IP subjectAltName)",
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} out of range (0..3600 seconds, not 0)")
    return value


def _link(
    prefix: str,
    cert: Path | None,
    key: Path | None,
    ca: Path | None,
    name: str | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> LinkTLS | None:
    given = {"cert": cert, "key": key, "ca": ca}
    if all(value is None for value in given.values()):
        if name is not None:
            fail(f"{prefix}-name needs {prefix}-cert, {prefix}-key and {prefix}-ca")
        return None
    missing = [f"{prefix}-{what}" for what, value in given.items() if value is None]
    if missing or cert is None or key is None or ca is None:
        fail(f"TLS needs {prefix}-cert, {prefix}-key and {prefix}-ca; missing {', '.join(missing)}")
    try:
        tls = LinkTLS(cert, key, ca, server_name=name, handshake_timeout=handshake_timeout)
        tls.client_context() if prefix.startswith("-server") else tls.server_context()
    except ConfigurationError as exc:
        fail(str(exc))
    return tls


def listen_tls(args: argparse.Namespace, listen: Sequence[Address]) -> LinkTLS | None:
    """dc_server's TLS settings, checked (files readable, every listener TCP); or None.

    Exits with ``Error, ...`` when they are incomplete or unusable.
    """
    tls = _link("-tls", args.tls_cert, args.tls_key, args.tls_ca, None, args.tls_handshake_timeout)
    if tls is not None:
        for addr in listen:
            try:
                tls.check_address(addr)
            except ConfigurationError as exc:
                fail(str(exc))
    return tls


def server_tls(args: argparse.Namespace, server: Address) -> LinkTLS | None:
    """A connecting tool's TLS settings for ``server``, checked; or None."""
    tls = _link(
        "-server-tls",
        args.server_tls_cert,
        args.server_tls_key,
        args.server_tls_ca,
        args.server_tls_name,
    )
    if tls is not None:
        try:
            tls.server_hostname(server)
        except ConfigurationError as exc:
            fail(str(exc))
    return tls
