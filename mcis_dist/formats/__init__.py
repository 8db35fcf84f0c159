"""On-disk formats every stage reads and writes: shard, CAM and label manifests and shards."""
