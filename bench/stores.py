"""The remote session stores of the benchmarks, started on loopback and stopped after.

:func:`store_fleet` starts a dc_server, a dc_client in front of it (unix socket), a group of
three memcached servers, one Redis server and a 3-master Redis Cluster, and yields the store
string (:func:`tlscache.stores.open_store`) of each. The memcached and Redis servers are the
test suite's (``tests/memcache/servers.py``, ``tests/redisutil.py``); a kind whose server
binary is missing is left out.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.memcache.servers import MEMCACHED, memcached_servers
from tests.redisutil import REDIS_SERVER, redis_cluster, redis_server
from tlscache_farm.procs import free_port, running, tool, wait_proxy_connected

__all__ = ["STORE_NAMES", "store_fleet"]

#: The stores, in the order the reports list them.
STORE_NAMES = ("dc_server", "dc_client", "memcached x3", "redis", "redis-cluster x3")


@contextlib.contextmanager
def store_fleet(directory: Path) -> Iterator[dict[str, str]]:
    """Every store's server(s) running; name -> store string. All stopped when the block ends."""
    with contextlib.ExitStack() as stack:
        dc = f"IP:127.0.0.1:{free_port()}"
        proxy = f"UNIX:{directory / 'dc_client.sock'}"
        stack.enter_context(running(tool("dc_server", "-listen", dc), ready=dc))
        argv_proxy = tool("dc_client", "-listen", proxy, "-server", dc, "-retry", "100")
        stack.enter_context(running(argv_proxy, ready=proxy, stderr=subprocess.DEVNULL))
        wait_proxy_connected(proxy)
        specs = {"dc_server": f"distcache:{dc}", "dc_client": f"distcache:{proxy}"}
        if MEMCACHED is not None:
            group = stack.enter_context(memcached_servers(3))
            specs["memcached x3"] = "memcached:" + ",".join(s.address for s in group)
        if REDIS_SERVER is not None:
            one = stack.enter_context(redis_server())
            specs["redis"] = f"redis://{one.address}"
            cluster = stack.enter_context(redis_cluster())
            specs["redis-cluster x3"] = "redis-cluster://" + ",".join(cluster.nodes)
        yield specs
