"""Find, and prove, the OpenSSL functions that pyOpenSSL's bindings do not expose.

The session callbacks need ``SSL_CTX_sess_set_{new,get,remove}_cb``, ``SSL_SESSION_get_id``
and a few more functions that ``cryptography`` does not declare. They must come from exactly
the OpenSSL instance pyOpenSSL calls: a second libssl would be handed an ``SSL_CTX`` it does
not own. Three sources are tried, best first:

``cffi``
    The binding declares the function: use it as is.
``dlsym``
    ``cryptography`` links a shared libssl (distribution packages). ``dlopen(binding,
    RTLD_NOLOAD)`` + ``dlsym`` search exactly the libraries the binding uses; the result is
    accepted only if, for every anchor function the binding does declare, ``dlsym`` gives the
    address the binding really jumps to (its cffi stub, then the PLT/GOT). This rejects
    interposers (``LD_PRELOAD``) and foreign copies.
``symtab``
    OpenSSL is linked statically into the binding (PyPI wheels) and exports nothing. The ELF
    ``.symtab`` of the binding file names every function as a local ``FUNC``. The load bias
    comes from cffi's direct-call stubs (``_cffi_d_X``, one tail jump each), must agree across
    all anchors and match the mapping in ``/proc/self/maps``; each stub's jump target must be
    bias + the ``.symtab`` value of ``X``; the GNU build-id in the mapped image must equal the
    file's; and the first bytes of every resolved function in memory must equal the file's.
    Before any of that, the file's sha256 must equal the one recorded for it in the RECORD of
    the installed ``cryptography`` wheel: ``.symtab`` names are only trusted in the very file
    the wheel shipped (a rebuilt or edited binary could name any function anything).

Nothing found is called before every check passed. Memory is only read inside readable
mappings of the binding's own file, so a wrong guess raises ``ResolverError`` instead of
crashing. The result is resolved once per process (thread-safe) and cached, failures too.

Function pointers are cast with pyOpenSSL's own ``ffi``: its ``SSL_CTX *`` and ``SSL_SESSION *``
cdata can then be passed straight through, and callbacks made with ``ffi.callback`` have types
that cffi checks against the casts. A separate ``cffi.FFI()`` would need ``void *`` everywhere
and lose that checking.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import platform
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from tlscache.exceptions import ResolverError

__all__ = [
    "ANCHORS",
    "DISABLE_ENV",
    "OPTIONAL",
    "REQUIRED",
    "SIGNATURES",
    "Resolution",
    "resolve",
]

DISABLE_ENV = "TLSCACHE_DISABLE_RESOLVER"

#: C prototypes (as function-pointer types) of everything the resolver may provide.
SIGNATURES: Mapping[str, str] = {
    "SSL_CTX_sess_set_new_cb": "void (*)(SSL_CTX *, int (*)(SSL *, SSL_SESSION *))",
    "SSL_CTX_sess_set_get_cb": (
        "void (*)(SSL_CTX *, SSL_SESSION *(*)(SSL *, const unsigned char *, int, int *))"
    ),
    "SSL_CTX_sess_set_remove_cb": "void (*)(SSL_CTX *, void (*)(SSL_CTX *, SSL_SESSION *))",
    "SSL_SESSION_get_id": "const unsigned char *(*)(const SSL_SESSION *, unsigned int *)",
    "SSL_SESSION_get_timeout": "long (*)(const SSL_SESSION *)",
    "SSL_CTX_set_num_tickets": "int (*)(SSL_CTX *, size_t)",
    "SSL_CTX_get_num_tickets": "size_t (*)(const SSL_CTX *)",
    "SSL_CTX_ctrl": "long (*)(SSL_CTX *, int, long, void *)",
    "i2d_SSL_SESSION": "int (*)(const SSL_SESSION *, unsigned char **)",
    "d2i_SSL_SESSION": "SSL_SESSION *(*)(SSL_SESSION **, const unsigned char **, long)",
    "SSL_get_SSL_CTX": "SSL_CTX *(*)(const SSL *)",
    "SSL_CTX_get0_certificate": "X509 *(*)(const SSL_CTX *)",
    "SSL_CTX_get_client_CA_list": "Cryptography_STACK_OF_X509_NAME *(*)(const SSL_CTX *)",
    "SSL_CTX_get_info_callback": "void (*(*)(const SSL_CTX *))(const SSL *, int, int)",
    "i2d_X509": "int (*)(X509 *, unsigned char **)",
    "ERR_peek_last_error": "unsigned long (*)(void)",
    # The callbacks' lifetime follows the SSL_CTX's (callbacks.py): an ex-data index whose
    # free callback OpenSSL calls when the SSL_CTX is really freed. CRYPTO_EX_DATA is not
    # declared by the binding: ``void *`` here; new and dup are always NULL.
    "CRYPTO_get_ex_new_index": (
        "int (*)(int, long, void *, void *, void *, "
        "void (*)(void *, void *, void *, int, long, void *))"
    ),
    "SSL_CTX_set_ex_data": "int (*)(SSL_CTX *, int, void *)",
    "SSL_CTX_get_ex_data": "void *(*)(const SSL_CTX *, int)",
    # Session tickets (tlscache/openssl/tickets.py). The binding declares no EVP_CIPHER_CTX,
    # EVP_MAC_CTX, HMAC_CTX, ENGINE or OSSL_PARAM type: those pointers are ``void *`` here.
    "SSL_CTX_set_tlsext_ticket_key_evp_cb": (
        "int (*)(SSL_CTX *, int (*)(SSL *, unsigned char *, unsigned char *, void *, void *, int))"
    ),
    "SSL_CTX_callback_ctrl": "long (*)(SSL_CTX *, int, void (*)(void))",
    "SSL_CTX_clear_options": "uint64_t (*)(SSL_CTX *, uint64_t)",
    "EVP_EncryptInit_ex": (
        "int (*)(void *, const EVP_CIPHER *, void *, const unsigned char *, const unsigned char *)"
    ),
    "EVP_DecryptInit_ex": (
        "int (*)(void *, const EVP_CIPHER *, void *, const unsigned char *, const unsigned char *)"
    ),
    "EVP_aes_256_cbc": "const EVP_CIPHER *(*)(void)",
    "EVP_MAC_CTX_set_params": "int (*)(void *, const void *)",
    "HMAC_Init_ex": "int (*)(void *, const void *, int, const EVP_MD *, void *)",
    "EVP_sha256": "const EVP_MD *(*)(void)",
    # Non-blocking resumption (tlscache/openssl/clienthello.py).
    "SSL_CTX_set_client_hello_cb": "void (*)(SSL_CTX *, int (*)(SSL *, int *, void *), void *)",
    "SSL_client_hello_get0_session_id": "size_t (*)(SSL *, const unsigned char **)",
    "SSL_client_hello_get0_ext": "int (*)(SSL *, unsigned int, const unsigned char **, size_t *)",
    "SSL_want": "int (*)(const SSL *)",
    "SSL_ctrl": "long (*)(SSL *, int, long, void *)",
}

#: Without these the callbacks cannot work: resolution fails if one is missing.
REQUIRED: tuple[str, ...] = (
    "SSL_CTX_sess_set_new_cb",
    "SSL_CTX_sess_set_get_cb",
    "SSL_CTX_sess_set_remove_cb",
    "SSL_SESSION_get_id",
    "SSL_SESSION_get_timeout",
    "i2d_SSL_SESSION",
    "d2i_SSL_SESSION",
    "SSL_CTX_get0_certificate",
    "SSL_CTX_get_client_CA_list",
    "SSL_CTX_get_info_callback",
    "i2d_X509",
    "ERR_peek_last_error",
    "CRYPTO_get_ex_new_index",
    "SSL_CTX_set_ex_data",
    "SSL_CTX_get_ex_data",
)

#: Nice to have; absent (e.g. ``SSL_CTX_set_num_tickets`` before OpenSSL 1.1.1) means ``None``.
OPTIONAL: tuple[str, ...] = tuple(n for n in SIGNATURES if n not in REQUIRED)

#: Functions the binding declares; they prove where the binding's OpenSSL is.
ANCHORS: tuple[str, ...] = (
    "SSL_version",
    "SSL_get1_session",
    "SSL_set_session",
    "SSL_session_reused",
    "SSL_SESSION_free",
    "SSL_CTX_set_session_id_context",
    "OpenSSL_version",
)
_MIN_ANCHORS = 3

#: Bytes of each function compared between memory and file (clipped to the segment).
_COMPARE_MIN = 16
_COMPARE_MAX = 64

_EM_X86_64 = 62
_EM_AARCH64 = 183
_MACHINES = {
    "x86_64": _EM_X86_64,
    "amd64": _EM_X86_64,
    "aarch64": _EM_AARCH64,
    "arm64": _EM_AARCH64,
}
_PT_NOTE = 4
_PF_X = 1
_NT_GNU_BUILD_ID = 3
_STT_FUNC = 2
_SHN_UNDEF = 0
_SHN_LORESERVE = 0xFF00
_ENDBR64 = b"\xf3\x0f\x1e\xfa"
_BTI_C = 0xD503245F
_BTI_JC = 0xD50324DF


def _bindings() -> tuple[Any, Any]:
    """pyOpenSSL's ``ffi`` and the real cffi ``Lib`` behind ``OpenSSL._util.lib``."""
    from OpenSSL._util import ffi, lib

    return ffi, getattr(lib, "_original_lib", lib)


@dataclass(frozen=True)
class Resolution:
    """The verified functions, ready to call, and how they were found.

    ``functions`` maps a name to a callable cdata (``None`` when an optional function is
    absent); ``addresses`` holds those found by ``method`` rather than declared by cffi.
    """

    method: str
    library_path: str
    build_id: str | None
    bias: int | None
    addresses: Mapping[str, int]
    functions: Mapping[str, Any]
    elapsed_s: float
    checks: tuple[str, ...] = field(default=())

    def get(self, name: str) -> Any:
        """The callable for ``name``; ``ResolverError`` if it could not be resolved."""
        fn = self.functions.get(name)
        if fn is None:
            raise ResolverError(f"{name} is not available in this OpenSSL ({self.method})")
        return fn


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int
    path: str


def _read_maps() -> list[_Mapping]:
    """This process's mappings; only Linux is supported (the whole scheme is ELF)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ResolverError(f"cannot read /proc/self/maps: {e}") from None
    out = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition("-")
        major, _, minor = parts[3].partition(":")
        try:
            out.append(
                _Mapping(
                    int(lo, 16),
                    int(hi, 16),
                    parts[1],
                    int(parts[2], 16),
                    (int(major, 16), int(minor, 16)),
                    int(parts[4]),
                    parts[5].strip() if len(parts) > 5 else "",
                )
            )
        except ValueError:
            continue
    return out


class _Image:
    """The mappings of one loaded file; every memory read is confined to them."""

    def __init__(self, maps: list[_Mapping], address: int) -> None:
        hit = next((m for m in maps if m.start <= address < m.end), None)
        if hit is None or hit.inode == 0:
            raise ResolverError(f"address {address:#x} is not inside a file mapping")
        self.path = hit.path
        self.dev = hit.dev
        self.inode = hit.inode
        self.maps = sorted(
            (m for m in maps if m.inode == hit.inode and m.dev == hit.dev), key=lambda m: m.start
        )
        # The ELF header is where the file's offset 0 is mapped, just below the code.
        starts = [m.start for m in self.maps if m.offset == 0 and m.start <= address]
        self.base = max(starts) if starts else None

    def contains(self, address: int, length: int, *, executable: bool = False) -> bool:
        """True if ``[address, address+length)`` lies in readable mappings of the file."""
        end = address + length
        for m in self.maps:
            if m.start <= address < m.end:
                if "r" not in m.perms or (executable and "x" not in m.perms):
                    return False
                if end <= m.end:
                    return True
                address = m.end  # continues into the next (adjacent) mapping
        return False

    def read(self, address: int, length: int, *, executable: bool = False) -> bytes:
        """Bytes from memory, after checking they belong to this image."""
        if not self.contains(address, length, executable=executable):
            kind = "executable " if executable else ""
            raise ResolverError(
                f"{length} bytes at {address:#x} are not in a readable {kind}mapping of {self.path}"
            )
        return ctypes.string_at(address, length)


def _cdata_address(ffi: Any, cdata: Any) -> int:
    return int(ffi.cast("uintptr_t", cdata))


def _stub_addresses(ffi: Any, lib: Any, names: Iterable[str]) -> dict[str, int]:
    """Addresses of cffi's direct-call stubs (``_cffi_d_X``) for the declared ``names``."""
    out = {}
    for name in names:
        if not hasattr(lib, name):
            continue
        try:
            out[name] = _cdata_address(ffi, ffi.addressof(lib, name))
        except (AttributeError, TypeError, ffi.error):
            continue
    return out


def _decode_jump(machine: int, address: int, code: bytes) -> tuple[str, int] | None:
    """Decode the single branch a cffi stub or a PLT entry consists of.

    Returns ``("direct", target)`` or ``("indirect", slot)`` (a GOT slot to load the target
    from), or ``None`` if the bytes are anything else.
    """
    if machine == _EM_X86_64:
        pc, c = address, code
        if c.startswith(_ENDBR64):
            pc, c = pc + 4, c[4:]
        if len(c) >= 5 and c[0] == 0xE9:
            return "direct", pc + 5 + struct.unpack_from("<i", c, 1)[0]
        if len(c) >= 6 and c[:2] == b"\xff\x25":
            return "indirect", pc + 6 + struct.unpack_from("<i", c, 2)[0]
        if len(c) >= 7 and c[:3] == b"\xf2\xff\x25":
            return "indirect", pc + 7 + struct.unpack_from("<i", c, 3)[0]
        return None
    if machine == _EM_AARCH64:
        if len(code) < 4:
            return None
        words = [w for (w,) in struct.iter_unpack("<I", code[: len(code) // 4 * 4])]
        pc = address
        if words[0] in (_BTI_C, _BTI_JC):
            pc, words = pc + 4, words[1:]
        if not words:
            return None
        insn = words[0]
        if insn & 0xFC000000 == 0x14000000:  # b imm26
            imm = insn & 0x03FFFFFF
            if imm & 0x02000000:
                imm -= 1 << 26
            return "direct", pc + imm * 4
        # PLT: adrp x16, page; ldr x17, [x16, #off]; add x16, x16, #off; br x17
        if len(words) >= 4 and insn & 0x9F00001F == 0x90000010 and words[3] == 0xD61F0220:
            ldr = words[1]
            if ldr & 0xFFC003FF != 0xF9400211:
                return None
            immlo, immhi = (insn >> 29) & 3, (insn >> 5) & 0x7FFFF
            imm = (immhi << 2) | immlo
            if imm & (1 << 20):
                imm -= 1 << 21
            page = (pc & ~0xFFF) + (imm << 12)
            return "indirect", page + ((ldr >> 10) & 0xFFF) * 8
        return None
    return None


def _machine() -> int:
    m = _MACHINES.get(platform.machine().lower())
    if m is None or sys.byteorder != "little" or struct.calcsize("P") != 8:
        raise ResolverError(f"unsupported platform: {platform.machine()} ({sys.byteorder})")
    return m


def _call_target(machine: int, image: _Image, stub: int) -> int | None:
    """Where a call through the stub at ``stub`` really lands, following PLT/GOT.

    ``None`` if the stub is not a plain tail jump (cffi adds a conversion when the declared
    return type differs from the real one): such an anchor proves nothing either way.
    """
    address = stub
    for depth in range(3):  # stub -> PLT -> GOT at most
        code = image.read(address, 16, executable=True)
        decoded = _decode_jump(machine, address, code)
        if decoded is None:
            return None if depth == 0 else address
        kind, value = decoded
        if kind == "indirect":
            slot = image.read(value, 8)
            return int(struct.unpack("<Q", slot)[0])
        if not image.contains(value, 16, executable=True):
            return value  # left the image (a shared libssl): that is the target
        address = value
    return address


# --------------------------------------------------------------------------- ELF file


@dataclass(frozen=True)
class _Symbol:
    value: int
    size: int


class _ElfFile:
    """The parts of the binding's ELF file the checks need (pyelftools + a fast symtab scan).

    ``verify`` sees the open file before anything is parsed (the RECORD check), so that the
    bytes verified are the bytes read, even if the path is replaced meanwhile.
    """

    def __init__(
        self, path: str, machine: int, verify: Callable[[BinaryIO], None] | None = None
    ) -> None:
        try:
            from elftools.common.exceptions import ELFError
            from elftools.elf.elffile import ELFFile
        except ImportError as e:
            raise ResolverError(f"pyelftools is not installed: {e}") from None
        self.path = path
        try:
            self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise ResolverError(f"cannot open {path}: {e}") from None
        try:
            if verify is not None:
                verify(self._f)
            elf = ELFFile(self._f)
            if elf.elfclass != 64 or not elf.little_endian:
                raise ResolverError(f"{path}: not a 64-bit little-endian ELF file")
            if elf["e_machine"] != {_EM_X86_64: "EM_X86_64", _EM_AARCH64: "EM_AARCH64"}[machine]:
                raise ResolverError(f"{path}: ELF machine {elf['e_machine']} is not this CPU")
            self.segments = [
                (
                    s["p_type"],
                    s["p_offset"],
                    s["p_vaddr"],
                    s["p_filesz"],
                    s["p_memsz"],
                    s["p_flags"],
                )
                for s in elf.iter_segments()
            ]
            self.build_id = self._build_id(elf)
            symtab = elf.get_section_by_name(".symtab")
            if symtab is None or symtab["sh_type"] != "SHT_SYMTAB":
                raise ResolverError(f"{path} has no .symtab (stripped binary)")
            strtab = elf.get_section(symtab["sh_link"])
            self._symtab = symtab.data()
            self._strtab = strtab.data()
            self._entsize = symtab["sh_entsize"] or 24
        except ELFError as e:
            self.close()
            raise ResolverError(f"{path}: not a readable ELF file: {e}") from None
        except BaseException:  # malformed input can raise anything: never leak the file
            self.close()
            raise

    @staticmethod
    def _build_id(elf: Any) -> str | None:
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_NOTE":
                continue
            for note in seg.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                    return str(note["n_desc"])
        return None

    def close(self) -> None:
        self._f.close()

    def functions(self, names: Iterable[str]) -> dict[str, list[_Symbol]]:
        """Every defined ``FUNC`` symbol (local or global) whose name is in ``names``."""
        wanted = set(names)
        strtab = self._strtab
        # Offsets in .strtab where a wanted name is stored (possibly as a merged suffix).
        offsets: dict[int, str] = {}
        for name in wanted:
            needle = name.encode() + b"\0"
            start = 0
            while (i := strtab.find(needle, start)) >= 0:
                offsets[i] = name
                start = i + 1
        found: dict[str, list[_Symbol]] = {n: [] for n in wanted}
        data = self._symtab
        if self._entsize != 24 or len(data) % 24:
            raise ResolverError(f"{self.path}: unexpected .symtab entry size {self._entsize}")
        for st_name, st_info, _other, st_shndx, st_value, st_size in struct.iter_unpack(
            "<IBBHQQ", data
        ):
            hit = offsets.get(st_name)
            if hit is None or st_info & 0xF != _STT_FUNC:
                continue
            if st_shndx == _SHN_UNDEF or st_shndx >= _SHN_LORESERVE:
                continue
            found[hit].append(_Symbol(st_value, st_size))
        return found

    def read_vaddr(self, vaddr: int, length: int) -> tuple[bytes, bool] | None:
        """File bytes at a virtual address (clipped to its PT_LOAD); flag: segment is code."""
        for p_type, offset, seg_vaddr, filesz, _memsz, flags in self.segments:
            if p_type == "PT_LOAD" and seg_vaddr <= vaddr < seg_vaddr + filesz:
                n = min(length, seg_vaddr + filesz - vaddr)
                self._f.seek(offset + vaddr - seg_vaddr)
                return self._f.read(n), bool(flags & _PF_X)
        return None


def _memory_build_id(image: _Image, bias: int) -> str | None:
    """The GNU build-id note of the image as mapped, via its in-memory program headers."""
    if image.base is None:
        raise ResolverError(f"the start of {image.path} is not mapped")
    ehdr = image.read(image.base, 64)
    if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
        raise ResolverError(f"no 64-bit ELF header mapped at {bias:#x}")
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", ehdr, 32)[0],
        *struct.unpack_from("<HH", ehdr, 54),
    )
    if phentsize < 56 or phnum > 64:
        raise ResolverError("implausible program headers in the mapped image")
    phdrs = image.read(image.base + phoff, phentsize * phnum)
    for i in range(phnum):
        p_type, _flags, _off, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", phdrs, i * phentsize
        )
        if p_type != _PT_NOTE or p_filesz > 4096:
            continue
        notes = image.read(bias + p_vaddr, p_filesz)
        pos = 0
        while pos + 12 <= len(notes):
            namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
            name_at = pos + 12
            desc_at = name_at + ((namesz + 3) & ~3)
            end = desc_at + ((descsz + 3) & ~3)
            if end > len(notes):
                break
            if ntype == _NT_GNU_BUILD_ID and notes[name_at : name_at + namesz] == b"GNU\0":
                return notes[desc_at : desc_at + descsz].hex()
            pos = end
    return None


# --------------------------------------------------------------------------- RECORD

_DIGEST_CACHE_SIZE = 8
_digest_lock = threading.Lock()
_digests: dict[tuple[str, int, int, int, int], str] = {}


def _file_sha256(path: str, f: BinaryIO) -> str:
    """The sha256 (hex) of an open file, computed once per (path, inode, size, mtime)."""
    st = os.fstat(f.fileno())
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _digest_lock:
        digest = _digests.get(key)
    if digest is None:
        f.seek(0)
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
        digest = h.hexdigest()
        f.seek(0)
        with _digest_lock:
            if len(_digests) >= _DIGEST_CACHE_SIZE:
                _digests.clear()
            _digests[key] = digest
    return digest


def _recorded_sha256(loaded_path: str) -> str:
    """The sha256 (hex) that the RECORD of the installed ``cryptography`` gives the binding."""
    from importlib import metadata

    try:
        dist = metadata.distribution("cryptography")
    except metadata.PackageNotFoundError:
        raise ResolverError(
            "cryptography has no installed distribution metadata: cannot verify "
            f"{loaded_path} against a RECORD"
        ) from None
    files = dist.files
    if files is None:
        raise ResolverError(
            f"cryptography {dist.version} was installed without a RECORD: "
            f"cannot verify {loaded_path}"
        )
    target = os.path.realpath(loaded_path)
    name = os.path.basename(target)
    for entry in files:
        if entry.name != name or os.path.realpath(str(entry.locate())) != target:
            continue
        if entry.hash is None or entry.hash.mode != "sha256":
            raise ResolverError(f"cryptography's RECORD lists {entry} without a sha256")
        value = entry.hash.value
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    raise ResolverError(f"{loaded_path} is not listed in the RECORD of cryptography {dist.version}")


def _check_record(f: BinaryIO, path: str, loaded_path: str, checks: list[str]) -> None:
    """Refuse unless ``path`` (open as ``f``) is the file the wheel installed as the binding."""
    expected = _recorded_sha256(loaded_path)
    actual = _file_sha256(path, f)
    if actual != expected:
        raise ResolverError(
            f"{path}: sha256 {actual[:16]}... differs from cryptography's RECORD "
            f"({expected[:16]}...): the file is not the one the wheel installed"
        )
    checks.append(f"{path}: sha256 matches cryptography's RECORD")


# --------------------------------------------------------------------------- strategies


def _cast_all(ffi: Any, addresses: Mapping[str, int]) -> dict[str, Any]:
    return {name: ffi.cast(SIGNATURES[name], addr) for name, addr in addresses.items()}


def _from_cffi(lib: Any) -> dict[str, Any]:
    """Functions the binding itself declares (a future cryptography may declare them all)."""
    return {name: getattr(lib, name) for name in SIGNATURES if hasattr(lib, name)}


def _via_dlsym(
    machine: int,
    image: _Image,
    stubs: Mapping[str, int],
    names: Iterable[str],
    checks: list[str],
) -> dict[str, int]:
    """Dynamically linked binding: ``dlsym`` on its own handle, proven by the anchors."""
    try:
        handle = ctypes.CDLL(image.path, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    except OSError as e:
        raise ResolverError(f"dlopen(RTLD_NOLOAD) of {image.path} failed: {e}") from None
    libc = ctypes.CDLL(None)
    dlsym = libc.dlsym
    dlsym.restype = ctypes.c_void_p
    dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

    def lookup(name: str) -> int | None:
        addr = dlsym(handle._handle, name.encode())
        return int(addr) if addr else None

    anchors = {n: a for n, a in stubs.items() if n in ANCHORS}
    proven = 0
    for name, stub in anchors.items():
        found = lookup(name)
        if found is None:
            raise ResolverError(f"dlsym finds no {name} (OpenSSL is not dynamically linked)")
        target = _call_target(machine, image, stub)
        if target is None:
            continue
        if found != target:
            raise ResolverError(
                f"dlsym({name}) = {found:#x} but the binding calls {target:#x} (interposed?)"
            )
        proven += 1
    if proven < _MIN_ANCHORS:
        raise ResolverError(f"only {proven} anchors could be checked against dlsym")
    checks.append(f"dlsym agrees with the binding's calls for {proven} anchors")
    out = {}
    for name in names:
        addr = lookup(name)
        if addr is not None:
            out[name] = addr
    return out


def _via_symtab(
    machine: int,
    image: _Image,
    stubs: Mapping[str, int],
    names: Iterable[str],
    elf_path: str,
    checks: list[str],
) -> tuple[dict[str, int], int, str]:
    """Statically linked binding: ``.symtab`` + load bias, with every cross-check.

    ``elf_path`` must hash to the RECORD entry of the loaded binding (``image.path``).
    """
    names = list(names)
    anchors = {n: a for n, a in stubs.items() if n in ANCHORS}
    loaded = image.path.removesuffix(" (deleted)")
    elf = _ElfFile(elf_path, machine, lambda f: _check_record(f, elf_path, loaded, checks))
    try:
        syms = elf.functions([*names, *anchors, *(f"_cffi_d_{n}" for n in anchors)])

        def unique(name: str) -> _Symbol | None:
            found = syms.get(name, [])
            if len(found) > 1:
                raise ResolverError(f"{name} is defined {len(found)} times in {elf_path}")
            return found[0] if found else None

        # 1. The load bias, from every anchor's stub; they must all agree.
        biases = {}
        for name, stub in anchors.items():
            sym = unique(f"_cffi_d_{name}")
            if sym is None:
                raise ResolverError(f"_cffi_d_{name} is not in the .symtab of {elf_path}")
            biases[name] = stub - sym.value
        if len(set(biases.values())) != 1:
            raise ResolverError(f"load bias differs between anchors: {biases}")
        bias = next(iter(biases.values()))
        first = min((v for t, _o, v, *_ in elf.segments if t == "PT_LOAD"), default=0)
        expected = bias + (first & ~0xFFF)
        if image.base is not None and image.base != expected:
            raise ResolverError(f"load bias {bias:#x} does not fit mapping at {image.base:#x}")
        checks.append(f"bias {bias:#x} agrees across {len(biases)} anchors and the mapping")

        # 2. The in-memory build-id must be the file's.
        mem_id = _memory_build_id(image, bias)
        if mem_id is None or elf.build_id is None:
            raise ResolverError("no GNU build-id to compare between memory and file")
        if mem_id != elf.build_id:
            raise ResolverError(f"build-id in memory {mem_id} != file {elf.build_id}")
        checks.append(f"build-id {mem_id} matches")

        def verify_bytes(name: str, sym: _Symbol) -> int:
            addr = bias + sym.value
            want = min(max(sym.size, _COMPARE_MIN), _COMPARE_MAX)
            got = elf.read_vaddr(sym.value, want)
            if got is None or not got[1] or not got[0]:
                raise ResolverError(f"{name} is not in an executable segment of {elf_path}")
            file_bytes = got[0]
            if image.read(addr, len(file_bytes), executable=True) != file_bytes:
                raise ResolverError(f"{name}: bytes in memory differ from {elf_path}")
            return addr

        # 3. Each stub jumps straight to bias + .symtab value of its function.
        proven = 0
        for name, stub in anchors.items():
            sym = unique(name)
            if sym is None:
                raise ResolverError(f"{name} is not in the .symtab of {elf_path}")
            stub_sym = unique(f"_cffi_d_{name}")
            if stub_sym is None:  # cannot happen: step 1 checked it
                raise ResolverError(f"_cffi_d_{name} vanished from {elf_path}")
            verify_bytes(f"_cffi_d_{name}", stub_sym)
            decoded = _decode_jump(machine, stub, image.read(stub, 16, executable=True))
            if decoded is None:
                continue  # a converting stub (declared type differs): proves nothing
            if decoded != ("direct", bias + sym.value):
                raise ResolverError(
                    f"_cffi_d_{name} jumps to {decoded[1]:#x}, .symtab says {bias + sym.value:#x}"
                )
            verify_bytes(name, sym)
            proven += 1
        if proven < _MIN_ANCHORS:
            raise ResolverError(f"only {proven} anchor stubs are plain jumps")
        checks.append(f"{proven} stubs jump to their .symtab targets")

        # 4. The wanted functions: unique FUNC symbols whose bytes match the file.
        out = {}
        for name in names:
            sym = unique(name)
            if sym is not None:
                out[name] = verify_bytes(name, sym)
        checks.append(f"{len(out)} functions' first bytes match the file")
        return out, bias, mem_id
    finally:
        elf.close()


# --------------------------------------------------------------------------- entry point

_lock = threading.Lock()
_cached: Resolution | ResolverError | None = None


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def resolve(binary_path: str | os.PathLike[str] | None = None) -> Resolution:
    """The verified functions for pyOpenSSL's OpenSSL, or ``ResolverError``.

    With ``binary_path`` the mapped binding is checked against that file instead of the one it
    was loaded from (tests use altered copies); such results are not cached. Set
    ``TLSCACHE_DISABLE_RESOLVER=1`` to refuse outright.
    """
    global _cached
    if _disabled():
        raise ResolverError(f"disabled by {DISABLE_ENV}={os.environ.get(DISABLE_ENV)}")
    if binary_path is not None:
        return _resolve_safely(os.fspath(binary_path))
    with _lock:
        if _cached is None:
            try:
                _cached = _resolve_safely(None)
            except ResolverError as e:
                _cached = e
        if isinstance(_cached, ResolverError):
            raise ResolverError(_cached.reason)
        return _cached


def _resolve_safely(binary_path: str | None) -> Resolution:
    """``_resolve``, with any unexpected failure turned into a ``ResolverError``."""
    try:
        return _resolve(binary_path, force_file=binary_path is not None)
    except ResolverError:
        raise
    except Exception as e:
        raise ResolverError(f"unexpected error while resolving: {e!r}") from e


def _reset_cache() -> None:
    """Forget the cached result (tests only)."""
    global _cached
    with _lock:
        _cached = None


def _loaded_file(image: _Image, checks: list[str]) -> str:
    """The path of the file the binding was loaded from, if it is still that file."""
    path = image.path
    if path.endswith(" (deleted)"):
        raise ResolverError(f"{path}: the loaded binding was replaced on disk")
    try:
        st = os.stat(path)
    except OSError as e:
        raise ResolverError(f"cannot stat {path}: {e}") from None
    if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) != (*image.dev, image.inode):
        # Overlay filesystems may report the lower layer's inode in /proc/self/maps, so this
        # alone proves nothing: the build-id and byte checks decide.
        checks.append(f"{path}: inode differs from the mapping; content checks decide")
    else:
        checks.append(f"{path} is the mapped file (same device and inode)")
    return path


def _resolve(binary_path: str | None, *, force_file: bool) -> Resolution:
    started = time.perf_counter()
    try:
        ffi, lib = _bindings()
    except Exception as e:  # pyOpenSSL/cryptography broken: not ours to crash on
        raise ResolverError(f"cannot import pyOpenSSL's bindings: {e!r}") from None

    functions = _from_cffi(lib)
    missing = [n for n in SIGNATURES if n not in functions]
    if not missing and not force_file:
        return Resolution("cffi", "", None, None, {}, functions, time.perf_counter() - started)

    machine = _machine()
    stubs = _stub_addresses(ffi, lib, ANCHORS)
    if len(stubs) < _MIN_ANCHORS:
        raise ResolverError(f"only {len(stubs)} anchor functions are declared by the binding")
    image = _Image(_read_maps(), next(iter(stubs.values())))
    for name, stub in stubs.items():
        if not image.contains(stub, 16, executable=True):
            raise ResolverError(f"stub of {name} is not in {image.path}")

    checks: list[str] = []
    reasons: list[str] = []
    addresses: dict[str, int] = {}
    method = ""
    bias: int | None = None
    build_id: str | None = None
    if not force_file:
        try:
            addresses = _via_dlsym(machine, image, stubs, missing, checks)
            method = "dlsym"
        except ResolverError as e:
            reasons.append(f"dlsym: {e.reason}")
    if not method:
        try:
            path = binary_path if binary_path is not None else _loaded_file(image, checks)
            addresses, bias, build_id = _via_symtab(machine, image, stubs, missing, path, checks)
            method = "symtab"
        except ResolverError as e:
            reasons.append(f"symtab: {e.reason}")
            raise ResolverError("; ".join(reasons)) from None
        checks[:0] = [f"not used: {r}" for r in reasons]

    functions.update(_cast_all(ffi, addresses))
    absent = [n for n in REQUIRED if n not in functions]
    if absent:
        raise ResolverError(f"not found ({method}): {', '.join(absent)}")
    for name in OPTIONAL:
        functions.setdefault(name, None)
    return Resolution(
        method,
        image.path,
        build_id,
        bias,
        addresses,
        functions,
        time.perf_counter() - started,
        tuple(checks),
    )
