"""DeepSpeed engines behind the training loop's engine seam (the same methods as ``LocalEngine`` in
``factory.train.engine``)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import torch

from factory.config.schema import DeepSpeedConfig, TrainingConfig
from factory.distributed.env import DistEnv
from factory.distributed.zero import zero_config
from factory.optim import adamw, lr_multiplier

ENGINE_TAG = "engine"  # DeepSpeed's own files live in <checkpoint>/engine/


class DeepSpeedTrainEngine:
    """ZeRO engine with our AdamW and schedule. DeepSpeed averages gradients over ranks,
    accumulates over micro-batches and steps the scheduler at each accumulation boundary."""

    def __init__(self, model, named_params, stage: TrainingConfig, ds: DeepSpeedConfig, precision: str,
                 env: DistEnv, load_universal: bool = False):
        import deepspeed

        cfg = stage.optim
        optimizer = adamw(named_params, cfg, ds.offload_optimizer)
        # Built on DeepSpeed's wrapped optimizer, whose param groups may differ from ours.
        def scheduler(wrapped):
            return torch.optim.lr_scheduler.LambdaLR(wrapped, lambda s: lr_multiplier(s, stage.steps, cfg))

        config = zero_config(ds, stage.batch_size, stage.grad_accum, precision, cfg.grad_clip or 0.0,
                             load_universal=load_universal)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for _, p in named_params], optimizer=optimizer,
            lr_scheduler=scheduler, config=config)
        self.model, self.env, self.load_universal = model, env, load_universal
        self.is_main, self.world_size = env.is_main, env.world_size
        self._lr = cfg.lr * lr_multiplier(0, stage.steps, cfg)

    @contextlib.contextmanager
    def micro_batch(self):
        """One micro-batch's forward (DeepSpeed keeps bf16 parameters itself: no autocast). The stage
        losses call submodules (``model.model``, the LM head's weight), never ``engine.forward``, so
        what it does before its module call is done here: a new gradient-accumulation micro-step
        (ZeRO-3 would otherwise write each micro-batch's gradients over the last one's) and a new
        step of ZeRO-3's submodule trace (the top module's forward pre-hook would do it). The trace
        is recorded in the first micro-batch and complete from the second on, which turns on
        prefetching and lets a submodule's weights stay gathered until their next use nearby."""
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        if isinstance(self.engine.optimizer, ZeROOptimizer):  # as engine.forward checks
            self.engine.optimizer.clear_backward_seen_flag()
        coordinator = zero3_coordinator(self.engine)
        if coordinator is not None:
            coordinator.reset_step()
        yield

    def backward(self, loss: torch.Tensor) -> None:
        from deepspeed.runtime.utils import register_output_backward_hooks

        # engine.forward's other half: the backward prologue (the optimizer's accumulation boundary and
        # backward state) runs when the backward reaches the loss. The loop already divided by the
        # accumulation steps.
        register_output_backward_hooks(loss, preprocess_once_fn=self.engine._backward_prologue,
                                       preprocess_per_tensor_fn=self.engine._backward_prologue_per_tensor)
        self.engine.backward(loss, scale_wrt_gas=False)
        self._lr = self.scheduler.get_last_lr()[0]
        self.engine.step()

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    @property
    def lr(self) -> float:
        return self._lr

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=ENGINE_TAG, save_latest=False)

    def load(self, path: Path) -> None:
        tag = ENGINE_TAG
        if self.load_universal:
            if self.is_main:
                convert_to_universal(Path(path))
            self.barrier()
            tag = f"{ENGINE_TAG}_universal"
        load_path, _ = self.engine.load_checkpoint(str(path), tag=tag, load_module_strict=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no engine state in {path}/{tag}")

    def close(self) -> None:
        """Release the engine and its model: DeepSpeed would otherwise keep the model alive for the
        rest of the process (the next stage runs in the same one)."""
        self.engine.destroy()
        release_modules([self.model])

    def any_rank(self, flag: bool) -> bool:
        return self.env.any_rank(flag)

    def barrier(self) -> None:
        self.env.barrier()


def zero3_coordinator(engine):
    """The ZeRO-3 parameter coordinator of a DeepSpeed engine (gathers, trace, prefetch), or None. A
    training engine's optimizer holds it; a forward-only engine's "optimizer" is the offload itself."""
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    return offload.get_param_coordinator() if hasattr(offload, "get_param_coordinator") else None


def frozen_engine(model, ds: DeepSpeedConfig, precision: str, micro_batch: int, step_module: str | None = None):
    """A teacher as a second ZeRO engine without optimizer (sharded, forward only); see
    ``_forward_engine`` for ``step_module``."""
    return _forward_engine(model, ds, precision, micro_batch, step_module)[0].module


def _forward_engine(model, ds: DeepSpeedConfig, precision: str, micro_batch: int, step_module: str | None = None):
    """The engine, and a hook handle or None. ``step_module`` names the submodule the caller runs for
    each forward instead of the engine's forward (distill's teacher: ``model``, the decoder stack):
    its forward pre-hook closes ZeRO-3's step as the top module's would, so the trace completes
    and prefetching runs."""
    import deepspeed

    config = zero_config(ds, micro_batch, 1, precision, 0.0, train=False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    coordinator = zero3_coordinator(engine) if step_module is not None else None
    if coordinator is None:
        return engine, None
    hook = engine.module.get_submodule(step_module).register_forward_pre_hook(lambda *_: coordinator.reset_step())
    return engine, hook


@contextlib.contextmanager
def forward_only(model, ds: DeepSpeedConfig, precision: str, micro_batch: int = 1, step_module: str | None = None):
    """``frozen_engine`` for the duration of the block; the engine is then destroyed and the module
    released, so a sequence of partitioned models (eval) does not pile up in memory."""
    engine, hook = _forward_engine(model, ds, precision, micro_batch, step_module)
    try:
        yield engine.module
    finally:
        if hook is not None:
            hook.remove()
        engine.destroy()
        release_modules([engine.module])


def release_modules(modules) -> None:
    """DeepSpeed's ZeRO-3 parameter offload appends each engine's top module to a module-level
    stack and never pops it (0.19.8), which would keep every finished engine's model alive."""
    from deepspeed.runtime.zero import parameter_offload

    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if not any(m is x for x in modules if x is not None)]


def convert_to_universal(checkpoint: Path) -> Path:
    """DeepSpeed's universal format, which any world size can load (elastic resume)."""
    source = checkpoint / ENGINE_TAG
    target = checkpoint / f"{ENGINE_TAG}_universal"
    if not target.exists():
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
                        "--output_folder", str(target), "--no_strict"], check=True)
    return target


@contextlib.contextmanager
def zero3_loading(ds: DeepSpeedConfig, precision: str):
    """``from_pretrained`` inside this context builds the model sharded (``zero.Init``) and loads
    the checkpoint shard by shard, so no rank ever holds the whole model."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    marker = HfDeepSpeedConfig(zero_config(ds, 1, 1, precision, 0.0))
    try:
        yield marker
    finally:
        unset_hf_deepspeed_config()


def gathered_parameters(params, modifier_rank=None):
    """Whole tensors of ZeRO-3 parameters for the block; with ``modifier_rank``, that rank's values
    are broadcast into every rank's shards on exit."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
