"""bf16 on a CPU without AVX-512 (torch's capability AVX2 or DEFAULT) is tens of times slower than fp32: the stage
says so in one line and keeps the precision it was asked for; other CPUs, GPUs and fp32 say nothing."""

from __future__ import annotations

import pytest
import torch

from extrema.train.dist import autocast_dtype, slow_bf16

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_which_devices_are_slow_at_bf16() -> None:
    assert slow_bf16(CPU, "AVX2") and slow_bf16(CPU, "DEFAULT")
    assert not slow_bf16(CPU, "AVX512") and not slow_bf16(GPU, "AVX2")


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_bf16_on_a_slow_cpu_warns_and_keeps_bf16(
    capability: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert autocast_dtype("bf16", CPU) == torch.bfloat16
    err = capsys.readouterr().err
    if capability == "AVX2":
        assert err.count("\n") == 1 and "precision bf16 on this CPU (AVX2, no AVX-512)" in err and "fp32" in err
    else:
        assert err == ""
    assert autocast_dtype("fp32", CPU) is None and capsys.readouterr().err == ""
