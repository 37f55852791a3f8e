"""The hybrid's facts: which state-dict names are the student's, the submodules initialization and
sharded saving visit, the student alone without the kept teacher attention, and a longer context
(RoPE base and position limit)."""

from __future__ import annotations

from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from factory.models.hqwen3.configuration_hqwen3 import HQwen3Config
from factory.models.hqwen3.modeling_hqwen3 import HQwen3ForCausalLM


def init_groups(config) -> list[str]:
    """The submodules initialization visits one at a time, by name (the same in teacher and hybrid).
    A tied LM head is the embedding and is not visited twice."""
    groups = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(config.num_hidden_layers)), "model.norm"]
    return groups if config.tie_word_embeddings else [*groups, "lm_head"]


def saved_names(model) -> set[str]:
    """State-dict names a checkpoint holds: a tied weight is stored once, under its first name."""
    seen, names = set(), set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            names.add(key)
    return names


def student_key(config, key: str) -> bool:
    """Whether a hybrid's state-dict name belongs to its student: converted layers' kept teacher
    attention (``model.layers.<i>.self_attn.*``) does not."""
    parts = key.split(".")
    if len(parts) <= 3 or parts[1] != "layers" or not parts[2].isdigit() or parts[3] != "self_attn":
        return True
    return int(parts[2]) not in config.linear_layers


def student_config(config):
    """The config of the student alone (no kept teacher attention)."""
    data = config.to_dict()
    data.pop("auto_map", None)
    data.update(keep_teacher_attention=False)
    return HQwen3Config(**data)


def drop_teacher_attention(config, state: dict):
    """The student alone, from a hybrid's config and full state dict: converted layers lose
    their kept attention (after alignment)."""
    student = HQwen3ForCausalLM(student_config(config))
    student.load_state_dict({k: v for k, v in state.items() if student_key(config, k)})
    return student.to(next(iter(state.values())).dtype)


def extend_context(model, rope_theta: float, max_positions: int) -> None:
    """New RoPE base and position limit; the rotary tables are rebuilt from the config."""
    model.config.rope_parameters = {**(model.config.rope_parameters or {}), "rope_theta": rope_theta}
    model.config.max_position_embeddings = max_positions
    device = next(model.parameters()).device
    model.model.rotary_emb = Qwen3RotaryEmbedding(config=model.config).to(device)
