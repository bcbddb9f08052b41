"""dc_snoop: relay distcache connections unchanged and print every message.

Put it between any distcache client and server (``dc_test -> dc_snoop ->
dc_server``, or ``dc_client -> dc_snoop -> dc_server``) to see the traffic.
One line per message goes to stderr (as the C tool prints); ``-json FILE``
also writes one JSON object per message and connection event (``-`` for
stdout). Unlike the C tool there is no limit of 10 connection pairs.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import TextIO

from tlscache.cli.options import Parser, add_server_option, address, fail, one_server
from tlscache.cli.runtime import (
    StopSignals,
    listen_or_exit,
    remove_socket_file,
    socket_file_inode,
)
from tlscache.distcache.address import Address
from tlscache.distcache.snoop import Log, SnoopServer


def build_parser() -> Parser:
    parser = Parser(
        "dc_snoop",
        "Relay distcache connections from -listen to -server without changing a byte, "
        "printing one line per message.",
    )
    parser.required(
        parser.add_argument(
            "-listen", metavar="ADDR", type=address, help="accept connections here (required)"
        )
    )
    add_server_option(parser, "open one connection here per accepted connection (required)")
    parser.add_argument(
        "-hexdump", action="store_true", help="also dump each message payload in hex"
    )
    parser.add_argument(
        "-json", metavar="FILE", help="write JSON lines (one per message/event) to FILE; - = stdout"
    )
    parser.add_argument("-quiet", action="store_true", help="no text lines (use with -json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.listen is None:
        fail("must provide -listen")
    server_addr = one_server(args)
    listen_addr: Address = args.listen

    json_out: TextIO | None = None
    if args.json == "-":
        json_out = sys.stdout
    elif args.json:
        try:
            json_out = open(args.json, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            fail(f"cannot open {args.json}: {exc.strerror}")
    log = Log(text=None if args.quiet else sys.stderr, json_out=json_out, dump=args.hexdump)

    signals = StopSignals(usr_signals=False)
    try:
        sock = listen_or_exit(listen_addr)
    except SystemExit:
        if json_out is not None and json_out is not sys.stdout:
            json_out.close()
        raise
    inode = socket_file_inode(listen_addr)
    loop = asyncio.new_event_loop()
    try:
        snoop = SnoopServer(sock, server_addr, log)
        signals.attach(loop, snoop.stop)
        if not signals.requested:
            loop.run_until_complete(snoop.serve())
    finally:
        loop.close()
        sock.close()
        remove_socket_file(listen_addr, inode)
        if json_out is not None and json_out is not sys.stdout:
            json_out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
