"""scaletrain/diffusion."""
