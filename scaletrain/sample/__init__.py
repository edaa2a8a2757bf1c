"""The one prompt -> conditioning -> noise -> sampler -> decode path.

* :mod:`.generate`: ``generate(...)``, used by ``scaletrain sample`` and by validation.
* :mod:`.conditioning`: ``PromptConditioner`` (prompts -> the conditioning a model was
  trained on; the unconditional branch as training's prompt dropout built it).
* :mod:`.pipeline`: ``sample_images(export_dir, prompts, ...)`` -> PNGs, ``samples.jsonl``,
  ``grid.png``; ``read_prompts``.
* :mod:`.image_grid`: PNG grids.

The command line (``scaletrain sample``) is :mod:`scaletrain.cli.sample`.
"""
