#!/bin/bash

# Parameters
#SBATCH --account=vision
#SBATCH --array=0-1%2
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=8
#SBATCH --error=/shared/logs/%A_%a_0_log.err
#SBATCH --exclude=gpu-07,gpu-12
#SBATCH --exclusive
#SBATCH --gpus-per-node=4
#SBATCH --job-name=ablation.pretrain
#SBATCH --mem=200GB
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=/shared/logs/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --signal=USR2@90
#SBATCH --time=1440
#SBATCH --wckey=submitit

# setup
export PYTHONPATH=/shared/logs/code/0123abcd${PYTHONPATH:+:$PYTHONPATH}
export PYTHONSAFEPATH=1

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/logs/%A_%a_%t_log.out --error /shared/logs/%A_%a_%t_log.err --cpus-per-task=8 python3 -u -m submitit.core._submit /shared/logs
