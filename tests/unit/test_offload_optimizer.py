"""ZeRO-Offload steps the optimizer in CPU memory, where DeepSpeed refuses torch's AdamW (seen on an
H200 at the Qwen3-32B shape): the engines' one AdamW builder must hand it DeepSpeed's CPU AdamW with our
settings."""

import pytest
import torch

from factory.config.schema import OptimConfig

deepspeed_adam = pytest.importorskip("deepspeed.ops.adam")


def test_offload_takes_deepspeeds_cpu_adamw(monkeypatch):
    from factory.optim import adamw

    built = {}

    class FakeCPUAdam:
        def __init__(self, groups, **kwargs):
            built.update(kwargs, groups=groups)

    monkeypatch.setattr(deepspeed_adam, "DeepSpeedCPUAdam", FakeCPUAdam)
    named = [("w", torch.nn.Parameter(torch.ones(2, 2))), ("b", torch.nn.Parameter(torch.ones(2)))]
    cfg = OptimConfig(lr=3e-4, beta1=0.8, beta2=0.9, weight_decay=0.1)
    assert isinstance(adamw(named, cfg, offload=True), FakeCPUAdam)
    assert built["adamw_mode"] and built["lr"] == 3e-4 and built["betas"] == (0.8, 0.9)
    assert [g["weight_decay"] for g in built["groups"]] == [0.1, 0.0]  # no decay on the bias
    assert isinstance(adamw(named, cfg, offload=False), torch.optim.AdamW)
