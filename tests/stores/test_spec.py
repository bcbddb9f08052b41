"""Store strings: every form, canonical round trips, and an error naming the bad part."""

from __future__ import annotations

import pytest

from tlscache.exceptions import ConfigurationError
from tlscache.stores import DistcacheStore, MemoryStore
from tlscache.stores.near import NearCache
from tlscache.stores.spec import StoreOptions, StoreSpec, open_store, parse_store_spec

# (string, kind, servers, name, options, canonical string)
FORMS = [
    ("memory:", "memory", (), None, StoreOptions(), "memory:"),
    ("memory", "memory", (), None, StoreOptions(), "memory:"),
    ("memory:?max=500", "memory", (), None, StoreOptions(max=500), "memory:?max=500"),
    (
        "distcache:UNIX:/run/dcc.sock",
        "distcache",
        ("UNIX:/run/dcc.sock",),
        None,
        StoreOptions(),
        "distcache:UNIX:/run/dcc.sock",
    ),
    (
        "distcache:IP:127.0.0.1:9000?pool=2",
        "distcache",
        ("IP:127.0.0.1:9000",),
        None,
        StoreOptions(pool=2),
        "distcache:IP:127.0.0.1:9000?pool=2",
    ),
    (
        "memcached:127.0.0.1:11211,127.0.0.1:11212",
        "memcached",
        ("127.0.0.1:11211", "127.0.0.1:11212"),
        None,
        StoreOptions(),
        "memcached:127.0.0.1:11211,127.0.0.1:11212",
    ),
    (
        "memcached:cache-a.example",
        "memcached",
        ("cache-a.example:11211",),
        None,
        StoreOptions(),
        "memcached:cache-a.example:11211",
    ),
    (
        "memcached:[::1]",
        "memcached",
        ("[::1]:11211",),
        None,
        StoreOptions(),
        "memcached:[::1]:11211",
    ),
    (
        "memcached:sessions=[::1]:11211,127.0.0.1:11212?placement=apache&prefix=mod_ssl-sess:",
        "memcached",
        ("[::1]:11211", "127.0.0.1:11212"),
        "sessions",
        StoreOptions(prefix="mod_ssl-sess:", placement="apache"),
        "memcached:sessions=[::1]:11211,127.0.0.1:11212?prefix=mod_ssl-sess:&placement=apache",
    ),
    (
        "memcached:h:1?retry=5&timeout_ms=50&pool=4&near=256&near_ttl=0.5",
        "memcached",
        ("h:1",),
        None,
        StoreOptions(timeout_ms=50, retry=5, pool=4, near=256, near_ttl=0.5),
        "memcached:h:1?timeout_ms=50&retry=5&pool=4&near=256&near_ttl=0.5",
    ),
    (
        "redis://127.0.0.1",
        "redis",
        ("127.0.0.1:6379",),
        None,
        StoreOptions(),
        "redis://127.0.0.1:6379",
    ),
    (
        "redis://[::1]:6380/2?prefix=a%2Fb",
        "redis",
        ("[::1]:6380",),
        None,
        StoreOptions(prefix="a/b", db=2),
        "redis://[::1]:6380/2?prefix=a%2Fb",
    ),
    (
        "rediss://cache.example:6380/0",
        "rediss",
        ("cache.example:6380",),
        None,
        StoreOptions(db=0),
        "rediss://cache.example:6380/0",
    ),
    (
        "redis-cluster://127.0.0.1:7000,127.0.0.1:7001,[::1]:7002?timeout_ms=20",
        "redis-cluster",
        ("127.0.0.1:7000", "127.0.0.1:7001", "[::1]:7002"),
        None,
        StoreOptions(timeout_ms=20),
        "redis-cluster://127.0.0.1:7000,127.0.0.1:7001,[::1]:7002?timeout_ms=20",
    ),
]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f[0])
def test_every_form(form: tuple[str, str, tuple[str, ...], str | None, StoreOptions, str]) -> None:
    text, kind, servers, name, options, canonical = form
    spec = parse_store_spec(text)
    assert spec == StoreSpec(kind, servers, name, options), spec  # type: ignore[arg-type]
    assert str(spec) == canonical
    # The canonical string parses back to the same record, and is a fixed point.
    assert parse_store_spec(str(spec)) == spec
    assert str(parse_store_spec(str(spec))) == str(spec)


def test_label_names_a_group() -> None:
    assert parse_store_spec("memcached:sessions=h:1").label == "sessions"
    assert parse_store_spec("memcached:h:1").label == "memcached:h:1"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "empty"),
        (" memory:", "whitespace"),
        ("shmcb:/tmp/x", "kind 'shmcb'"),
        ("memcache:h:1", "kind 'memcache'"),
        ("http://h:1", "scheme 'http'"),
        ("memcached:", "no server"),
        ("memcached:h:1,,h:2", "server ''"),
        ("memcached:h:1,h:1", "listed twice"),
        ("memcached:[::1]:11211,[::1]", "listed twice"),
        ("memcached:h:x", "port 'x'"),
        ("memcached:h:0", "port '0'"),
        ("memcached:h:70000", "port '70000'"),
        ("memcached:::1:11211", "brackets"),
        ("memcached:[::1", "brackets"),
        ("memcached:[::1]x", "after ']'"),
        ("memcached:[nothex]:1", "brackets"),
        ("memcached:ho st:1", "host 'ho st'"),
        ("memcached:bad name=h:1", "group name 'bad name'"),
        ("memcached:=h:1", "group name ''"),
        ("memcached:h:1?placement=random", "placement='random'"),
        ("memcached:h:1?retry=0", "retry='0'"),
        ("memcached:h:1?retry=nan", "retry='nan'"),
        ("memcached:h:1?pool=1.5", "pool='1.5'"),
        ("memcached:h:1?pool=8&pool=2", "given twice"),
        ("memcached:h:1?prefix=", "prefix"),
        ("memcached:h:1?colour=red", "option 'colour'"),
        ("memcached:h:1?near", "option 'near'"),
        ("memory:?prefix=x", "option 'prefix'"),
        ("redis://h:1?placement=apache", "option 'placement'"),
        ("redis://h:1,h:2", "takes one server"),
        ("redis://h:1/16", "database /16"),
        ("redis://h:1/x", "database /x"),
        ("redis://user:secret@h:1", "user or password"),
        ("redis://", "no server"),
        ("redis-cluster://h:1/1", "database /1"),
        ("distcache:TCP:h:1", "distcache address 'TCP:h:1'"),
        ("distcache:IP:9000", "distcache address 'IP:9000'"),
        ("distcache:UNIX:", "distcache address 'UNIX:'"),
        ("distcache:IP:h:1?prefix=x", "option 'prefix'"),
    ],
)
def test_errors(text: str, names: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_store_spec(text)
    assert names in str(info.value), str(info.value)
    assert "secret" not in str(info.value) or "secret@" in text  # the whole string is quoted


def test_open_memory_and_distcache(tmp_path: object) -> None:
    memory = open_store("memory:?max=3")
    assert isinstance(memory, MemoryStore) and memory.max_entries == 3
    dc = open_store(parse_store_spec("distcache:UNIX:/nonexistent/dcc.sock?pool=1"))
    assert isinstance(dc, DistcacheStore) and dc.address == "UNIX:/nonexistent/dcc.sock"
    dc.close()
    near = open_store("distcache:UNIX:/nonexistent/dcc.sock?near=16&near_ttl=0.25")
    assert isinstance(near, NearCache)
    assert (near.max_entries, near.ttl_s, type(near.inner)) == (16, 0.25, DistcacheStore)
    near.close()


def test_near_refuses_memory() -> None:
    with pytest.raises(ConfigurationError, match="option 'near'"):
        open_store("memory:?near=10")


def test_distcache_link_tls_options() -> None:
    text = "distcache:IP:127.0.0.1:9000?tls_cert=/etc/c.pem&tls_key=/etc/c.key&tls_ca=/etc/ca.pem"
    spec = parse_store_spec(text + "&tls_name=cache.internal")
    assert spec.options.tls_cert == "/etc/c.pem" and spec.options.tls_name == "cache.internal"
    assert parse_store_spec(str(spec)) == spec
    for bad in (
        "distcache:IP:127.0.0.1:9000?tls_cert=/etc/c.pem",  # not all three
        "distcache:IP:127.0.0.1:9000?tls_name=cache.internal",  # a name without files
        "memcached:127.0.0.1?tls_cert=/c&tls_key=/k&tls_ca=/ca",  # not a distcache option
    ):
        with pytest.raises(ConfigurationError, match="tls"):
            parse_store_spec(bad)
