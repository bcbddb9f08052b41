"""``-sockowner``, ``-sockgroup`` and ``-sockperms`` of dc_server and dc_client, as another user.

The tests run as root: the socket file is given to ``nobody``/``nogroup``, and a forked
child that drops to another uid/gid tries to connect, so the kernel's permission check on
the socket file is what decides. The socket lives in a directory every user may traverse
(pytest's own temporary directories are private to root).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import free_port, running, tool
from tlscache.distcache.protocol import encode_have

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root"),
]

TOOLS = ["dc_server", "dc_client"]
NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrnam("nogroup")
OTHER = pwd.getpwnam("daemon")  # neither owner nor group of the socket: "others"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory any user can traverse (0755), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="tlscache-sockperms-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def argv_for(name: str, address: str, *options: str) -> list[str]:
    if name == "dc_server":
        return tool("dc_server", "-listen", address, *options)
    # No server behind it: dc_client still listens, and answers "no server".
    nowhere = f"IP:127.0.0.1:{free_port()}"
    return tool("dc_client", "-listen", address, "-server", nowhere, *options)


def connect_as(path: Path, uid: int, gid: int) -> str:
    """Connect from a child running as ``uid``/``gid``: "served", "refused" or what went wrong."""
    request = encode_have(1, b"sockperms")
    pid = os.fork()
    if pid == 0:  # the child: no pytest code runs here, only os._exit
        code = 2
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(path))
                s.sendall(request)
                code = 0 if s.recv(64) else 3
        except PermissionError:
            code = 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {0: "served", 1: "refused", 2: "error", 3: "closed"}.get(code, f"exit {code}")


def mode_of(path: Path) -> tuple[int, int, int]:
    """(permission bits, uid, gid) of the socket file, which must be a socket."""
    st = path.lstat()
    assert stat.S_ISSOCK(st.st_mode), oct(st.st_mode)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


@pytest.mark.parametrize("name", TOOLS)
def test_owner_only_mode_refuses_other_users(name: str, shared_dir: Path) -> None:
    path = shared_dir / "s.sock"
    with running(argv_for(name, f"UNIX:{path}", "-sockperms", "0600"), ready=f"UNIX:{path}"):
        assert mode_of(path) == (0o600, 0, 0)
        seen = {
            "root": connect_as(path, 0, 0),
            "nobody": connect_as(path, NOBODY.pw_uid, NOBODY.pw_gid),
        }
        assert seen == {"root": "served", "nobody": "refused"}, seen


@pytest.mark.parametrize("name", TOOLS)
def test_world_writable_mode_serves_other_users(name: str, shared_dir: Path) -> None:
    path = shared_dir / "s.sock"
    with running(argv_for(name, f"UNIX:{path}", "-sockperms", "0666"), ready=f"UNIX:{path}"):
        assert mode_of(path) == (0o666, 0, 0)
        seen = connect_as(path, NOBODY.pw_uid, NOBODY.pw_gid)
        assert seen == "served", seen


@pytest.mark.parametrize("name", TOOLS)
def test_owner_and_group_by_name(name: str, shared_dir: Path) -> None:
    """0660 to nobody:nogroup: the owner and the group are served, anyone else refused."""
    path = shared_dir / "s.sock"
    options = ("-sockowner", "nobody", "-sockgroup", "nogroup", "-sockperms", "0660")
    with running(argv_for(name, f"UNIX:{path}", *options), ready=f"UNIX:{path}"):
        assert mode_of(path) == (0o660, NOBODY.pw_uid, NOGROUP.gr_gid)
        seen = {
            "owner": connect_as(path, NOBODY.pw_uid, OTHER.pw_gid),
            "group": connect_as(path, OTHER.pw_uid, NOGROUP.gr_gid),
            "other": connect_as(path, OTHER.pw_uid, OTHER.pw_gid),
        }
        assert seen == {"owner": "served", "group": "served", "other": "refused"}, seen


@pytest.mark.parametrize("name", TOOLS)
def test_owner_only_mode_given_to_another_user(name: str, shared_dir: Path) -> None:
    """0600 owned by nobody: nobody is served, and root only through its privilege."""
    path = shared_dir / "s.sock"
    options = ("-sockowner", "nobody", "-sockperms", "0600")
    with running(argv_for(name, f"UNIX:{path}", *options), ready=f"UNIX:{path}"):
        assert mode_of(path) == (0o600, NOBODY.pw_uid, 0)  # group untouched
        seen = {
            "nobody": connect_as(path, NOBODY.pw_uid, NOBODY.pw_gid),
            "daemon": connect_as(path, OTHER.pw_uid, OTHER.pw_gid),
        }
        assert seen == {"nobody": "served", "daemon": "refused"}, seen


@pytest.mark.parametrize("name", TOOLS)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("-sockperms", "0999"), "octal"),
        (("-sockperms", "rw-------"), "octal"),
        (("-sockperms", "17777"), "out of range"),
        (("-sockowner", "no-such-user-xyz"), "no-such-user-xyz"),
        (("-sockgroup", "no-such-group-xyz"), "no-such-group-xyz"),
        # Names only, as in C distcache (getpwnam/getgrnam): a number is not a user name.
        (("-sockowner", "65534"), "65534"),
        (("-sockgroup", "65534"), "65534"),
    ],
    ids=["perms-9", "perms-letters", "perms-range", "user", "group", "uid-number", "gid-number"],
)
def test_bad_values_are_refused_at_start(
    name: str, options: tuple[str, ...], message: str, shared_dir: Path
) -> None:
    path = shared_dir / "s.sock"
    proc = subprocess.run(
        argv_for(name, f"UNIX:{path}", *options), capture_output=True, timeout=30, check=False
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, (proc.returncode, err)
    assert message in err, err
    assert "Traceback" not in err, err
    assert not path.exists(), "a socket file was left behind"


def test_connect_as_reports_a_missing_socket(shared_dir: Path) -> None:
    """The helper itself can tell "refused" from "nothing there" (so the tests can fail)."""
    with contextlib.suppress(FileNotFoundError):
        (shared_dir / "none.sock").unlink()
    assert connect_as(shared_dir / "none.sock", NOBODY.pw_uid, NOBODY.pw_gid) == "error"
