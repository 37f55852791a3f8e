"""Static-shape decoding for HQwen3 and Qwen3 (one code path for both, for fair benchmarks).

``StaticCache`` preallocates everything a batch needs up to ``max_len`` tokens: per attention
layer K and V ``[B, max_len, kv_heads, head_dim]``, per GDN layer its conv window ``[B, C, W]``
and its recurrent state ``[B, H, dk, dv]`` (fp32, fixed size whatever the context). Nothing is
allocated or resized while decoding, so one decode step has fixed shapes and, on CUDA, is captured
once as a CUDA graph and replayed (``Decoder(..., cuda_graph=True)``): no per-step Python, no
per-step kernel planning. Attention in a captured step reads the whole preallocated buffer and is
told the valid length on the device (flash attention's ``seqused_k``).

The decoder walks the model's own modules (``model.model.layers[i]``: ``self_attn`` or
``linear_attn``, ``mlp``, the two norms), so it runs an ``HQwen3ForCausalLM`` in student mode and
transformers' ``Qwen3ForCausalLM`` alike, with the same weights and the same math as their
``forward``. All rows of a batch share one length (equal-length prompts, no padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from factory.models.hqwen3.modeling_hqwen3 import decode_attention_context
from factory.ops.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule

GDN_KERNEL_ARGS = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                       output_final_state=True)


def is_linear(layer) -> bool:
    return bool(getattr(layer, "is_linear", False))


class StaticCache:
    """Fixed-size decoding state for ``batch`` rows of up to ``max_len`` tokens."""

    def __init__(self, model, batch: int, max_len: int, device=None, dtype=None):
        config = model.config
        param = next(model.parameters())
        device, dtype = device or param.device, dtype or param.dtype
        self.batch, self.max_len, self.length, self.device = batch, max_len, 0, torch.device(device)
        self.k, self.v, self.conv, self.state = {}, {}, {}, {}
        kv_heads, head_dim = config.num_key_value_heads, config.head_dim
        for i, layer in enumerate(model.model.layers):
            if is_linear(layer):
                gdn = layer.linear_attn
                s = gdn.shape
                self.conv[i] = torch.zeros(batch, sum(gdn.conv_channels), s.conv_size, device=device, dtype=dtype)
                self.state[i] = torch.zeros(batch, s.num_query_heads, s.key_head_dim, s.value_head_dim,
                                            device=device, dtype=torch.float32)
            else:
                self.k[i] = torch.zeros(batch, max_len, kv_heads, head_dim, device=device, dtype=dtype)
                self.v[i] = torch.zeros_like(self.k[i])

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k.values(), *self.v.values(), *self.conv.values(), *self.state.values()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        for t in (*self.conv.values(), *self.state.values()):
            t.zero_()
        self.length = 0


class Decoder:
    """Prefill and greedy decoding over a ``StaticCache``.

    ``cuda_graph`` captures one decode step (CUDA only); otherwise each step runs eagerly, with
    attention over the valid slice of the cache through SDPA (without cuDNN when decoding). Both
    read and write the same cache.
    """

    def __init__(self, model, cache: StaticCache, cuda_graph: bool = False):
        if getattr(model.model, "mixer_mode", "student") != "student":
            raise ValueError("static decoding runs the student model (mixer_mode='student')")
        self.model, self.cache, self.cuda_graph = model, cache, cuda_graph
        self.layers = list(model.model.layers)
        self.graph = None
        if cuda_graph:
            device, B = cache.device, cache.batch
            self.ids = torch.zeros(B, 1, dtype=torch.long, device=device)
            self.pos = torch.zeros(1, dtype=torch.long, device=device)
            self.seqused = torch.zeros(B, dtype=torch.int32, device=device)
            self.cu_q = torch.arange(B + 1, dtype=torch.int32, device=device)
            self.cu_k = self.cu_q * cache.max_len

    # -- attention -------------------------------------------------------------------------------
    def _attention(self, i, layer, x, cos, sin, positions, graphed: bool):
        attn, c = layer.self_attn, self.cache
        B, T, _ = x.shape
        shape = (B, T, -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(x).view(shape))
        k = attn.k_norm(attn.k_proj(x).view(shape))
        v = attn.v_proj(x).view(shape)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        c.k[i].index_copy_(1, positions, k)
        c.v[i].index_copy_(1, positions, v)
        if graphed:
            out = self._flash_decode(q, c.k[i], c.v[i], attn.scaling)
        else:
            end = c.length + T
            keys, values = c.k[i][:, :end].transpose(1, 2), c.v[i][:, :end].transpose(1, 2)
            with decode_attention_context(T, c):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=T > 1,
                                                     scale=attn.scaling, enable_gqa=True).transpose(1, 2)
        return attn.o_proj(out.reshape(B, T, -1))

    def _flash_decode(self, q, k_cache, v_cache, scale):
        """One query per row against the whole buffer; ``seqused`` (on the device) masks the tail."""
        B, _, H, D = q.shape
        L, kv_heads = k_cache.shape[1], k_cache.shape[2]
        out = torch.ops.aten._flash_attention_forward(
            q.reshape(B, H, D), k_cache.view(B * L, kv_heads, D), v_cache.view(B * L, kv_heads, D),
            self.cu_q, self.cu_k, 1, L, 0.0, False, False, scale=scale, seqused_k=self.seqused)[0]
        return out.view(B, 1, H, D)

    # -- Gated DeltaNet --------------------------------------------------------------------------
    def _gdn(self, i, layer, x):
        gdn, c = layer.linear_attn, self.cache
        s = gdn.shape
        B, T, _ = x.shape
        mixed = torch.cat([gdn.q_proj(x), gdn.k_proj(x), gdn.v_proj(x)], dim=-1)
        a, b = gdn.a_proj(x), gdn.b_proj(x)
        convs = (gdn.q_conv1d, gdn.k_conv1d, gdn.v_conv1d)
        window = torch.cat([c.conv[i], mixed.transpose(1, 2)], dim=-1)
        weight = torch.cat([conv.weight.squeeze(1) for conv in convs], dim=0)
        if T == 1 and c.length > 0:
            conv_out = F.silu((window[..., 1:] * weight).sum(-1)).unsqueeze(1)
        else:  # a prompt from an empty cache: each short conv over the whole rows
            conv_out = torch.cat([conv(t) for conv, t in zip(convs, mixed.split(gdn.conv_channels, -1))], -1)
        c.conv[i].copy_(window[..., -s.conv_size:])
        q, k, v = conv_out.split(gdn.conv_channels, dim=-1)
        q, k = q.view(B, T, -1, s.key_head_dim), k.view(B, T, -1, s.key_head_dim)
        v = v.view(B, T, -1, s.value_head_dim)
        if s.qk_channel_scale:
            q, k = q * gdn.q_scale, k * gdn.k_scale
        kernel = recurrent_gated_delta_rule if T == 1 and c.length > 0 else chunk_gated_delta_rule
        o, state = kernel(q, k, v, a, b, initial_state=c.state[i] if c.length > 0 else None, A_log=gdn.A_log,
                          dt_bias=gdn.dt_bias, allow_neg_eigval=s.allow_neg_eigval, **GDN_KERNEL_ARGS)
        c.state[i].copy_(state)
        return gdn.finish(o, x)

    # -- the model -------------------------------------------------------------------------------
    def _forward(self, ids, positions, graphed: bool = False):
        """Logits of the last token of each row ``[B, vocab]``; the cache is updated in place."""
        inner = self.model.model
        x = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(x, positions.unsqueeze(0).expand(ids.shape[0], -1))
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            if is_linear(layer):
                h = self._gdn(i, layer, h)
            else:
                h = self._attention(i, layer, h, cos, sin, positions, graphed)
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(inner.norm(x[:, -1]))

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run a prompt ``[B, T]`` into an empty cache; last-token logits ``[B, vocab]``."""
        c = self.cache
        B, T = input_ids.shape
        if B != c.batch or T > c.max_len:
            raise ValueError(f"prompt of shape {tuple(input_ids.shape)} does not fit a cache of batch {c.batch} "
                             f"and max_len {c.max_len}")
        c.reset()
        logits = self._forward(input_ids, torch.arange(T, device=input_ids.device))
        c.length = T
        return logits

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row ``[B, 1]``; logits ``[B, vocab]``."""
        c = self.cache
        if c.length == 0 or c.length >= c.max_len:
            raise ValueError(f"cache holds {c.length} of {c.max_len} tokens: prefill first, or make it longer")
        if not self.cuda_graph:
            logits = self._forward(ids, torch.tensor([c.length], device=ids.device))
        else:
            self.ids.copy_(ids)
            self.pos.fill_(c.length)
            self.seqused.fill_(c.length + 1)
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits.clone()  # the graph's output buffer is overwritten by the next replay
        c.length += 1
        return logits

    def _capture(self) -> None:
        """Warm up on a side stream (Triton autotuning, allocator), then capture one step.

        Warm-up steps write the cache at the current position, which the replay then overwrites,
        and read the same states: the GDN states are saved and restored around them.
        """
        saved = [t.clone() for t in (*self.cache.conv.values(), *self.cache.state.values())]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(self.ids, self.pos, graphed=True)
                self._restore(saved)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward(self.ids, self.pos, graphed=True)
        self._restore(saved)

    def _restore(self, saved) -> None:
        for t, s in zip((*self.cache.conv.values(), *self.cache.state.values()), saved):
            t.copy_(s)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: ``[B, T + max_new_tokens]``."""
        logits = self.prefill(input_ids)
        out = [input_ids]
        for n in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if n + 1 < max_new_tokens:
                logits = self.step(nxt)
        return torch.cat(out, dim=1)
