"""Data: offline preprocessing of raw image-caption shards into latent shards, the image and
text encoders, aspect buckets, the shard format, and the training loader over latent shards
(or generated data for engine tests)."""
