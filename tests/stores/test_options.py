"""One options value for the memcached and Redis stores: constructors, keywords, store strings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from tlscache.exceptions import ConfigurationError
from tlscache.stores.memcached import MemcachedStore
from tlscache.stores.options import SPEC_OPTIONS, RemoteOptions
from tlscache.stores.redis import RedisClusterStore, RedisStore
from tlscache.stores.spec import OPTIONS, StoreOptions, open_store, parse_store_spec

CUSTOM = RemoteOptions(key_prefix="p:", connect_timeout_s=0.2, retry_s=7.0, pool_size=3)


def test_defaults_are_the_documented_ones() -> None:
    assert RemoteOptions() == RemoteOptions("tlscache:", 0.05, 5.0, 8)


def test_out_of_range_values_are_refused() -> None:
    for bad in (
        {"connect_timeout_s": 0},
        {"connect_timeout_s": float("nan")},
        {"retry_s": -1},
        {"retry_s": float("inf")},
        {"pool_size": -1},
        {"pool_size": 2.5},
        {"pool_size": True},
    ):
        with pytest.raises(ConfigurationError):
            RemoteOptions(**bad)
    with pytest.raises(ConfigurationError):
        RemoteOptions().merged(no_such_option=1)


def test_merged_replaces_only_what_is_given() -> None:
    assert CUSTOM.merged(retry_s=None, pool_size=None) == CUSTOM
    assert CUSTOM.merged(pool_size=1) == dataclasses.replace(CUSTOM, pool_size=1)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: MemcachedStore(["127.0.0.1:1"], **kw),
        lambda **kw: RedisStore("redis://127.0.0.1:1", **kw),
        lambda **kw: RedisClusterStore(["127.0.0.1:1"], **kw),
    ],
    ids=["memcached", "redis", "redis-cluster"],
)
def test_stores_take_options_and_keywords(
    make: Callable[..., MemcachedStore | RedisStore | RedisClusterStore],
) -> None:
    """No server is reached: constructing a store does not connect."""
    with make() as store:
        assert store.options == RemoteOptions(), store.options
    with make(options=CUSTOM) as store:
        got = (store.options, store.key_prefix, store.connect_timeout_s, store.retry_s)
        assert got == (CUSTOM, "p:", 0.2, 7.0), got
        assert store.pool_size == 3
    with make(options=CUSTOM, retry_s=1.0, key_prefix="k:") as store:  # keywords win
        assert store.options == dataclasses.replace(CUSTOM, retry_s=1.0, key_prefix="k:")
    with make(pool_size=2, connect_timeout_s=0.5) as store:  # the keywords alone, as before
        assert store.options == RemoteOptions(connect_timeout_s=0.5, pool_size=2)


@pytest.mark.parametrize(
    "text",
    [
        "memcached:127.0.0.1:1?prefix=p:&timeout_ms=200&retry=7&pool=3",
        "redis://127.0.0.1:1?prefix=p:&timeout_ms=200&retry=7&pool=3",
        "redis-cluster://127.0.0.1:1?prefix=p:&timeout_ms=200&retry=7&pool=3",
    ],
)
def test_a_store_string_gives_the_same_options(text: str) -> None:
    with open_store(text) as store:
        assert isinstance(store, MemcachedStore | RedisStore | RedisClusterStore)
        assert store.options == CUSTOM, store.options
    base = text.partition("?")[0]
    with open_store(base) as store:
        assert isinstance(store, MemcachedStore | RedisStore | RedisClusterStore)
        assert store.options == RemoteOptions(), store.options
    assert str(parse_store_spec(text)) == text


def test_every_remote_option_is_a_store_string_option() -> None:
    """A field added to RemoteOptions needs its name in StoreOptions too (and nothing else)."""
    names = {f.name for f in dataclasses.fields(StoreOptions)}
    assert set(SPEC_OPTIONS) <= names, (set(SPEC_OPTIONS), names)
    for kind in ("memcached", "redis", "rediss", "redis-cluster"):
        assert set(SPEC_OPTIONS) <= set(OPTIONS[kind]), (kind, OPTIONS[kind])
