"""Streaming input: shards → decoded, augmented images → class-keyed pairs → batches.

``loader.build_pair_loader`` is the entry point; ``pairs.PairPool`` is the pairing logic shared by
both backends (``stream``: webdataset + PIL in DataLoader workers; ``dali``: NVIDIA DALI).
"""
