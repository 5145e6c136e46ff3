"""Data: datasets, transforms and loaders; augmentation and decoding; shards and object storage; COCO-format sets."""
