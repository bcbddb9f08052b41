"""distcache: the wire protocol, cache, server, clients, proxy and snoop."""
