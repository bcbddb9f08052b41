"""dc_server: the distcache session cache server.

Same switches as the C dc_server, plus a few of our own (``--read-timeout``,
``--max-connections``, ``--max-bytes``, ``--allow-large``, ``--loop``). Unlike
C, every start-up failure exits with status 1.
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
from tlscache.distcache.address import Address
from tlscache.distcache.server import (
    DEFAULT_READ_TIMEOUT,
    configure_logging,
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
        "refuse connections beyond N at a time (default: no limit but file descriptors)",
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
    table = SessionTable(args.sessions, args.max_bytes, allow_large=args.allow_large)
    factory = checked_loop_factory(args.loop)
    # From here on (clients may connect as soon as the listener exists) a stop
    # signal means a clean exit, and SIGUSR1/2 are ignored unless -killable.
    signals = StopSignals(args.killable)
    raise_fd_limit()
    configure_logging()
    sockets = _listen_all(args.listen, args.sockowner, args.sockgroup, args.sockperms)
    if not args.quiet:
        log.info(
            "Info, dc_server listening on %s (capacity %d sessions, %s event loop)",
            ", ".join(str(addr) for addr in args.listen),
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
            read_timeout=args.read_timeout or None,
            max_connections=args.max_connections,
            progress=args.progress,
            stats=not args.quiet,
        )
    sys.exit(0)


if __name__ == "__main__":
    main()
