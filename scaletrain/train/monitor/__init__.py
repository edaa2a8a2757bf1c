"""Training-time monitoring: metrics, wandb, throughput/MFU, diagnostics, validation.

A library the training loop calls; nothing here owns training state. Modules:

* ``config``: LoggingConfig, ValidationConfig (the ``logging`` and ``validation`` sections).
* ``metrics_logger``: MetricsLogger (rank 0 -> run_dir/metrics.jsonl + wandb).
* ``throughput``: Throughput (samples/s, TFLOP/s, MFU, data wait, step time, memory).
* ``timestep_loss``: LossByTimestep (loss per bucket of normalised timestep).
* ``diagnostics``: DiagnosticsSchedule and the glue to the models' diagnostics API.
* ``validation``: Validator (fixed prompts/seeds from the EMA weights -> PNG grid).
"""
