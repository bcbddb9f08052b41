"""Objects that must live exactly as long as an OpenSSL ``SSL_CTX``.

OpenSSL keeps bare pointers to the cffi callbacks registered on an ``SSL_CTX`` and calls
them for as long as that ``SSL_CTX`` lives. That can be longer than the Python object that
made it: a connection switched to another context by SNI keeps its first ``SSL_CTX`` (its
session context, whose session and ticket callbacks OpenSSL keeps calling) after the
Python context is gone. A callback owned by the Python context would then be freed under
OpenSSL's feet, or have to be unregistered, which silently turns caching off for those
connections. So the callbacks belong to the ``SSL_CTX``: a registry claims one ex-data
index per library whose free callback OpenSSL runs when it really frees an ``SSL_CTX``,
and the entry kept for that address goes then, its callbacks with it.

Hand-written because neither pyOpenSSL nor the ``ssl`` module offers a hook on
``SSL_CTX_free``. One registry per OpenSSL library in the process (pyOpenSSL's, and the
system library the ``ssl`` module uses), each through its own FFI.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Any

from tlscache.exceptions import ConfigurationError

__all__ = ["CtxEntry", "SslCtxRegistry"]

_EX_INDEX_SSL_CTX = 1  # CRYPTO_EX_INDEX_SSL_CTX
#: ``CRYPTO_EX_free``: (parent, ptr, CRYPTO_EX_DATA *, index, argl, argp).
FREE_CALLBACK_TYPE = "void (*)(void *, void *, void *, int, long, void *)"

_collecting = threading.local()


def _note_collection(phase: str, info: dict[str, int]) -> None:
    _collecting.now = phase == "start"


gc.callbacks.append(_note_collection)


class CtxEntry:
    """What one ``SSL_CTX`` keeps alive, in named lists (one per layer: the session
    callbacks, the ticket-key callback, the ClientHello callbacks), newest last: a
    handshake on another thread may still be inside an older one."""

    __slots__ = ("_lists",)

    def __init__(self) -> None:
        self._lists: dict[str, list[Any]] = {}

    def kept(self, name: str) -> list[Any]:
        """The list ``name`` (made empty on first use); append to keep."""
        found = self._lists.get(name)
        if found is None:
            found = self._lists[name] = []
        return found

    def newest(self, name: str) -> Any:
        """The last object kept under ``name``, or None."""
        found = self._lists.get(name)
        return found[-1] if found else None


class SslCtxRegistry:
    """``SSL_CTX`` address -> :class:`CtxEntry`, for one OpenSSL library.

    ``functions()`` returns that library's ``CRYPTO_get_ex_new_index`` and
    ``SSL_CTX_set_ex_data`` (called once, when the first entry is made); ``ffi`` is the FFI
    they were cast with. An entry exists from :meth:`entry` until OpenSSL frees the
    ``SSL_CTX``, so an address is never reused while its entry exists.
    """

    def __init__(
        self,
        ffi: Any,
        functions: Callable[[], tuple[Any, Any]],
        onerror: Callable[[Any, Any, Any], None],
    ) -> None:
        self._ffi = ffi
        self._functions = functions
        self._onerror = onerror
        self._entries: dict[int, CtxEntry] = {}
        #: Entries dropped inside a garbage collection: released at the next free outside one.
        self._graveyard: list[CtxEntry] = []
        self._free_callback: Any = None  # made once, kept for the life of the process
        self._index: int | None = None
        self._set_ex_data: Any = None
        self._lock = threading.Lock()

    def address(self, raw: Any) -> int:
        """The address of an ``SSL_CTX *`` cdata of this registry's FFI."""
        return int(self._ffi.cast("uintptr_t", raw))

    def get(self, raw: Any) -> CtxEntry | None:
        """The entry of ``raw``, or None if nothing is kept for it."""
        return self._entries.get(self.address(raw))

    def entry(self, raw: Any) -> CtxEntry:
        """The entry of ``raw``, made (and tied to its ``SSL_CTX``) if there is none yet.

        Raises ``ConfigurationError`` if OpenSSL refuses the ex-data index or slot.
        """
        address = self.address(raw)
        with self._lock:
            found = self._entries.get(address)
            if found is not None:
                return found
            index = self._ensure_index()
            # The marker (any non-NULL pointer) tells the free callback this SSL_CTX is ours.
            if self._set_ex_data(raw, index, self._ffi.cast("void *", address)) != 1:
                raise ConfigurationError("SSL_CTX_set_ex_data failed")
            found = self._entries[address] = CtxEntry()
            return found

    def keep(self, raw: Any, name: str, *objects: Any) -> None:
        """Keep ``objects`` alive under ``name`` as long as the ``SSL_CTX`` ``raw``."""
        self.entry(raw).kept(name).extend(objects)

    def __len__(self) -> int:
        return len(self._entries)

    def _ensure_index(self) -> int:
        """This library's ex-data index for ``SSL_CTX`` (one per process; under the lock)."""
        if self._index is None:
            new_index, set_ex_data = self._functions()
            ffi = self._ffi
            callback = ffi.callback(FREE_CALLBACK_TYPE, self._on_free, onerror=self._onerror)
            index = int(new_index(_EX_INDEX_SSL_CTX, 0, ffi.NULL, ffi.NULL, ffi.NULL, callback))
            if index < 0:
                raise ConfigurationError("CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_SSL_CTX) failed")
            self._free_callback, self._set_ex_data, self._index = callback, set_ex_data, index
        return self._index

    def _on_free(self, parent: Any, ptr: Any, ad: Any, idx: int, argl: int, argp: Any) -> None:
        """OpenSSL frees an ``SSL_CTX`` (any, ours or not): drop its entry.

        Runs wherever the last reference goes, possibly inside a garbage collection (with
        any lock of this thread held): so no lock, and there the entry is only moved aside,
        its objects released at the next free outside a collection.
        """
        try:
            if ptr == self._ffi.NULL:
                return  # not one of ours
            entry = self._entries.pop(self.address(parent), None)
            if getattr(_collecting, "now", False):
                if entry is not None:
                    self._graveyard.append(entry)
                return
            del entry
            if self._graveyard:
                self._graveyard.clear()
        except Exception:  # interpreter shutdown: module globals may already be gone
            return
