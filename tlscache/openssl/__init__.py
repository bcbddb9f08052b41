"""tlscache.openssl."""
