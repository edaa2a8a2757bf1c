"""Files users read get the mode their umask asks for, whatever the writer library does."""

from __future__ import annotations

import os
import stat

from scaletrain.core.files import atomic_output, current_umask


def test_atomic_output_gives_a_private_writers_file_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        with atomic_output(tmp_path / "grid.png") as tmp:
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))  # like safetensors
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "grid.png").stat().st_mode) == 0o644
