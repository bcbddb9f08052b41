"""``tlscache-keys``: create and rotate the key ring that seals shared sessions.

A separate tool from the dc_* ones, so it uses ordinary ``--long`` options and
subcommands. It never prints a secret; the fingerprint it shows is a one-way
digest that tells whether two servers hold the same ring. Run it as the user the
servers run as: the ring it writes belongs to that user, mode 0600. Typical
rotation (see docs/security.md)::

    tlscache-keys generate /etc/tlscache/keys.json   # once, then copy to every server
    tlscache-keys rotate /etc/tlscache/keys.json     # new sealing key; copy again
    tlscache-keys retire /etc/tlscache/keys.json 1   # once key 1's sessions have expired
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tlscache.exceptions import KeyRingError
from tlscache.keyring import KeyRing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlscache-keys",
        description="Create, rotate, list and retire the keys that seal shared TLS sessions.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="create a new key ring (mode 0600)")
    gen.add_argument("path", type=Path, help="key ring file to create")
    gen.add_argument(
        "--force",
        action="store_true",
        help="replace an existing ring (new lookup secret: every cached session is lost)",
    )
    rot = sub.add_parser("rotate", help="add a key that seals from now on")
    rot.add_argument("path", type=Path, help="key ring file")
    lst = sub.add_parser("list", help="show the keys (ids, dates, states; never secrets)")
    lst.add_argument("path", type=Path, help="key ring file")
    ret = sub.add_parser(
        "retire",
        help="erase a key's secret: sessions it sealed no longer open "
        "(wait until the longest session timeout has passed since the rotation)",
    )
    ret.add_argument("path", type=Path, help="key ring file")
    ret.add_argument("key_id", type=int, nargs="+", help="id of a key to retire")
    return parser


def _when(created: int) -> str:
    return datetime.datetime.fromtimestamp(created, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def describe(ring: KeyRing) -> str:
    """The ring as a table: ids, creation dates, states, and the ring's fingerprint."""
    current = ring.current.key_id
    lines = [f"fingerprint {ring.fingerprint()}", "  id  created               state"]
    for key in sorted(ring.keys, key=lambda k: k.key_id):
        state = "retired" if key.retired else ("sealing" if key.key_id == current else "opening")
        lines.append(f"{key.key_id:4}  {_when(key.created)}  {state}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path: Path = args.path
    try:
        if args.command == "generate":
            if os.path.lexists(path) and not args.force:
                raise KeyRingError(f"{path} exists; rotate it, or pass --force to replace it")
            ring = KeyRing.generate()
            ring.save(path)
            print(
                f"created {path} (mode 0600) with sealing key {ring.current.key_id}, "
                f"fingerprint {ring.fingerprint()}; copy it to every server"
            )
        elif args.command == "rotate":
            ring = KeyRing.load(path).rotated()
            ring.save(path)
            print(
                f"{path}: key {ring.current.key_id} seals from now on, "
                f"fingerprint {ring.fingerprint()}; copy it to every server"
            )
        elif args.command == "retire":
            ring = KeyRing.load(path)
            for key_id in args.key_id:
                ring = ring.retire(key_id)
            ring.save(path)
            print(
                f"{path}: retired {', '.join(str(k) for k in args.key_id)}, "
                f"fingerprint {ring.fingerprint()}; copy it to every server"
            )
        else:
            ring = KeyRing.load(path)
            print(describe(ring))
    except (KeyRingError, OSError) as exc:
        print(f"tlscache-keys: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
