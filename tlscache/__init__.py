"""tlscache: a shared TLS session cache for pyOpenSSL servers."""

__version__ = "0.1.0"
