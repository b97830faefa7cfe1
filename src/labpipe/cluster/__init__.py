"""Jobs and accelerators: run a stage later, elsewhere, or many times, and know exactly what ran.

`labpipe jobs submit <stage>` records the code (a git commit), the config (the resolved params) and the data
(the dvc.lock the stage's inputs are pinned by) in a job record under `.labpipe/jobs/`, then hands the work
to a real scheduler: DVC's experiment queue on this machine (`--executor local`), or Slurm through submitit
(`--executor slurm`: one array task per sweep value, checkpoint and requeue on preemption).

  capture.py       what a job captures, and the snapshot of the commit a Slurm task runs in
  registry.py      the job records (JSON, written atomically)
  local.py         DVC's experiment queue: queue, start, status, remove, kill, logs
  slurm.py         Slurm's commands (sinfo, squeue, scontrol, scancel) and parsers of their output
  runner.py        the callable a Slurm task runs: `dvc repro <stage>` in its snapshot
  jobs.py          `labpipe jobs submit|list|show|modify|release|cancel`
  accelerators.py  `labpipe accelerators [--cluster]`: GPUs here, and per node of the Slurm cluster
"""
