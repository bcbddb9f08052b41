"""dc_client: the local multiplexing proxy in front of dc_server.

Applications connect to it locally (``-listen``, default ``UNIX:/tmp/scache``)
as often as they like; it carries all their requests over one persistent
connection to ``-server``. Switches are the C tool's; the ``--`` options are
tlscache extras.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from tlscache.cli.daemon import add_process_options, after_listen
from tlscache.cli.options import (
    Parser,
    add_server_option,
    address,
    int_range,
    one_server,
)
from tlscache.cli.runtime import (
    StopSignals,
    add_loop_option,
    listen_or_exit,
    new_loop,
    remove_socket_file,
    socket_file_inode,
)
from tlscache.cli.tlsoptions import add_server_tls_options, server_tls
from tlscache.distcache.address import Address
from tlscache.distcache.multiplexer import (
    DEFAULT_CLIENT_IN_FLIGHT,
    DEFAULT_CLIENT_OUTPUT_BUDGET,
    DEFAULT_EVICT_IDLE_MS,
    DEFAULT_MAX_BUFFERED,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_IN_FLIGHT_BYTES,
    DEFAULT_REQUEST_TIMEOUT_MS,
    DEFAULT_RETRY_MS,
    DEFAULT_WRITE_STALL_MS,
    ProxyLimits,
)
from tlscache.distcache.proxy import ProxyServer

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
    add_server_option(parser, "the dc_server to forward to (required)")
    add_server_tls_options(parser)
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
        "1 reproduces C's one-at-a-time forwarding)",
    )
    parser.add_argument(
        "--max-in-flight-bytes",
        metavar="BYTES",
        type=int_range(1, 1 << 30),
        default=DEFAULT_MAX_IN_FLIGHT_BYTES,
        help="request bytes outstanding at the server at once; one request always goes "
        f"(default {DEFAULT_MAX_IN_FLIGHT_BYTES}: big ADDs cannot queue megabytes ahead "
        "of other clients' lookups)",
    )
    parser.add_argument(
        "--pipeline",
        choices=("probe", "on", "off"),
        default="probe",
        help="forward many requests at once only to a server that says it can (probe, the "
        "default: a C dc_server gets one at a time), always (on) or never (off)",
    )
    parser.add_argument(
        "--max-clients",
        metavar="N",
        type=int_range(1, 1_000_000),
        default=DEFAULT_MAX_CLIENTS,
        help=f"local connections at once (default {DEFAULT_MAX_CLIENTS}); at the limit a new "
        "connection displaces the one idle longest (see --evict-idle), else it is closed",
    )
    parser.add_argument(
        "--evict-idle",
        metavar="MS",
        type=int_range(0, 3_600_000),
        default=DEFAULT_EVICT_IDLE_MS,
        help="at --max-clients, a connection idle this long may be displaced by a new one "
        f"(default {DEFAULT_EVICT_IDLE_MS})",
    )
    parser.add_argument(
        "--client-in-flight",
        metavar="N",
        type=int_range(1, 65536),
        default=DEFAULT_CLIENT_IN_FLIGHT,
        help="requests of one local connection outstanding at the server at once; scarce "
        f"slots are shared round-robin (default {DEFAULT_CLIENT_IN_FLIGHT})",
    )
    parser.add_argument(
        "--client-output-budget",
        metavar="BYTES",
        type=int_range(4096, 1 << 30),
        default=DEFAULT_CLIENT_OUTPUT_BUDGET,
        help="unsent answers a local connection may hold before it is no longer read or "
        f"forwarded for (default {DEFAULT_CLIENT_OUTPUT_BUDGET})",
    )
    parser.add_argument(
        "--write-stall-timeout",
        metavar="MS",
        type=int_range(1, 3_600_000),
        default=DEFAULT_WRITE_STALL_MS,
        help="close a local connection that stays over its output budget this long "
        f"(default {DEFAULT_WRITE_STALL_MS})",
    )
    parser.add_argument(
        "--max-buffered",
        metavar="BYTES",
        type=int_range(65536, 1 << 40),
        default=DEFAULT_MAX_BUFFERED,
        help="unsent answers of all local connections together; over it the connections "
        f"holding the most are closed (default {DEFAULT_MAX_BUFFERED})",
    )
    add_loop_option(parser)
    parser.add_argument("--verbose", action="store_true", help="also log informational messages")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server_addr = one_server(args)
    tls = server_tls(args, server_addr)
    listen_addr: Address = args.listen or address(DEFAULT_LISTEN)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CStyle())
    logger = logging.getLogger("tlscache.dc_client")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    logger.propagate = False

    # Signals are in place before the socket is: a stop request that arrives
    # while we start up is honoured before the event loop would run.
    signals = StopSignals(args.killable)

    # A backlog that holds a burst of as many connections as the proxy accepts.
    sock = listen_or_exit(
        listen_addr, args.max_clients, args.sockowner, args.sockgroup, args.sockperms
    )
    inode = socket_file_inode(listen_addr)

    try:
        after_listen(args.daemon, args.pidfile, args.user)
        loop = new_loop(args.loop)
        try:
            proxy = ProxyServer(
                sock,
                server_addr,
                ProxyLimits(
                    retry_ms=args.retry,
                    idle_ms=args.idle,
                    request_timeout_ms=args.request_timeout,
                    max_in_flight=args.max_in_flight,
                    max_in_flight_bytes=args.max_in_flight_bytes,
                    pipeline=args.pipeline,
                    max_clients=args.max_clients,
                    client_in_flight=args.client_in_flight,
                    client_output_budget=args.client_output_budget,
                    write_stall_ms=args.write_stall_timeout,
                    max_buffered=args.max_buffered,
                    evict_idle_ms=args.evict_idle,
                ),
                upstream_tls=tls,
            )
            signals.attach(loop, proxy.stop)
            if not signals.requested:
                loop.run_until_complete(proxy.serve())
        finally:
            loop.close()
    finally:
        sock.close()
        remove_socket_file(listen_addr, inode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
