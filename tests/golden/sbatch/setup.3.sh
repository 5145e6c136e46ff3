#!/bin/bash

# Parameters
#SBATCH --array=0-1%1
#SBATCH --cpus-per-task=1
#SBATCH --dependency=aftercorr:1
#SBATCH --error=/shared/logs/%A_%a_0_log.err
#SBATCH --job-name=ablation.knn
#SBATCH --mem=32256MB
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/shared/logs/%A_%a_0_log.out
#SBATCH --partition=cpu
#SBATCH --signal=USR2@30
#SBATCH --time=5
#SBATCH --wckey=submitit

# setup
module load cuda/12.4 nccl
source /opt/venvs/extrema/bin/activate

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/logs/%A_%a_%t_log.out --error /shared/logs/%A_%a_%t_log.err --cpus-per-task=1 /opt/venvs/extrema/bin/python -u -m submitit.core._submit /shared/logs
