"""The training loader over latent shards."""
