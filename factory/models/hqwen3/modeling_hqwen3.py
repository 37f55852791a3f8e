"""HQwen3: Qwen3's own attention, MLP and norm modules with Gated DeltaNet in ``linear_attention`` layers.

With every layer ``full_attention`` this reproduces ``Qwen3ForCausalLM`` (same parameter
names, same logits). Packed rows are described by restarting ``position_ids``: attention gets
a block-causal mask from them and GDN layers get the matching ``cu_seqlens``.

``HQwen3Model.forward_dual`` runs a teacher stream (attention everywhere, no grad) and the student
stream through each decoder layer in one call of that layer (distill's shared teacher).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention, Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding)

from factory.layers.gdn import GatedDeltaNet, GDNShape
from factory.models.hqwen3.configuration_hqwen3 import HQwen3Config

MIXER_MODES = ("student", "teacher", "align")
# One-token queries against a cache: cuDNN's SDPA builds a new execution plan for every key length
# (~10 ms of CPU per call for microseconds of GPU work, issue 18), so decoding excludes it.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_attention_context(query_len: int, past_key_values):
    """SDPA backends for this call: all of them for prompts and training, no cuDNN when decoding."""
    if query_len == 1 and past_key_values is not None:
        return sdpa_kernel(DECODE_SDPA_BACKENDS)
    return nullcontext()


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries of a ``[B, T]`` batch flattened to one row: a new document starts at
    every row start and wherever the position does not follow the previous one."""
    B, T = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    idx = starts.flatten().nonzero().flatten()
    return torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32 if position_ids.is_cuda else torch.long)


def additive_on_cpu(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean attention mask on the CPU as the additive mask SDPA makes of it (0 or -inf), made once
    for every layer: SDPA converts a boolean mask at each call (8 rows x 512 tokens: ~3 ms a layer)."""
    if mask is None or mask.dtype != torch.bool or mask.device.type != "cpu":
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))


class HQwen3DecoderLayer(nn.Module):
    # Activation checkpointing of the whole layer: ``gradient_checkpointing`` and
    # ``_gradient_checkpointing_func`` are set by ``gradient_checkpointing_enable`` or
    # factory.distributed.activation_checkpointing. Not transformers' GradientCheckpointingLayer: from
    # 5.2x it checkpoints ``forward`` for every call, so a no-grad teacher stream and align's layers
    # (which checkpoint their GDN branch alone) would go through the checkpoint too.
    gradient_checkpointing = False

    def __init__(self, config: HQwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.is_linear = self.layer_type == "linear_attention"
        if not self.is_linear or config.keep_teacher_attention:
            self.self_attn = Qwen3Attention(config, layer_idx)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(GDNShape.from_config(config), layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # For converted layers holding both mixers: which one carries the stream.
        self.mixer_mode = "student"
        self.alignment_pair: tuple[torch.Tensor, torch.Tensor] | None = None

    def _attention(self, x, masks, position_embeddings, past_key_values, **kwargs):
        with decode_attention_context(x.shape[1], past_key_values):
            out, _ = self.self_attn(hidden_states=x, attention_mask=masks["full_attention"],
                                    position_embeddings=position_embeddings, past_key_values=past_key_values,
                                    **kwargs)
        return out

    def _gdn(self, x, masks, cu_seqlens, past_key_values):
        if cu_seqlens is None:
            return self.linear_attn(x, attention_mask=masks["linear_attention"], past_key_values=past_key_values)
        B, T, D = x.shape
        return self.linear_attn(x.reshape(1, B * T, D), cu_seqlens=cu_seqlens).reshape(B, T, D)

    def _mix(self, x, mode, masks, position_embeddings, past_key_values, cu_seqlens, **kwargs):
        if not self.is_linear or mode == "teacher":
            return self._attention(x, masks, position_embeddings, past_key_values, **kwargs)
        if mode == "student":
            return self._gdn(x, masks, cu_seqlens, past_key_values)
        # align: GDN learns to reproduce the attention output on the teacher's stream.
        with torch.no_grad():
            target = self._attention(x, masks, position_embeddings, None, **kwargs)
        student = partial(self._gdn, masks=masks, cu_seqlens=cu_seqlens, past_key_values=None)
        if self.gradient_checkpointing and self.training:  # only the GDN branch keeps activations
            self.alignment_pair = (self._gradient_checkpointing_func(student, x.detach()), target)
        else:
            self.alignment_pair = (student(x.detach()), target)
        return target

    def __call__(self, hidden_states, *args, **kwargs):
        # The teacher's stream needs no gradient, so checkpointing it would only keep inputs and
        # recompute nothing useful: align checkpoints its GDN branch alone (``_mix``), and a stream
        # under no_grad (distill's shared teacher) runs plainly. The checkpoint wraps ``__call__``, so
        # the recomputation runs this module's hooks again (ZeRO-3 gathers in the backward).
        if not self._checkpoints() or self.mixer_mode == "align":
            return super().__call__(hidden_states, *args, **kwargs)
        if kwargs.get("past_key_values") is not None:
            raise ValueError("a checkpointed layer runs without a decoding cache")
        return self._gradient_checkpointing_func(partial(super().__call__, **kwargs), hidden_states, *args)

    def _checkpoints(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def forward_dual(self, student_states, teacher_states, masks, position_embeddings, cu_seqlens=None, **kwargs):
        """Both streams through this layer back to back, so each submodule's weights serve the two
        while gathered: the teacher's (no grad, keeps nothing for the backward) then the student's,
        which alone is checkpointed when checkpointing is on. Called directly, not through
        ``__call__`` (which would checkpoint the call as a whole): the layer holds no parameters of its
        own, its submodules' ZeRO-3 hooks gather them.
        ``teacher_states=None``: the streams have not diverged yet (no converted layer below), so an
        attention layer runs once for both and keeps returning None; a converted layer splits them."""
        if teacher_states is None and self.is_linear:
            teacher_states = student_states.detach()
        if teacher_states is not None:
            with torch.no_grad():
                teacher_states = self.forward(teacher_states, masks, position_embeddings, cu_seqlens=cu_seqlens,
                                              mixer_mode="teacher", **kwargs)
        student = partial(self.forward, masks=masks, position_embeddings=position_embeddings, cu_seqlens=cu_seqlens,
                          mixer_mode="student", **kwargs)
        if self._checkpoints():
            return self._gradient_checkpointing_func(student, student_states), teacher_states
        return student(student_states), teacher_states

    def forward(self, hidden_states, masks, position_embeddings, past_key_values=None, cu_seqlens=None,
                mixer_mode: str | None = None, **kwargs):
        """``mixer_mode``: this call's mixer (``forward_dual``'s two streams), else the layer's."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = residual + self._mix(hidden_states, mixer_mode or self.mixer_mode, masks,
                                             position_embeddings, past_key_values, cu_seqlens, **kwargs)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class HQwen3PreTrainedModel(PreTrainedModel):
    config_class = HQwen3Config
    config: HQwen3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HQwen3DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GatedDeltaNet):
            module.reset_gate_parameters()
            module.o_norm.weight.fill_(1.0)
            if module.shape.qk_channel_scale:
                module.q_scale.fill_(1.0)
                module.k_scale.fill_(1.0)


class HQwen3Model(HQwen3PreTrainedModel):
    def __init__(self, config: HQwen3Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(HQwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.mixer_mode = "student"
        self.post_init()

    def set_mixer_mode(self, mode: str) -> None:
        """``student`` runs GDN in converted layers, ``teacher`` their kept attention, ``align`` both."""
        if mode not in MIXER_MODES:
            raise ValueError(f"mixer mode {mode!r} is not one of {MIXER_MODES}")
        if mode != "student" and not self.config.keep_teacher_attention:
            raise ValueError(f"mixer mode {mode!r} needs keep_teacher_attention=True in the config")
        for layer in self.layers:
            layer.mixer_mode = mode
        self.mixer_mode = mode

    def _is_packed(self, position_ids, attention_mask, past_key_values) -> bool:
        if attention_mask is not None or past_key_values is not None or position_ids.shape[1] < 2:
            return False
        return bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any())

    def _layer_inputs(self, inputs_embeds, attention_mask, position_ids, past_key_values):
        """Masks, rotary tables and packed-row boundaries (``cu_seqlens``, or None) for the layers."""
        mask_kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           past_key_values=past_key_values, position_ids=position_ids)
        masks = {"full_attention": additive_on_cpu(create_causal_mask(**mask_kwargs), inputs_embeds.dtype),
                 "linear_attention": create_recurrent_attention_mask(**mask_kwargs)}
        packed = self.config.linear_layers and self._is_packed(position_ids, attention_mask, past_key_values)
        cu_seqlens = cu_seqlens_from_position_ids(position_ids.expand(inputs_embeds.shape[0], -1)) if packed else None
        return masks, self.rotary_emb(inputs_embeds, position_ids), cu_seqlens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.mixer_mode != "student":
            if past_key_values is not None:
                raise ValueError(f"mixer mode {self.mixer_mode!r} runs without a decoding cache")
            use_cache = False  # the hybrid cache has no KV slots for the kept attention
        if use_cache and past_key_values is None and not self.training:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        masks, position_embeddings, cu_seqlens = self._layer_inputs(inputs_embeds, attention_mask, position_ids,
                                                                    past_key_values)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, masks, position_embeddings, past_key_values=past_key_values,
                                  cu_seqlens=cu_seqlens, position_ids=position_ids, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)

    def forward_dual(self, input_ids, position_ids=None, attention_mask=None, use_cache=None,
                     **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states (after the final norm) of the teacher stream (attention in every layer,
        the converted layers' kept attention included; no grad) and of the student stream (this
        hybrid), both through each decoder layer in one call of it: under ZeRO-3 a layer's weights
        are gathered once for the two streams. Training only: no decoding cache. ``use_cache`` is
        accepted and ignored, as the stage's batch inputs carry it."""
        if not self.config.keep_teacher_attention:
            raise ValueError("forward_dual needs keep_teacher_attention=True in the config")
        inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
        masks, position_embeddings, cu_seqlens = self._layer_inputs(inputs_embeds, attention_mask, position_ids, None)
        # Below the first converted layer both streams are the same computation: run it once.
        student, teacher = inputs_embeds, None
        for layer in self.layers:
            student, teacher = layer.forward_dual(student, teacher, masks, position_embeddings, cu_seqlens,
                                                  position_ids=position_ids, **kwargs)
        with torch.no_grad():
            teacher = self.norm(student if teacher is None else teacher)
        return teacher, self.norm(student)


class HQwen3ForCausalLM(HQwen3PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HQwen3Config):
        super().__init__(config)
        self.model = HQwen3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)
