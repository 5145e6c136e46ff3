"""The GPUs a plan can be checked against: peak dense bf16 tensor FLOP/s and memory, each with its source.

Torch-free (the launcher validates `launcher.resources.gpu_type` against `DEVICES` and prints the limits).
Peaks are the vendors' dense figures (the datasheets print twice as much "with sparsity", which training never
sees). A step's predicted time is its FLOPs over `peak x utilisation`; `DEFAULT_UTILIZATION` is a stated guess
until `bench/gpu.sh` measures the real ratio on a lent GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GIB = 2**30
GpuType = Literal["H100", "H200", "A100-40GB", "A100-80GB", "V100", "L40S"]
# The share of a GPU's memory a step's tensors may take: the rest holds the CUDA context, cuBLAS and NCCL
# workspaces and the caching allocator's fragmentation (bench/gpu.sh measures the peak that really happens).
USABLE_FRACTION = 0.9
DEFAULT_UTILIZATION = 0.4  # model FLOPs over peak bf16 FLOP/s: a ViT step under FSDP2 with bf16 autocast


@dataclass(frozen=True)
class Device:
    """One GPU model: its dense bf16 peak, its memory as the vendor states it (GB, read as GiB), the source."""

    name: str
    bf16_flops: float  # per second, dense
    memory_gb: float
    source: str


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device("H100", 989e12, 80, "NVIDIA H100 SXM5 datasheet: BF16 tensor 1,979 TFLOPS with sparsity; 80 GB HBM3"),
        Device("H200", 989e12, 141, "NVIDIA H200 SXM datasheet: BF16 tensor 1,979 TFLOPS with sparsity; 141 GB HBM3e"),
        Device("A100-40GB", 312e12, 40, "NVIDIA A100 datasheet: BF16 tensor 312 TFLOPS (624 sparse); 40 GB HBM2"),
        Device("A100-80GB", 312e12, 80, "NVIDIA A100 datasheet: BF16 tensor 312 TFLOPS (624 sparse); 80 GB HBM2e"),
        Device(
            "V100",
            15.7e12,
            32,
            "NVIDIA V100 SXM2 datasheet: no bf16 tensor cores (125 TFLOPS is fp16 only), so bf16 runs at about "
            "the fp32 rate, 15.7 TFLOPS; 32 GB HBM2",
        ),
        Device("L40S", 362e12, 48, "NVIDIA L40S datasheet: BF16 tensor 362 TFLOPS (733 sparse); 48 GB GDDR6"),
    )
}


def limit_bytes(memory_gb: float) -> int:
    """The bytes a step's tensors may take on a GPU of `memory_gb` (the vendor's GB, read as GiB)."""
    return int(memory_gb * GIB * USABLE_FRACTION)


def step_seconds(flops_per_rank: float, device: Device, utilization: float) -> float:
    """Predicted seconds of one optimizer step doing `flops_per_rank` on each GPU at `utilization` of the peak."""
    return flops_per_rank / (device.bf16_flops * utilization)
