"""dc_server: the distcache session cache server.

Same switches as the C dc_server, plus a few of our own (``--read-timeout``,
``--max-connections``, ``--max-in-flight``, ``--output-budget``,
``--max-buffered``, ``--max-bytes``, ``--allow-large``, ``--loop``), and mutual TLS
(``-tls-cert``, ``-tls-key``, ``-tls-ca``, ``--tls-handshake-timeout``; see
:mod:`tlscache.cli.tlsoptions`). Unlike C, every start-up failure exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from tlscache.cli.daemon import add_process_options, after_listen
from tlscache.cli.options import Parser, address, fail
from tlscache.cli.runtime import StopSignals, add_loop_option, checked_loop_factory, loop_name
from tlscache.cli.tlsoptions import add_listen_tls_options, listen_tls
from tlscache.distcache.address import Address
from tlscache.distcache.server import (
    DEFAULT_MAX_BUFFERED,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_OUTPUT_BUDGET,
    DEFAULT_READ_TIMEOUT,
    FD_RESERVE,
    configure_logging,
    default_max_connections,
    log,
    raise_fd_limit,
    run,
)
from tlscache.distcache.sockets import listen
from tlscache.distcache.table import (
    DEFAULT_SESSIONS,
    MAX_SESSIONS,
    MAX_SESSIONS_LARGE,
    MIN_SESSIONS,
    SessionTable,
)
from tlscache.exceptions import TlsCacheError


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400 or value != value:
        raise argparse.ArgumentTypeError(f"{text} out of range (0..86400 seconds)")
    return value


class _ServerParser(Parser):
    """The dc_server parser: C's own words when the one required switch is missing."""

    def error(self, message: str) -> NoReturn:
        # -listen is the only required switch, so argparse can only mean it here.
        if message.startswith("the following arguments are required"):
            message = "must provide -listen"
        super().error(message)


def build_parser() -> Parser:
    parser = _ServerParser(
        "dc_server",
        "Serve a distcache session cache on the given addresses "
        "(IP:host:port, IP:port, UNIX:path, FD:n).",
    )
    parser.add_argument(
        "-listen",
        metavar="ADDR",
        type=address,
        action="append",
        required=True,
        help="address to accept connections on (required; may be repeated)",
    )
    parser.add_number(
        "-sessions",
        1,
        MAX_SESSIONS_LARGE,
        DEFAULT_SESSIONS,
        f"cache capacity in sessions ({MIN_SESSIONS}..{MAX_SESSIONS}; default {DEFAULT_SESSIONS})",
    )
    parser.add_number(
        "-progress",
        0,
        1_000_000,
        0,
        "also print statistics each time the operation count crosses a multiple of N",
    )
    add_process_options(parser)
    add_listen_tls_options(parser)
    parser.add_argument(
        "--allow-large",
        action="store_true",
        help=f"allow -sessions above {MAX_SESSIONS} (up to {MAX_SESSIONS_LARGE})",
    )
    parser.add_number(
        "--max-bytes",
        1,
        1 << 48,
        None,
        "also bound the cache by total id + data bytes (soonest-expiring evicted first)",
        metavar="BYTES",
    )
    parser.add_argument(
        "--read-timeout",
        metavar="SECONDS",
        type=_seconds,
        default=DEFAULT_READ_TIMEOUT,
        help="drop a peer that stalls inside a message (or stops reading) this long; "
        f"0 disables (default {DEFAULT_READ_TIMEOUT:g})",
    )
    parser.add_number(
        "--max-connections",
        1,
        10_000_000,
        None,
        "at most N connections at a time; at the cap the longest-idle ones are closed to "
        "make room, and newcomers are refused only when none is idle (default: the "
        f"file descriptor limit, raised to the hard limit, minus {FD_RESERVE})",
    )
    parser.add_number(
        "--max-in-flight",
        1,
        1 << 20,
        DEFAULT_MAX_IN_FLIGHT,
        "requests one connection may have received but not answered; a read holds at most "
        f"this many (default {DEFAULT_MAX_IN_FLIGHT})",
    )
    parser.add_number(
        "--output-budget",
        1,
        1 << 30,
        DEFAULT_OUTPUT_BUDGET,
        "answer bytes one connection gets per turn before the others are served; a peer "
        f"that does not read holds at most about this much (default {DEFAULT_OUTPUT_BUDGET})",
        metavar="BYTES",
    )
    parser.add_number(
        "--max-buffered",
        1,
        1 << 40,
        DEFAULT_MAX_BUFFERED,
        "answer bytes waiting for slow readers, all connections together; beyond it "
        f"pipelined requests wait (default {DEFAULT_MAX_BUFFERED})",
        metavar="BYTES",
    )
    add_loop_option(parser)
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print neither the start-up line nor the statistics line (warnings still)",
    )
    return parser


def _listen_all(
    addresses: Sequence[Address], owner: str | None, group: str | None, perms: int | None
) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        for addr in addresses:
            try:
                sockets.append(listen(addr, owner=owner, group=group, perms=perms))
            except (OSError, KeyError, TlsCacheError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                fail(f"cannot listen on {addr}: {reason}")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    top = MAX_SESSIONS_LARGE if args.allow_large else MAX_SESSIONS
    if not MIN_SESSIONS <= args.sessions <= top:
        hint = "" if args.allow_large else f" (use --allow-large for more than {MAX_SESSIONS})"
        fail(f"-sessions {args.sessions} out of range ({MIN_SESSIONS}..{top}){hint}")
    tls = listen_tls(args, args.listen)
    table = SessionTable(args.sessions, args.max_bytes, allow_large=args.allow_large)
    factory = checked_loop_factory(args.loop)
    # From here on (clients may connect as soon as the listener exists) a stop
    # signal means a clean exit, and SIGUSR1/2 are ignored unless -killable.
    signals = StopSignals(args.killable)
    fd_limit = raise_fd_limit()
    max_connections = args.max_connections or default_max_connections(fd_limit)
    configure_logging()
    sockets = _listen_all(args.listen, args.sockowner, args.sockgroup, args.sockperms)
    if not args.quiet:
        log.info(
            "Info, dc_server listening on %s%s (capacity %d sessions, %s event loop)",
            ", ".join(str(addr) for addr in args.listen),
            " with mutual TLS" if tls is not None else "",
            args.sessions,
            loop_name(factory),
        )
    after_listen(args.daemon, args.pidfile, args.user)
    stop = asyncio.Event()

    def ready() -> None:
        signals.attach(asyncio.get_running_loop(), stop.set)

    if signals.requested:  # stopped while starting up
        for sock in sockets:
            sock.close()
        sys.exit(0)
    with contextlib.suppress(KeyboardInterrupt):
        run(
            sockets,
            table,
            loop=args.loop,
            ready=ready,
            stop=stop,
            tls=tls,
            read_timeout=args.read_timeout or None,
            max_connections=max_connections,
            max_in_flight=args.max_in_flight,
            output_budget=args.output_budget,
            max_buffered=args.max_buffered,
            progress=args.progress,
            stats=not args.quiet,
        )
    sys.exit(0)


if __name__ == "__main__":
    main()
