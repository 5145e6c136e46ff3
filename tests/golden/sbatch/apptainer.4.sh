#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=1
#SBATCH --dependency=afterok:2
#SBATCH --error=/shared/logs/%j_0_log.err
#SBATCH --job-name=ablation.knn
#SBATCH --mem=32256MB
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/shared/logs/%j_0_log.out
#SBATCH --partition=cpu
#SBATCH --signal=USR2@30
#SBATCH --time=5
#SBATCH --wckey=submitit

# setup
module load apptainer

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/logs/%j_%t_log.out --error /shared/logs/%j_%t_log.err --cpus-per-task=1 apptainer exec --bind=/shared/logs,/shared/runs,/data /shared/images/extrema.sif /opt/conda/bin/python -u -m submitit.core._submit /shared/logs
