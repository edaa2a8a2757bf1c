"""Offline preprocessing: raw image-caption shards -> latent shards.

Entry points:

* ``preprocess_shards(cfg, inputs, output_dir, rank=0, world=1) -> PreprocessSummary``
  (:mod:`.pipeline`): one rank's share of the shards; what ``scaletrain preprocess`` runs.
* ``finalize_index(output_dir) -> dict`` (:mod:`.output`): rebuilds ``index.json`` and
  ``errors.jsonl`` from the per-shard manifests and ledgers. Cheap, idempotent.
* ``resolve_rank_world(env) -> (rank, world, source)`` (:mod:`.work`).

How a SLURM job array finalises. Each array task runs ``scaletrain preprocess CONFIG
--input PATTERN --output DIR`` (or calls ``preprocess_shards`` with its rank): every task
expands the same input list, takes shards ``rank::world`` (rank and world from
``SLURM_ARRAY_TASK_ID/_MIN/_STEP/_COUNT``), skips shards already complete, and, when it
finishes, rebuilds the index from whatever manifests exist. The task that finishes last
therefore writes the complete index (``"complete": true`` once every planned shard has a
manifest; tasks that finish together cannot leave a stale one, see ``finalize_index``). If
tasks were preempted or failed, rerun the array (complete shards are skipped, half-written
ones redone), or rebuild the index alone with ``scaletrain preprocess CONFIG --output DIR
--finalize-only`` (exit status 0 only when the index is complete), e.g. as a job that
depends on the array (``--dependency=afterany:<array job id>``).
"""
