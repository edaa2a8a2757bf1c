"""Cost of checkpoint checksums: fsync + sha256 of a file (what each rank does for its share
of a checkpoint before COMPLETE) against the torch.save that wrote it, interleaved.

    python benchmarks/checkpoint_hash.py [MiB]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from scaletrain.core.run_dir import hash_files


def main(mib: int = 256, repeats: int = 3) -> None:
    tensor = torch.randn(mib << 18)  # fp32: 4 bytes each
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.pt"
        saves, hashes = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.save(tensor, path)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hash_files(Path(tmp), [path.name])
            hashes.append(time.perf_counter() - t0)
        size = path.stat().st_size / 2**20
    save, hashed = min(saves), min(hashes)
    print(f"{size:.0f} MiB: torch.save {save:.3f} s, fsync+sha256 {hashed:.3f} s, "
          f"ratio {hashed / save:.2f}, {size / hashed:.0f} MiB/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
