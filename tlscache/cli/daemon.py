"""Process plumbing shared by dc_server and dc_client: -daemon, -pidfile, -user.

The order is the C tools' order: create the listener first (so a privileged
port or a root-owned socket directory works), then daemonise, write the pid
file, and finally drop privileges.
"""

from __future__ import annotations

import os
import sys

from tlscache.cli.options import Parser, fail, octal


def add_process_options(parser: Parser) -> None:
    parser.add_argument("-daemon", action="store_true", help="detach and run in the background")
    parser.add_argument("-pidfile", metavar="PATH", help="write the process id to PATH")
    parser.add_argument("-user", metavar="USER", help="switch to USER after listening")
    parser.add_argument("-sockowner", metavar="USER", help="owner of a UNIX listening socket")
    parser.add_argument("-sockgroup", metavar="GROUP", help="group of a UNIX listening socket")
    parser.add_argument(
        "-sockperms", metavar="MODE", type=octal, help="octal permissions of a UNIX socket"
    )
    parser.add_argument(
        "-killable",
        action="store_true",
        help="also exit cleanly on SIGUSR1/SIGUSR2 (SIGTERM/SIGINT always do)",
    )


def daemonize() -> None:
    """Classic double fork: chdir /, stdio to /dev/null, new session."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def write_pidfile(path: str) -> None:
    """Write our pid (decimal, no newline, as the C tools do)."""
    try:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    except OSError as exc:
        fail(f"cannot write pid file {path}: {exc.strerror}")


def drop_privileges(user: str) -> None:
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        fail(f"no such user {user!r}")
    try:
        os.initgroups(entry.pw_name, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        fail(f"cannot switch to user {user!r}: {exc.strerror}")


def after_listen(daemon: bool, pidfile: str | None, user: str | None) -> None:
    """Everything that happens once the listener exists, in the C order."""
    if daemon:
        sys.stdout.flush()
        sys.stderr.flush()
        daemonize()
    if pidfile:
        write_pidfile(pidfile)
    if user:
        drop_privileges(user)
