"""The training engine: DeepSpeed ZeRO + bf16, sharded EMA, exact checkpoint-resume.

* :mod:`.loop`: ``run_training(cfg, run_dir) -> TrainOutcome``, what every process of a job
  calls; the ``Trainer`` and its ``train_step``.
* :mod:`.engine`: process group, DeepSpeed config, the (partitioned) model.
* :mod:`.checkpoint`: ``CheckpointManager`` (one ``save``, one ``restore``).
* :mod:`.ema`: the sharded fp32 EMA. :mod:`.lr`: the LR schedule. :mod:`.signals`: preemption.
* :mod:`.monitor`: metrics, throughput, diagnostics and validation grids.
"""
