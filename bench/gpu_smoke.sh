#!/usr/bin/env bash
# The first minutes on a GPU machine: every path of a multi-GPU run that CPU tests cannot reach (about 5 minutes).
#   bash bench/gpu_smoke.sh          # bench/gpu.sh runs it first
# - versions: torch, torchvision, CUDA, cuDNN, NCCL, the cards and the driver;
# - the GPU tests: bf16 training, the pretraining step with no host-device synchronisation (sync debug mode
#   "error"), nvJPEG on the odd-files folder (progressive, CMYK, grayscale, a PNG named .JPEG), colour on the device;
# - the ViT-B recipe scaled down (tests/recipes.py) on the GPUs with NCCL: FSDP pretraining with the kNN monitor and
#   background saves, one rank killed mid-run and the stage resumed to the same bits; DDP with torch.compile
#   (Inductor); probe and finetune at two ranks (SyncBatchNorm under bf16). Two ranks need two GPUs: with one, the
#   same runs use one rank and say so.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python - <<'PY'
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "nccl", ".".join(map(str, torch.cuda.nccl.version())),
      "gpus", torch.cuda.device_count())
PY
run() { local limit=$1; shift; echo; echo "\$ $* (limit ${limit} s)"; timeout "$limit" "$@" || echo "(exit $?)"; }
run 60 python -m pytest -q -m gpu tests/test_gpu.py tests/test_decode.py tests/test_augment.py
RANKS=$(python -c "import torch; print(min(2, torch.cuda.device_count()))")
export EXTREMA_RECIPE_RANKS=$RANKS EXTREMA_RECIPE_GPUS=1
echo "recipe runs at $RANKS rank(s), one GPU each"
run 120 python -m pytest -q -x tests/test_recipes.py -k "vit_base_recipe_runs_every or killed_mid_run"
EXTREMA_COMPILE_BACKEND=inductor run 90 python -m pytest -q tests/test_recipes.py -k "compiled_block_by_block or ddp"
