"""Command-line parsing shared by the dc_* tools.

The C tools take single-dash switches (``-listen``, ``-sessions``); users have
scripts full of them, so we accept exactly those spellings. Unlike the C
tools, every usage or start-up error exits with status 1 and an ``Error, ...``
line on stderr (C sometimes exits 0 after a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

from tlscache.distcache.address import Address, connectable, parse_address
from tlscache.exceptions import AddressError


class Parser(argparse.ArgumentParser):
    """argparse with the C tools' conventions: ``-switch`` options, ``-h``/``-help``/``-?``/
    ``--help``, no abbreviations, exit status 1 on errors."""

    def __init__(self, prog: str, description: str) -> None:
        super().__init__(
            prog=prog,
            description=description,
            add_help=False,
            allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.add_argument(
            "-h", "-help", "-?", "--help", action="help", help="show this help and exit"
        )
        self._required: list[argparse.Action] = []

    def required(self, action: argparse.Action) -> argparse.Action:
        """Show ``action`` as required (no brackets) in the usage line.

        The tool still checks it itself after parsing, so that a missing switch
        gets the C tools' own message (``Error, no server specified!``) rather
        than argparse's.
        """
        self._required.append(action)
        return action

    def format_usage(self) -> str:
        with self._shown_required():
            return super().format_usage()

    def format_help(self) -> str:
        with self._shown_required():
            return super().format_help()

    @contextlib.contextmanager
    def _shown_required(self) -> Iterator[None]:
        saved = [action.required for action in self._required]
        for action in self._required:
            action.required = True
        try:
            yield
        finally:
            for action, was in zip(self._required, saved, strict=True):
                action.required = was

    def add_number(
        self, switch: str, lo: int, hi: int, default: int | None, help: str, metavar: str = "N"
    ) -> None:
        """A switch taking a strict decimal integer in [lo, hi] (see :func:`int_range`)."""
        self.add_argument(
            switch, metavar=metavar, type=int_range(lo, hi), default=default, help=help
        )

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"Error, {message}\n")


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a strict decimal integer in [lo, hi]."""

    def parse(text: str) -> int:
        if not text.isdigit() or not text.isascii():
            raise argparse.ArgumentTypeError(f"{text!r} is not a decimal number")
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range ({lo}..{hi})")
        return value

    parse.__name__ = "number"
    return parse


def octal(text: str) -> int:
    """An argparse type for ``-sockperms`` (e.g. ``0660``)."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode") from None
    if not 0 <= value <= 0o7777:
        raise argparse.ArgumentTypeError(f"mode {text} out of range")
    return value


def address(text: str) -> Address:
    """An argparse type for distcache addresses."""
    try:
        return parse_address(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def connect_address(text: str) -> Address:
    """An argparse type for addresses that must be connectable (not ``IP:<port>``)."""
    addr = address(text)
    try:
        return connectable(addr)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_server_option(parser: Parser, help: str) -> None:
    """``-server``/``-connect ADDR`` (required), the upstream of dc_client and dc_snoop."""
    parser.required(
        parser.add_argument(
            "-server",
            "-connect",
            dest="server",
            metavar="ADDR",
            action="append",
            type=connect_address,
            help=help,
        )
    )


def one_server(args: argparse.Namespace) -> Address:
    """The one ``-server``/``-connect`` address (exit 1 if it is missing or repeated, as C)."""
    servers: list[Address] | None = args.server
    if not servers:
        fail("no server specified!")
    if len(servers) > 1:
        fail("-server/-connect given more than once")
    return servers[0]


def fail(message: str, status: int = 1) -> NoReturn:
    """Print ``Error, <message>`` and exit non-zero."""
    print(f"Error, {message}", file=sys.stderr)
    raise SystemExit(status)
