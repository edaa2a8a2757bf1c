"""Evaluation: held-out validation loss, FID and CLIP score, shared by training and
``scaletrain eval``.

* :mod:`.evaluator`: ``Evaluator(cfg.eval, EvalSetting.from_root(cfg), device=...)`` with
  ``loss(model_fn)`` and ``sample_metrics(model_fn)``, collectives over all ranks.
* :mod:`.val_loss`: the MLPerf text-to-image protocol on held-out latents (:mod:`.heldout`).
* :mod:`.fid`: pytorch-fid's Inception, feature statistics, the Fréchet distance in float64,
  the ``.npz`` cache of reference statistics; :mod:`.images` reads image folders and shards.
* :mod:`.clip_score`: CLIP score with an open_clip or transformers CLIP.
* :mod:`.sharing`: how work is dealt to ranks so results do not depend on the world size.
* :mod:`.offline`: ``evaluate_weights`` (an export or a checkpoint -> eval.json) and
  ``fid_between`` (two image sets), what ``scaletrain eval`` runs.

Training's hook is :mod:`scaletrain.train.monitor.evaluation` (it swaps the EMA in: the
trainer's business, a layer above).
"""

from scaletrain.eval.config import EvalConfig
from scaletrain.eval.evaluator import EvalSetting, Evaluator

__all__ = ["EvalConfig", "EvalSetting", "Evaluator"]
