"""Starting training processes: N local ranks (:mod:`.local`), or a SLURM job through submitit
(:mod:`.submit`, :mod:`.jobs`), with the run directory's job records (:mod:`.records`)."""
