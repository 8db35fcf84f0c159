"""Dataset sources and shard writing for mcis_dist."""
