"""DeepSpeed ZeRO-3 configuration rendered from the typed config."""

from __future__ import annotations

from factory.config.schema import DeepSpeedConfig


def zero_config(ds: DeepSpeedConfig, micro_batch: int, grad_accum: int, precision: str, grad_clip: float,
                train: bool = True, load_universal: bool = False) -> dict:
    zero = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "stage3_prefetch_bucket_size": ds.prefetch_bucket_size,
        "stage3_param_persistence_threshold": ds.param_persistence_threshold,
        "stage3_max_reuse_distance": ds.max_reuse_distance,
    }
    if ds.offload_optimizer and train:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum if train else 1,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train:
        config["gradient_clipping"] = grad_clip
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config
