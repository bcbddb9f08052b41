"""The resolver finds the right functions, and refuses whenever it cannot prove them."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from elftools.elf.elffile import ELFFile
from OpenSSL import SSL
from OpenSSL._util import ffi

from tlscache.exceptions import ResolverError
from tlscache.openssl import resolver
from tlscache.openssl.resolver import REQUIRED, Resolution, resolve

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def res() -> Resolution:
    return resolve()


@pytest.fixture(scope="module")
def binding(res: Resolution) -> Path:
    """The statically linked binding file (the PyPI wheel case)."""
    if res.method != "symtab":
        pytest.skip(f"binding resolved by {res.method}, not from .symtab")
    return Path(res.library_path)


@pytest.fixture
def record_accepts_copies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Skip the RECORD check, to reach the checks behind it (as if RECORD had been rewritten
    along with the file); returns the paths the check was asked about."""
    asked: list[str] = []

    def accept(f: BinaryIO, path: str, loaded_path: str, checks: list[str]) -> None:
        asked.append(path)

    monkeypatch.setattr(resolver, "_check_record", accept)
    return asked


def elf_of(f: BinaryIO) -> Any:
    """pyelftools' view of ``f`` (typed loosely: its sections may be ``None``)."""
    return ELFFile(f)


@functools.cache
def _symbols(path: Path) -> tuple[dict[str, list[int]], list[tuple[int, int, int]]]:
    """All symbol values by name, and the PT_LOAD (vaddr, filesz, offset) list, via pyelftools."""
    with open(path, "rb") as f:
        elf = elf_of(f)
        values: dict[str, list[int]] = {}
        for sym in elf.get_section_by_name(".symtab").iter_symbols():
            values.setdefault(sym.name, []).append(sym["st_value"])
        loads = [
            (seg["p_vaddr"], seg["p_filesz"], seg["p_offset"])
            for seg in elf.iter_segments()
            if seg["p_type"] == "PT_LOAD"
        ]
    return values, loads


def symbol(path: Path, name: str) -> tuple[int, int]:
    """(value, file offset) of a symbol, read independently with pyelftools."""
    values, loads = _symbols(path)
    assert len(values.get(name, [])) == 1, name
    value = values[name][0]
    for vaddr, filesz, offset in loads:
        if vaddr <= value < vaddr + filesz:
            return value, value - vaddr + offset
    raise AssertionError(f"{name} not in a PT_LOAD segment")


def patched_copy(src: Path, dst: Path, offset: int) -> Path:
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    return dst


# --------------------------------------------------------------------------- success


def test_resolves_every_required_function(res: Resolution) -> None:
    assert res.method in ("cffi", "dlsym", "symtab")
    for name in REQUIRED:
        assert res.functions[name] is not None, name
    assert res.elapsed_s < 5


def test_symtab_addresses_match_an_independent_reading(res: Resolution, binding: Path) -> None:
    assert res.bias is not None
    text = "\n".join(res.checks)
    needles = (
        "not used: dlsym",
        "mapped file",
        "RECORD",
        "bias",
        "build-id",
        "stubs jump",
        "bytes",
    )
    for needle in needles:
        assert needle in text
    for name, address in res.addresses.items():
        value, _ = symbol(binding, name)
        assert address == res.bias + value, name
    with open(binding, "rb") as f:
        note = elf_of(f).get_section_by_name(".note.gnu.build-id")
        assert res.build_id == next(iter(note.iter_notes()))["n_desc"]


def test_resolved_functions_work(res: Resolution) -> None:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_session_cache_mode(0x302)
    raw = ctx._context
    if res.functions.get("SSL_CTX_get_num_tickets") is not None:
        assert res.get("SSL_CTX_get_num_tickets")(raw) == 2
        assert res.get("SSL_CTX_set_num_tickets")(raw, 5) == 1
        assert res.get("SSL_CTX_get_num_tickets")(raw) == 5
    conn = SSL.Connection(ctx, None)
    assert res.get("SSL_get_SSL_CTX")(conn._ssl) == raw
    # SSL_CTX_ctrl(SSL_CTRL_GET_SESS_CACHE_MODE = 45) agrees with pyOpenSSL's own accessor.
    assert res.get("SSL_CTX_ctrl")(raw, 45, 0, ffi.NULL) == ctx.get_session_cache_mode()


def test_result_is_cached_and_thread_safe() -> None:
    resolver._reset_cache()
    results: list[Resolution] = []
    threads = [threading.Thread(target=lambda: results.append(resolve())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    assert all(r is results[0] for r in results)
    assert resolve() is results[0]


def test_failure_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(binary_path: str | None, *, force_file: bool) -> Resolution:
        calls.append(binary_path)
        raise ResolverError("nope")

    monkeypatch.setattr(resolver, "_resolve", failing)
    resolver._reset_cache()
    try:
        for _ in range(3):
            with pytest.raises(ResolverError, match="nope"):
                resolve()
        assert len(calls) == 1
    finally:
        monkeypatch.undo()
        resolver._reset_cache()


def test_unexpected_errors_become_resolver_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise OSError("boom")

    monkeypatch.setattr(resolver, "_read_maps", broken)
    monkeypatch.setattr(resolver, "_from_cffi", lambda lib: {})
    resolver._reset_cache()
    try:
        with pytest.raises(ResolverError, match="unexpected error while resolving: OSError"):
            resolve()
    finally:
        monkeypatch.undo()
        resolver._reset_cache()


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_env_switch(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TLSCACHE_DISABLE_RESOLVER", value)
    with pytest.raises(ResolverError, match="disabled by TLSCACHE_DISABLE_RESOLVER"):
        resolve()
    monkeypatch.setenv("TLSCACHE_DISABLE_RESOLVER", "0")
    assert resolve() is not None


# --------------------------------------------------------------------------- refusals


def test_unmodified_copy_is_accepted(res: Resolution, binding: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.so"
    shutil.copyfile(binding, copy)
    assert resolve(copy).addresses == res.addresses


@pytest.mark.parametrize(
    "name",
    ["SSL_SESSION_get_id", "SSL_CTX_sess_set_get_cb", "SSL_version", "SSL_CTX_set_num_tickets"],
)
def test_patched_function_byte_is_refused(
    binding: Path, tmp_path: Path, name: str, record_accepts_copies: list[str]
) -> None:
    _, offset = symbol(binding, name)
    copy = patched_copy(binding, tmp_path / "patched.so", offset + 1)
    with pytest.raises(ResolverError, match="bytes in memory differ"):
        resolve(copy)
    assert record_accepts_copies == [str(copy)]


def test_patched_stub_is_refused(
    binding: Path, tmp_path: Path, record_accepts_copies: list[str]
) -> None:
    _, offset = symbol(binding, "_cffi_d_SSL_session_reused")
    copy = patched_copy(binding, tmp_path / "patched.so", offset + 2)
    with pytest.raises(ResolverError, match="bytes in memory differ"):
        resolve(copy)


def test_mismatched_build_id_is_refused(
    binding: Path, tmp_path: Path, record_accepts_copies: list[str]
) -> None:
    with open(binding, "rb") as f:
        note = elf_of(f).get_section_by_name(".note.gnu.build-id")
        offset = note["sh_offset"] + note["sh_size"] - 1  # last byte of the id
    copy = patched_copy(binding, tmp_path / "other-build.so", offset)
    with pytest.raises(ResolverError, match="build-id"):
        resolve(copy)


def test_duplicate_symbol_is_refused(
    binding: Path, tmp_path: Path, record_accepts_copies: list[str]
) -> None:
    """Another FUNC renamed to SSL_SESSION_get_id: the name is no longer unique."""
    copy = tmp_path / "dup.so"
    shutil.copyfile(binding, copy)
    with open(copy, "r+b") as f:
        symtab = elf_of(f).get_section_by_name(".symtab")
        base = symtab["sh_offset"]
        names = {}
        for i, sym in enumerate(symtab.iter_symbols()):
            if sym.name in ("SSL_SESSION_get_id", "SSL_SESSION_get_time"):
                names[sym.name] = (i, sym["st_name"])
        index = names["SSL_SESSION_get_time"][0]
        f.seek(base + index * 24)
        f.write(struct.pack("<I", names["SSL_SESSION_get_id"][1]))
    with pytest.raises(ResolverError, match="defined 2 times"):
        resolve(copy)


def test_stripped_copy_is_refused(
    binding: Path, tmp_path: Path, record_accepts_copies: list[str]
) -> None:
    strip = shutil.which("strip")
    if strip is None:
        pytest.skip("no strip(1)")
    copy = tmp_path / "stripped.so"
    shutil.copyfile(binding, copy)
    subprocess.run([strip, str(copy)], check=True, timeout=60)
    with pytest.raises(ResolverError, match=r"no \.symtab"):
        resolve(copy)


def test_other_elf_file_is_refused(binding: Path, record_accepts_copies: list[str]) -> None:
    spec = importlib.util.find_spec("_cffi_backend")
    assert spec is not None and spec.origin is not None
    with pytest.raises(ResolverError, match="_cffi_d_"):
        resolve(spec.origin)


@pytest.mark.parametrize("content", [b"", b"not an elf file at all" * 10, b"\x7fELF\x02\x01"])
def test_garbage_file_is_refused(binding: Path, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.so"
    path.write_bytes(content)
    with pytest.raises(ResolverError):
        resolve(path)


def test_missing_file_is_refused(binding: Path, tmp_path: Path) -> None:
    with pytest.raises(ResolverError, match="cannot open"):
        resolve(tmp_path / "absent.so")


def test_dlsym_refuses_a_static_binding(res: Resolution, binding: Path) -> None:
    _, lib = resolver._bindings()
    stubs = resolver._stub_addresses(ffi, lib, resolver.ANCHORS)
    image = resolver._Image(resolver._read_maps(), next(iter(stubs.values())))
    with pytest.raises(ResolverError, match="dlsym"):
        resolver._via_dlsym(resolver._machine(), image, stubs, ["SSL_SESSION_get_id"], [])


def test_memory_reads_stay_inside_the_image(res: Resolution, binding: Path) -> None:
    _, lib = resolver._bindings()
    stubs = resolver._stub_addresses(ffi, lib, resolver.ANCHORS)
    image = resolver._Image(resolver._read_maps(), next(iter(stubs.values())))
    with pytest.raises(ResolverError, match="not in a readable"):
        image.read(0x1000, 16)
    top = max(m.end for m in image.maps)
    with pytest.raises(ResolverError):
        image.read(top - 4, 16)
    with pytest.raises(ResolverError, match="not inside a file mapping"):
        resolver._Image(resolver._read_maps(), 0x10)


# --------------------------------------------------------------------------- RECORD


def test_copy_with_one_changed_byte_is_refused_by_the_record(binding: Path, tmp_path: Path) -> None:
    """A byte outside anything the other checks read (the .comment section): only the
    RECORD catches it."""
    with open(binding, "rb") as f:
        comment = elf_of(f).get_section_by_name(".comment")
        assert comment is not None
        offset = comment["sh_offset"] + 1
    copy = patched_copy(binding, tmp_path / "patched.so", offset)
    with pytest.raises(ResolverError, match="differs from cryptography's RECORD"):
        resolve(copy)


def test_copied_package_with_a_changed_byte_is_refused(
    binding: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loaded binding checked against a patched copy of its package's RECORD entry."""
    real = resolver._recorded_sha256(str(binding))
    assert real == hashlib.sha256(binding.read_bytes()).hexdigest()
    monkeypatch.setattr(resolver, "_recorded_sha256", lambda path: "0" * 64)
    with pytest.raises(ResolverError, match="not the one the wheel installed"):
        resolver._resolve(None, force_file=True)


def test_binding_missing_from_record_is_refused(
    binding: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib import metadata

    dist = metadata.distribution("cryptography")
    files = [f for f in dist.files or [] if f.name != binding.name]
    monkeypatch.setattr(type(dist), "files", property(lambda self: files))
    with pytest.raises(ResolverError, match="is not listed in the RECORD"):
        resolver._resolve(None, force_file=True)
    monkeypatch.setattr(type(dist), "files", property(lambda self: None))
    with pytest.raises(ResolverError, match="without a RECORD"):
        resolver._resolve(None, force_file=True)


def test_record_hash_is_computed_once_per_file_version(
    binding: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "copy.so"
    shutil.copyfile(binding, copy)
    resolver._digests.clear()
    computed: list[int] = []
    real_sha256 = hashlib.sha256

    def counting() -> Any:
        computed.append(1)
        return real_sha256()

    monkeypatch.setattr(hashlib, "sha256", counting)
    resolve(copy)
    resolve(copy)
    assert len(computed) == 1
    os.utime(copy, ns=(0, 0))  # a new mtime: hashed again
    resolve(copy)
    assert len(computed) == 2


# --------------------------------------------------------------------------- decoding

X86 = resolver._EM_X86_64
ARM = resolver._EM_AARCH64


@pytest.mark.parametrize(
    ("machine", "code", "expected"),
    [
        (X86, b"\xe9\x9b\x81\x12\x00", ("direct", 0x1000 + 5 + 0x12819B)),
        (X86, b"\xe9\xfb\xff\xff\xff", ("direct", 0x1000)),
        (X86, b"\xf3\x0f\x1e\xfa\xe9\x00\x00\x00\x00", ("direct", 0x1009)),
        (X86, b"\xff\x25\xb2\x2d\x07\x00", ("indirect", 0x1006 + 0x72DB2)),
        (X86, b"\xf3\x0f\x1e\xfa\xf2\xff\x25\x10\x00\x00\x00", ("indirect", 0x100B + 0x10)),
        (X86, b"\x48\x83\xec\x08\xe8\xc7", None),
        (ARM, struct.pack("<I", 0x14000000 | 4), ("direct", 0x1010)),
        (ARM, struct.pack("<I", 0x17FFFFFF), ("direct", 0xFFC)),
        (ARM, struct.pack("<II", 0xD503245F, 0x14000001), ("direct", 0x1008)),
        (ARM, struct.pack("<I", 0xD65F03C0), None),
        # adrp x16, +1 page; ldr x17, [x16, #0x18]; add x16, x16, #0x18; br x17
        (
            ARM,
            struct.pack("<IIII", 0xB0000010, 0xF9400E11, 0x91006210, 0xD61F0220),
            ("indirect", 0x2000 + 0x18),
        ),
        (ARM, b"", None),
    ],
)
def test_decode_jump(machine: int, code: bytes, expected: tuple[str, int] | None) -> None:
    assert resolver._decode_jump(machine, 0x1000, code) == expected


# --------------------------------------------------------------------------- other stacks

_SYSTEM_PROBE = "import OpenSSL.SSL, cryptography.hazmat.bindings._openssl"

_SYSTEM_SCRIPT = textwrap.dedent(
    """
    import os, sys, types
    from OpenSSL import SSL
    from OpenSSL._util import lib

    # Only the OpenSSL layer: the rest of the package needs a newer cryptography than a
    # distribution may ship, and the layer imports nothing from it.
    package = types.ModuleType("tlscache")
    package.__path__ = [os.path.join(sys.argv[3], "tlscache")]
    sys.modules["tlscache"] = package
    from tlscache.openssl.callbacks import install_callbacks
    from tlscache.openssl.resolver import resolve

    class H:
        def __init__(self): self.d = {}
        def on_new(self, c, s, der, t): self.d[s] = der
        def on_get(self, c, s, v=None): return self.d.get(s)
        def on_remove(self, c, s): self.d.pop(s, None)
        def on_fatal_alert(self, c, ids): pass

    def connect(sctx, cctx, sess=None):
        s = SSL.Connection(sctx, None); s.set_accept_state()
        c = SSL.Connection(cctx, None); c.set_connect_state()
        if sess is not None:
            c.set_session(sess)
        for _ in range(50):
            for x, y in ((c, s), (s, c)):
                try: x.do_handshake()
                except SSL.WantReadError: pass
                try: y.bio_write(x.bio_read(65536))
                except SSL.WantReadError: pass
        s.send(b"p"); c.bio_write(s.bio_read(65536)); c.recv(1)
        reused = bool(lib.SSL_session_reused(s._ssl))
        s.shutdown(); c.shutdown()
        return reused, c.get_session()

    print(resolve().method)
    for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
        sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        sctx.use_certificate_chain_file(sys.argv[1]); sctx.use_privatekey_file(sys.argv[2])
        install_callbacks(sctx, H())
        cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        cctx.set_min_proto_version(version); cctx.set_max_proto_version(version)
        first, sess = connect(sctx, cctx)
        second, _ = connect(sctx, cctx, sess)
        print(version, first, second)
    """
)


@pytest.mark.integration
def test_dynamically_linked_system_stack(tmp_path: Path) -> None:
    """Distribution pyOpenSSL + cryptography linked against the system libssl (dlsym path)."""
    python = "/usr/bin/python3"
    if not os.path.exists(python) or os.path.realpath(python) == os.path.realpath(sys.executable):
        pytest.skip("no separate system python")
    probe = subprocess.run([python, "-c", _SYSTEM_PROBE], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("system python has no dynamically linked pyOpenSSL")
    import trustme

    leaf = trustme.CA().issue_cert("localhost")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [python, "-c", _SYSTEM_SCRIPT, str(chain), str(key), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[0] == "dlsym"
    assert lines[1:3] == ["771 False True", "772 False True"]


def test_binding_replaced_on_disk_is_refused(res: Resolution, binding: Path) -> None:
    _, lib = resolver._bindings()
    stubs = resolver._stub_addresses(ffi, lib, resolver.ANCHORS)
    image = resolver._Image(resolver._read_maps(), next(iter(stubs.values())))
    checks: list[str] = []
    assert resolver._loaded_file(image, checks) == str(binding)
    image.path += " (deleted)"  # what /proc/self/maps shows after a pip upgrade
    with pytest.raises(ResolverError, match="replaced on disk"):
        resolver._loaded_file(image, checks)


@pytest.mark.parametrize("how", ["truncate-header", "truncate-half", "truncate-tail", "scramble"])
def test_damaged_copies_raise_resolver_errors_and_leak_no_file(
    binding: Path, tmp_path: Path, how: str
) -> None:
    """Whatever pyelftools trips over becomes a ResolverError, and the file is closed."""
    data = bytearray(binding.read_bytes())
    if how == "truncate-header":
        data = data[:200]
    elif how == "truncate-half":
        data = data[: len(data) // 2]
    elif how == "truncate-tail":
        data = data[:-100]
    else:  # section header table and string tables overwritten with a pattern
        shoff = int.from_bytes(data[0x28:0x30], "little")
        data[shoff:] = bytes(range(7, 251)) * ((len(data) - shoff) // 244 + 1)
        del data[len(binding.read_bytes()) :]
    path = tmp_path / "damaged.so"
    path.write_bytes(bytes(data))
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ResolverError):
        resolve(path)
    assert len(os.listdir("/proc/self/fd")) == fds
