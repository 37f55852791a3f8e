"""HQwen3: Qwen3 with some attention layers replaced by Gated DeltaNet (``linear_attention``)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config

LAYER_TYPES = ("full_attention", "linear_attention")


@strict
class HQwen3Config(Qwen3Config):
    """Qwen3's fields plus the GDN sizes (Qwen3.5's names where they exist).

    GDN head counts default to the attention layer they replace: query heads to
    ``num_attention_heads``, key and value heads to ``num_key_value_heads`` (repeated to the
    query-head count inside the kernel), head dims to ``head_dim``. A hybrid primed with
    ``init.kv_heads=expanded`` stores ``linear_num_key_heads = linear_num_value_heads =
    linear_num_query_heads`` (one trainable K/V head per query head); a config that names no
    GDN head counts, as older checkpoints of a GQA teacher did not need to, is the shared form.
    ``keep_teacher_attention`` makes converted layers also hold their frozen attention, the
    teacher path of the alignment stage.
    """

    model_type = "hqwen3"

    linear_num_query_heads: int | None = None
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_kernel_dim: int = 4
    linear_allow_neg_eigval: bool = False
    linear_qk_channel_scale: bool = False
    keep_teacher_attention: bool = False

    def __post_init__(self, **kwargs):
        layer_types = self.layer_types
        self.layer_types = None  # Qwen3 fills sliding/full defaults; ours are validated below
        super().__post_init__(**kwargs)
        if layer_types is not None:
            self.layer_types = list(layer_types)
        self.linear_num_query_heads = self.linear_num_query_heads or self.num_attention_heads
        self.linear_num_key_heads = self.linear_num_key_heads or self.num_key_value_heads
        self.linear_num_value_heads = self.linear_num_value_heads or self.num_key_value_heads
        self.linear_key_head_dim = self.linear_key_head_dim or self.head_dim
        self.linear_value_head_dim = self.linear_value_head_dim or self.head_dim
        check_hybrid_fields(self)

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]


def check_hybrid_fields(config: HQwen3Config) -> None:
    """One-line errors naming the field, raised at construction."""
    types = config.layer_types
    if len(types) != config.num_hidden_layers:
        raise ValueError(f"layer_types has {len(types)} entries; expected num_hidden_layers={config.num_hidden_layers}")
    unknown = sorted({t for t in types if t not in LAYER_TYPES})
    if unknown:
        raise ValueError(f"layer_types has unknown type(s) {unknown}; accepted: {list(LAYER_TYPES)}")
    heads = config.linear_num_query_heads
    for field in ("linear_num_key_heads", "linear_num_value_heads"):
        value = getattr(config, field)
        if value <= 0 or heads % value:
            raise ValueError(f"{field}={value} must divide linear_num_query_heads={heads}")
    if config.linear_conv_kernel_dim < 1:
        raise ValueError(f"linear_conv_kernel_dim={config.linear_conv_kernel_dim} must be >= 1")
