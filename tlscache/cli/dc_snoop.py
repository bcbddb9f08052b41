"""dc_snoop: relay distcache connections unchanged and print every message.

Put it between any distcache client and server (``dc_test -> dc_snoop ->
dc_server``, or ``dc_client -> dc_snoop -> dc_server``) to see the traffic.
One line per message goes to stderr (as the C tool prints); ``-json FILE``
also writes one JSON object per message and connection event (``-`` for
stdout). Unlike the C tool there is no limit of 10 connection pairs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
from collections.abc import Sequence
from typing import TextIO

from tlscache.cli.options import Parser, address, connect_address, fail
from tlscache.distcache.address import Address, listen
from tlscache.distcache.snoop import Log, SnoopServer


def build_parser() -> Parser:
    parser = Parser(
        "dc_snoop",
        "Relay distcache connections from -listen to -server without changing a byte, "
        "printing one line per message.",
    )
    parser.add_argument(
        "-listen", metavar="ADDR", type=address, help="accept connections here (required)"
    )
    parser.add_argument(
        "-server",
        "-connect",
        dest="server",
        metavar="ADDR",
        action="append",
        type=connect_address,
        help="open one connection here per accepted connection (required)",
    )
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
    if not args.server:
        fail("no server specified!")
    if len(args.server) > 1:
        fail("-server/-connect given more than once")
    listen_addr: Address = args.listen
    server_addr: Address = args.server[0]

    json_out: TextIO | None = None
    if args.json == "-":
        json_out = sys.stdout
    elif args.json:
        try:
            json_out = open(args.json, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            fail(f"cannot open {args.json}: {exc.strerror}")
    log = Log(text=None if args.quiet else sys.stderr, json_out=json_out, dump=args.hexdump)

    early_stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early_stop.append(signum))
    try:
        sock = listen(listen_addr)
    except (OSError, ValueError) as exc:
        fail(f"bad listen address {listen_addr}: {exc}")
    inode: int | None = None
    if listen_addr.kind == "unix":
        with contextlib.suppress(OSError):
            inode = os.lstat(listen_addr.path).st_ino
    loop = asyncio.new_event_loop()
    try:
        snoop = SnoopServer(sock, server_addr, log)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, snoop.stop)
        if not early_stop:
            loop.run_until_complete(snoop.serve())
    finally:
        loop.close()
        sock.close()
        if inode is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(listen_addr.path)
                if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
                    os.unlink(listen_addr.path)
        if json_out is not None and json_out is not sys.stdout:
            json_out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
