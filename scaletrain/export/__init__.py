"""Export a training checkpoint's EMA or raw weights; load an export back.

Public API::

    export_checkpoint(run_dir, out_dir, step=None, weights="ema", layout="safetensors",
                      dtype="fp32") -> ExportResult
    export_state_dict(state_dict, root_cfg, out_dir, layout=..., weights=..., dtype=...)
    load_export(path, device="cpu", dtype=torch.float32) -> LoadedExport (model + configs)
    read_metadata(path) -> dict

The CLI (``scaletrain export``) is :mod:`scaletrain.export.cli`; its ``add_arguments`` and
``main`` are re-exported here so the dispatcher can name this package. Directory layouts:
:mod:`scaletrain.export.layout`.
"""

from __future__ import annotations

from scaletrain.export.cli import add_arguments, main
from scaletrain.export.layout import ExportError, read_metadata
from scaletrain.export.reader import LoadedExport, load_export
from scaletrain.export.writer import ExportResult, export_checkpoint, export_state_dict

__all__ = [
    "ExportError",
    "ExportResult",
    "LoadedExport",
    "add_arguments",
    "export_checkpoint",
    "export_state_dict",
    "load_export",
    "main",
    "read_metadata",
]
