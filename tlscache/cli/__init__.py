"""tlscache.cli."""
