"""tlscache.stores."""
