"""The Slurm backend: `plan` (sbatch parameters, arrays, dependencies; no submitit), `backend` (submitit), `logs`."""
