"""scaletrain/train."""
