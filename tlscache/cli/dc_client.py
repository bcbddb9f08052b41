"""dc_client: the local multiplexing proxy in front of dc_server.

Applications connect to it locally (``-listen``, default ``UNIX:/tmp/scache``)
as often as they like; it carries all their requests over one persistent
connection to ``-server``. Switches are the C tool's; the ``--`` options are
tlscache extras.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
from collections.abc import Sequence

from tlscache.cli.daemon import add_process_options, after_listen
from tlscache.cli.options import Parser, address, connect_address, fail, int_range
from tlscache.distcache.address import Address, listen
from tlscache.distcache.proxy import (
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_REQUEST_TIMEOUT_MS,
    DEFAULT_RETRY_MS,
    ProxyServer,
)

DEFAULT_LISTEN = "UNIX:/tmp/scache"

_LEVELS = {
    logging.DEBUG: "Debug",
    logging.INFO: "Info",
    logging.WARNING: "Warning",
    logging.ERROR: "Error",
    logging.CRITICAL: "Error",
}


class _CStyle(logging.Formatter):
    """``Error, ...`` / ``Info, ...`` lines, as the C tools print them."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{_LEVELS.get(record.levelno, record.levelname)}, {record.getMessage()}"


def build_parser() -> Parser:
    parser = Parser(
        "dc_client",
        "Accept many local distcache connections and multiplex their requests over one "
        "connection to dc_server.",
    )
    parser.add_argument(
        "-listen",
        metavar="ADDR",
        type=address,
        default=None,
        help=f"local address to accept clients on (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "-server",
        "-connect",
        dest="server",
        metavar="ADDR",
        action="append",
        type=connect_address,
        help="the dc_server to forward to (required)",
    )
    parser.add_argument(
        "-retry",
        metavar="MS",
        type=int_range(1, 3_600_000),
        default=DEFAULT_RETRY_MS,
        help=f"reconnect period in ms (default {DEFAULT_RETRY_MS})",
    )
    parser.add_argument(
        "-idle",
        metavar="MS",
        type=int_range(0, 3_600_000),
        default=0,
        help="close local connections idle for MS ms (default 0: never)",
    )
    add_process_options(parser)
    parser.add_argument(
        "--request-timeout",
        metavar="MS",
        type=int_range(1, 3_600_000),
        default=DEFAULT_REQUEST_TIMEOUT_MS,
        help="answer 0x02 and reset the server connection when a request gets no answer "
        f"within MS ms (default {DEFAULT_REQUEST_TIMEOUT_MS}; C waits forever)",
    )
    parser.add_argument(
        "--max-in-flight",
        metavar="N",
        type=int_range(1, 65536),
        default=DEFAULT_MAX_IN_FLIGHT,
        help=f"requests outstanding at the server at once (default {DEFAULT_MAX_IN_FLIGHT}; "
        "1 reproduces C's one-at-a-time forwarding, safest with the C dc_server)",
    )
    parser.add_argument(
        "--max-clients",
        metavar="N",
        type=int_range(1, 1_000_000),
        default=DEFAULT_MAX_CLIENTS,
        help=f"local connections at once; more are closed (default {DEFAULT_MAX_CLIENTS})",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (default auto: uvloop if installed)",
    )
    parser.add_argument("--verbose", action="store_true", help="also log informational messages")
    return parser


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                fail("--loop uvloop requested but uvloop is not installed")
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


def _remove_socket(addr: Address, inode: int | None) -> None:
    """Remove the unix socket file we created, unless something else replaced it."""
    if addr.kind != "unix" or inode is None:
        return
    with contextlib.suppress(OSError):
        st = os.lstat(addr.path)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
            os.unlink(addr.path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.server:
        fail("no server specified!")
    if len(args.server) > 1:
        fail("-server/-connect given more than once")
    server_addr: Address = args.server[0]
    listen_addr: Address = args.listen or address(DEFAULT_LISTEN)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CStyle())
    logger = logging.getLogger("tlscache.dc_client")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    logger.propagate = False

    # Signals are in place before the socket is: a stop request that arrives
    # while we start up is honoured before the event loop would run.
    early_stop: list[int] = []
    stop_signals = [signal.SIGTERM, signal.SIGINT]
    if args.killable:
        stop_signals += [signal.SIGUSR1, signal.SIGUSR2]
    else:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    for sig in stop_signals:
        signal.signal(sig, lambda signum, frame: early_stop.append(signum))

    try:
        sock = listen(listen_addr, owner=args.sockowner, group=args.sockgroup, perms=args.sockperms)
    except (OSError, ValueError, KeyError) as exc:
        fail(f"bad listen address {listen_addr}: {exc}")
    inode: int | None = None
    if listen_addr.kind == "unix":
        with contextlib.suppress(OSError):
            inode = os.lstat(listen_addr.path).st_ino

    try:
        after_listen(args.daemon, args.pidfile, args.user)
        loop = _new_loop(args.loop)
        try:
            proxy = ProxyServer(
                sock,
                server_addr,
                retry_ms=args.retry,
                idle_ms=args.idle,
                request_timeout_ms=args.request_timeout,
                max_in_flight=args.max_in_flight,
                max_clients=args.max_clients,
            )
            for sig in stop_signals:
                loop.add_signal_handler(sig, proxy.stop)
            if not early_stop:
                loop.run_until_complete(proxy.serve())
        finally:
            loop.close()
    finally:
        sock.close()
        _remove_socket(listen_addr, inode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
