"""Fixtures of the export tests (tiny configs and weights live in tests/support/tiny.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_clip_cache(tmp_path_factory) -> Path:
    """Where the demo's tiny CLIP is built (once per session), instead of ~/.cache."""
    return tmp_path_factory.mktemp("tiny_clip_cache")
