"""Training-time monitoring: metrics, wandb, throughput/MFU, diagnostics, validation."""
