"""Weights in and out of training: every format a model's weights are read from or written to.

* :mod:`.consolidate`: a training checkpoint's shards (any ZeRO stage and world size) ->
  full fp32 weights, raw or EMA.
* :mod:`.writer`: ``export_checkpoint(run_dir, out_dir, step=None, weights="ema",
  layout="safetensors", dtype="fp32") -> ExportResult``; ``export_state_dict``.
* :mod:`.reader`: ``load_export(path, device="cpu", dtype=torch.float32) -> LoadedExport``.
* :mod:`.layout`: what an export directory holds (``read_metadata``, ``ExportError``).

Nothing here imports the trainer: training reads weights through this package (to start
from released weights, or to export), never the other way round. The command line
(``scaletrain export``) is :mod:`scaletrain.cli.export`.
"""
