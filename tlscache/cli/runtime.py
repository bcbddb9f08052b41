"""Process run-time shared by the long-running dc_* tools.

* ``--loop auto|asyncio|uvloop``: :func:`add_loop_option` and :func:`new_loop`;
* stop signals: :class:`StopSignals` holds SIGTERM/SIGINT (and, with
  ``-killable``, SIGUSR1/SIGUSR2) from start-up, before any event loop runs, so
  a stop request that arrives while the tool starts is honoured and never kills
  it half-way; without ``-killable`` SIGUSR1/SIGUSR2 are ignored, as in C;
* the listening socket: :func:`listen_or_exit` opens it or exits 1 with the
  reason (``address already in use`` for a taken address);
* the unix socket file a tool listens on: :func:`socket_file_inode` and
  :func:`remove_socket_file` remove it at exit unless something replaced it.

A tool's ``main`` uses them in this order::

    signals = StopSignals(args.killable)         # first: before the socket exists
    sock = listen_or_exit(addr)
    inode = socket_file_inode(addr)
    loop = new_loop(args.loop)
    try:
        server = SomeServer(sock, ...)
        signals.attach(loop, server.stop)        # loop handlers replace the early ones
        if not signals.requested:
            loop.run_until_complete(server.serve())
    finally:
        loop.close()
        sock.close()
        remove_socket_file(addr, inode)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import stat
from collections.abc import Callable
from types import FrameType
from typing import cast

from tlscache.cli.options import Parser, fail
from tlscache.distcache.address import Address, UnixAddress
from tlscache.distcache.loops import LOOP_KINDS, LoopKind, loop_factory
from tlscache.distcache.sockets import LISTEN_BACKLOG, listen


def add_loop_option(parser: Parser) -> None:
    """``--loop auto|asyncio|uvloop``."""
    parser.add_argument(
        "--loop",
        choices=LOOP_KINDS,
        default="auto",
        help="event loop implementation (default auto: uvloop when installed)",
    )


def checked_loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """:func:`~tlscache.distcache.loops.loop_factory`, exiting 1 if uvloop is missing."""
    try:
        return loop_factory(cast(LoopKind, kind))
    except ImportError:
        fail("--loop uvloop needs uvloop (pip install 'tlscache[uvloop]')")


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new event loop of the ``--loop`` kind (exit 1 if uvloop is asked for but missing)."""
    return checked_loop_factory(kind)()


def loop_name(factory: Callable[[], asyncio.AbstractEventLoop]) -> str:
    return "asyncio" if factory is asyncio.new_event_loop else "uvloop"


class StopSignals:
    """The stop signals of a tool, from start-up until its event loop ends.

    Created first thing in ``main``: until :meth:`attach` a stop signal is only
    recorded (:attr:`requested`), so start-up is never interrupted half-way.
    """

    def __init__(self, killable: bool = False, *, usr_signals: bool = True) -> None:
        self.signals = [signal.SIGTERM, signal.SIGINT]
        usr = [signal.SIGUSR1, signal.SIGUSR2]
        if killable:
            self.signals += usr
        elif usr_signals:  # False: leave SIGUSR1/2 alone (tools without -killable)
            for sig in usr:
                signal.signal(sig, signal.SIG_IGN)
        self.received: list[int] = []
        for sig in self.signals:
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    @property
    def requested(self) -> bool:
        """True once a stop signal has arrived."""
        return bool(self.received)

    def attach(self, loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
        """Call ``stop`` in ``loop`` on every stop signal from now on.

        If one already arrived, ``stop`` is called right away (so a signal in the
        gap between a check of :attr:`requested` and this call is not lost).
        """
        for sig in self.signals:
            loop.add_signal_handler(sig, self._on_signal, sig, stop)
        if self.received:
            stop()

    def _on_signal(self, signum: int, stop: Callable[[], None]) -> None:
        self.received.append(signum)
        stop()


def listen_or_exit(
    addr: Address,
    backlog: int = LISTEN_BACKLOG,
    owner: str | None = None,
    group: str | None = None,
    perms: int | None = None,
) -> socket.socket:
    """:func:`~tlscache.distcache.sockets.listen`, or exit 1 saying why it failed."""
    try:
        return listen(addr, backlog, owner, group, perms)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            fail(f"address already in use: {addr}")
        fail(f"bad listen address {addr}: {exc}")
    except (ValueError, KeyError) as exc:  # a file in the way; -sockowner/-sockgroup unknown
        fail(f"bad listen address {addr}: {exc}")


def socket_file_inode(addr: Address) -> int | None:
    """The inode of the unix socket file just created for ``addr`` (None if not unix)."""
    if not isinstance(addr, UnixAddress):
        return None
    try:
        return os.lstat(addr.path).st_ino
    except OSError:
        return None


def remove_socket_file(addr: Address, inode: int | None) -> None:
    """Remove the unix socket file we created, unless something else replaced it."""
    if not isinstance(addr, UnixAddress) or inode is None:
        return
    with contextlib.suppress(OSError):
        st = os.lstat(addr.path)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
            os.unlink(addr.path)


__all__ = [
    "StopSignals",
    "add_loop_option",
    "checked_loop_factory",
    "listen_or_exit",
    "loop_name",
    "new_loop",
    "remove_socket_file",
    "socket_file_inode",
]
