#!/usr/bin/env bash
# Every GPU check and measurement in one call (about ten minutes on one H100/H200: the smoke checks first, then
# the measurements); installs nothing; prints tables.
#   bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# Each command has its own limit so that the whole script stays within about five minutes (300 s of limits).
run() { local limit=$1; shift; echo; echo "\$ $* (limit ${limit} s)"; timeout "$limit" "$@" || echo "(exit $?)"; }
run 330 bash bench/gpu_smoke.sh
run 40 python -m pytest -q -m gpu tests/test_gpu.py
run 45 python bench/pretrain_step.py --arch vit_base --batch 256 --steps 10 --memory
run 100 python bench/pretrain_step.py --arch vit_base --batch 256 --steps 10 --memory --compile
run 70 python bench/pretrain_step.py --arch vit_small --batch 512 --steps 10 --memory --compile
run 45 python bench/max_batch.py --arch vit_base --ratio 0.8 --masks 5
# The check (issue 33) against this GPU: predicted and measured peak memory and step time, ViT-B 256 and ViT-S 512
# per GPU at 80% x 5 (compare max_batch's largest batch with `extrema-launch check`'s "fits up to")
run 150 python bench/check_vs_gpu.py
run 60 python bench/check_vs_gpu.py --detect jobs/detect_coco.yaml --steps 5
run 60 python bench/imagenet_loader.py --quick --gpu
