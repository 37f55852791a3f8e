"""Hugging Face's sharded safetensors layout, written a few tensors at a time.

``save_pretrained`` needs the whole state dict at once; a model that is never whole on one
process (ZeRO-3 initialization) hands its tensors over one layer at a time instead. They are
buffered on the CPU and flushed to a new file whenever the buffer would pass ``max_shard_bytes``,
so the writer holds at most one shard. ``from_pretrained`` loads the result like any sharded
checkpoint (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``; a single
shard is plain ``model.safetensors``, as ``save_pretrained`` writes it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

DEFAULT_SHARD_BYTES = 5 * 10**9  # save_pretrained's long-standing default
INDEX_NAME = "model.safetensors.index.json"


class ShardWriter:
    def __init__(self, directory: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered_bytes = 0
        self._files: list[tuple[Path, list[str]]] = []  # provisional file, its tensor names
        self.written: set[str] = set()
        self.total_bytes = 0
        self.total_parameters = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.written:
            raise ValueError(f"tensor {name} written twice")
        self.written.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered_bytes + size > self.max_shard_bytes:
            self._flush()
        # A copy: the caller's tensor is a gathered buffer that is freed or reused after the layer.
        self._buffer[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self._buffered_bytes += size
        self.total_bytes += size
        self.total_parameters += tensor.numel()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.directory / f".shard-{len(self._files):05d}.safetensors.partial"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._buffer)))
        self._buffer, self._buffered_bytes = {}, 0

    def close(self) -> list[str]:
        """Final names once the shard count is known; the index last, so its presence means complete.
        Returns the weight files written."""
        if self._buffer or not self._files:
            self._flush()
        n = len(self._files)
        names = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        weight_map = {}
        for (path, tensors), name in zip(self._files, names):
            os.replace(path, self.directory / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if n > 1:
            index = {"metadata": {"total_parameters": self.total_parameters, "total_size": self.total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            partial = self.directory / f"{INDEX_NAME}.partial"
            partial.write_text(json.dumps(index, indent=2) + "\n")
            os.replace(partial, self.directory / INDEX_NAME)
        return names


def write_model_files(model, directory: str | Path, dtype: torch.dtype, config=None) -> None:
    """What ``save_pretrained`` writes besides the weights: config (``model``'s unless another is
    given, with dtype and architecture), generation config, and for a registered custom class its
    modeling files."""
    from transformers.dynamic_module_utils import custom_object_save

    config = config or model.config
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    if model.is_remote_code():
        custom_object_save(model, directory, config=config)
    config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
