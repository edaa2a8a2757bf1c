"""scaletrain/models."""
