"""What a result was computed with, beyond the code: every installed distribution, the Python, the CPU and GPUs,
and torch's CUDA, cuDNN and NCCL builds."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any


def distributions() -> dict[str, str]:
    """Every installed distribution -> its version, sorted by name."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(str(name), str(dist.version))
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_build() -> dict[str, Any]:
    """torch's version and its CUDA, cuDNN and NCCL versions, and the visible GPUs (None/[] where absent)."""
    torch: Any = sys.modules.get("torch")  # described only when the process has imported it (this layer never does)
    if torch is None:
        return {}

    cuda = torch.cuda.is_available()
    nccl: Any = None
    if cuda:
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):
            nccl = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": nccl,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def describe() -> dict[str, Any]:
    """The environment part of provenance."""
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "torch_build": torch_build(),
        "distributions": distributions(),
    }
