"""Offline preprocessing: raw image-caption shards -> latent shards."""
