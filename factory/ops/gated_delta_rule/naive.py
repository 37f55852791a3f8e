"""Pure-torch reference of the gated delta rule (CPU path, and the ground truth on GPU).

Layout follows flash-linear-attention: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``,
g and beta ``[B, T, HV]``, states ``[N, HV, K, V]``. Everything accumulates in fp32 and
the output is cast back to v's dtype. Nothing here imports fla.

    S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t k_t v_t^T   (S is K x V)
    o_t = S_t^T (scale q_t)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-head L2 normalisation, matching fla's ``l2norm`` (rsqrt of sum of squares + eps)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gdn_gate(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Log decay g = -exp(A_log) * softplus(a + dt_bias), in fp32."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())


def gdn_beta(b: torch.Tensor, allow_neg_eigval: bool = False) -> torch.Tensor:
    """Write strength: sigmoid, doubled to (0, 2) when negative eigenvalues are allowed."""
    beta = b.float().sigmoid()
    return beta * 2.0 if allow_neg_eigval else beta


def repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat ``[B, T, h, D]`` to ``heads`` heads, GQA order (head i uses source head i // r)."""
    have = x.shape[2]
    if have == heads:
        return x
    if heads % have:
        raise ValueError(f"cannot repeat {have} heads to {heads}: {heads} is not a multiple of {have}")
    return x.repeat_interleave(heads // have, dim=2)


def _to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``[1, total, ...]`` packed rows -> ``[N, Tmax, ...]`` zero-padded at the end of each row."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    pieces = torch.split(x[0], lengths, dim=0)
    return torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True), lengths


def _from_padded(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    return torch.cat([x[i, :n] for i, n in enumerate(lengths)], dim=0).unsqueeze(0)


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    """Repeat heads to HV, normalise, scale, and move to fp32 ``[B, HV, T, D]``."""
    heads = v.shape[2] if v.shape[2] >= q.shape[2] else q.shape[2]
    if g.shape[2] != heads:
        raise ValueError(f"g/beta have {g.shape[2]} heads; expected {heads} (the larger of q and v heads)")
    q, k, v = (repeat_heads(t, heads).float() for t in (q, k, v))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q * scale
    return [t.transpose(1, 2) for t in (q, k, v)] + [g.float().transpose(1, 2), beta.float().transpose(1, 2)]


def _doc_masks(starts: torch.Tensor, N: int, C: int):
    """Per-chunk masks of packed documents from their start flags ``[B, T]``: which pairs share a
    document ``[B, 1, N, C, C]``, which positions continue the document the chunk began in (and
    so read the carried state) and which belong to the chunk's last document (and so write the
    state it passes on), both ``[B, 1, N, C]`` as 0/1."""
    doc = starts.reshape(starts.shape[0], 1, N, C).long().cumsum(-1)  # 0: the document carried in
    same = doc.unsqueeze(-1) == doc.unsqueeze(-2)
    carried = (doc == 0).float()
    last = (doc == doc[..., -1:]).float()
    return same, carried, last


def _chunk_core(q, k, v, g, beta, state, chunk_size, starts=None):
    """Chunked (WY) form on ``[B, H, T, D]`` fp32 tensors with T a multiple of ``chunk_size``.

    ``starts`` (``[B, T]`` bool, packed documents side by side in each row): the state restarts
    from zero where a document starts, also inside a chunk (each pair of positions interacts only
    within a document).
    """
    B, H, T, K = k.shape
    V = v.shape[-1]
    C, N = chunk_size, T // chunk_size
    q, k, v = (t.reshape(B, H, N, C, t.shape[-1]) for t in (q, k, v))
    g, beta = (t.reshape(B, H, N, C) for t in (g, beta))
    g = g.cumsum(-1)
    visible = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if starts is not None:
        same, carried, last = _doc_masks(starts, N, C)
        visible = visible & same
    # decay[i, j] = exp(G_i - G_j) where i sees j (masked before exp so it never overflows)
    decay = (g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~visible, float("-inf")).exp()
    k_beta = k * beta.unsqueeze(-1)
    g_exp = g.exp()
    g_last = g[..., -1:]  # [B, H, N, 1]
    state_decay = g_last.exp()  # what is left of the chunk's incoming state at its end
    k_tail = k * (g_last - g).exp().unsqueeze(-1)
    if starts is not None:
        g_exp = g_exp * carried  # a document started in this chunk reads no carried state ...
        k_tail = k_tail * last.unsqueeze(-1)  # ... and only the last document's writes are passed on
        state_decay = state_decay * carried[..., -1:]
    # Solve (I + A) W = [k_beta * exp(G), v_beta] with A strictly lower: the WY representation.
    # unitriangular: the solve reads only A's strict lower triangle, and its gradient has no other.
    A = (k_beta @ k.transpose(-1, -2)) * decay
    rhs = torch.cat([k_beta * g_exp.unsqueeze(-1), v * beta.unsqueeze(-1)], dim=-1)
    solved = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    w, u = solved[..., :K], solved[..., K:]
    intra = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * g_exp.unsqueeze(-1)
    # unbind once per tensor: per-chunk indexing would cost a full-size zero-filled gradient each
    chunks = zip(u.unbind(2), w.unbind(2), q_decayed.unbind(2), intra.unbind(2), k_tail.unbind(2),
                 state_decay.unbind(2))
    outs = []
    for u_i, w_i, q_i, intra_i, k_i, decay_i in chunks:
        v_new = u_i - w_i @ state
        outs.append(q_i @ state + intra_i @ v_new)
        state = state * decay_i.unsqueeze(-1) + k_i.transpose(-1, -2) @ v_new
    return torch.stack(outs, dim=2).reshape(B, H, T, V), state


def _recurrent_core(q, k, v, g, beta, state):
    """Token-by-token recurrence on ``[B, H, T, D]`` fp32 tensors."""
    T = q.shape[2]
    outs = []
    for t in range(T):
        state = state * g[:, :, t, None, None].exp()
        k_t = k[:, :, t]
        delta = (v[:, :, t] - (k_t.unsqueeze(-1) * state).sum(-2)) * beta[:, :, t, None]
        state = state + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        outs.append((q[:, :, t].unsqueeze(-1) * state).sum(-2))
    return torch.stack(outs, dim=2), state


def _run(core, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, **kw):
    out_dtype = v.dtype
    lengths = None
    if cu_seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(f"packed rows need batch size 1 with cu_seqlens, got {q.shape[0]}")
        # Zero padding at each row's end is inert: k = beta = 0 writes nothing, g = 0 keeps the state.
        (q, lengths), (k, _), (v, _), (g, _), (beta, _) = (_to_padded(t, cu_seqlens) for t in (q, k, v, g, beta))
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    B, H, T, K = k.shape
    state = k.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.float()
    o, state = core(q, k, v, g, beta, state, **kw)
    o = o.transpose(1, 2)
    if lengths is not None:
        o = _from_padded(o, lengths)
    return o.to(out_dtype), (state if output_final_state else None)


def _fill_lanes(lengths: list[int], width: int) -> list[int]:
    """Lane offsets of consecutive documents, each lane taking documents while they fit in ``width``."""
    offsets, lane_start, used = [], 0, 0
    for n in lengths:
        if used + n > width:
            lane_start, used = lane_start + width, 0
        offsets.append(lane_start + used)
        used += n
    return offsets


def _lanes(cu_seqlens: torch.Tensor, chunk_size: int):
    """Packed documents laid side by side in lanes of consecutive documents. The width is the whole
    chunks, from the longest document's to twice that, that leave the least padding (the first of
    those), so rows packed by the data loader come back as those rows. Returns the lane position of
    every token (None where that is every position in order), the lane count and width, and the
    document start flags ``[lanes, width]``."""
    lengths = [n for n in (cu_seqlens[1:] - cu_seqlens[:-1]).tolist() if n > 0]
    shortest = -(-max(lengths) // chunk_size) * chunk_size

    def size(width):  # lanes * width
        return (_fill_lanes(lengths, width)[-1] // width + 1) * width

    width = min(range(shortest, 2 * shortest + 1, chunk_size), key=size)
    offsets = _fill_lanes(lengths, width)
    lanes = offsets[-1] // width + 1
    device = cu_seqlens.device
    starts = torch.zeros(lanes * width, dtype=torch.bool, device=device)
    starts[torch.tensor(offsets, device=device)] = True
    index = None
    if sum(lengths) != lanes * width:
        index = torch.cat([torch.arange(n) + o for n, o in zip(lengths, offsets)]).to(device)
    return index, lanes, width, starts.view(lanes, width)


def _packed_chunk(q, k, v, g, beta, scale, use_qk_l2norm, cu_seqlens, C):
    """Packed rows without states, in lanes (``_lanes``): documents side by side, restarting the
    state inside chunks where one starts, so the chunk loop runs over a lane's width, not the
    whole packed row, and no document is padded (zero padding at a lane's end is inert)."""
    if q.shape[0] != 1:
        raise ValueError(f"packed rows need batch size 1 with cu_seqlens, got {q.shape[0]}")
    index, lanes, width, starts = _lanes(cu_seqlens, C)
    out_dtype = v.dtype

    def to_lanes(t):
        if index is not None:
            t = t.new_zeros(1, lanes * width, *t.shape[2:]).index_copy(1, index, t)
        return t.reshape(lanes, width, *t.shape[2:])

    q, k, v, g, beta = _prepare(*(to_lanes(t) for t in (q, k, v, g, beta)), scale, use_qk_l2norm)
    state = k.new_zeros(lanes, k.shape[1], k.shape[-1], v.shape[-1])
    o, _ = _chunk_core(q, k, v, g, beta, state, C, starts=starts)
    o = o.transpose(1, 2).flatten(0, 1).unsqueeze(0)  # [1, lanes * width, H, V]
    if index is not None:
        o = o.index_select(1, index)
    return o.to(out_dtype), None


def naive_chunk_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, cu_seqlens=None, chunk_size: int = 64,
):
    """Chunked reference for training and prefill. Returns ``(o, final_state or None)``. Packed rows
    (``cu_seqlens``) with states (a state per document in or out) pad every document to the longest."""
    if cu_seqlens is not None and initial_state is None and not output_final_state:
        return _packed_chunk(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, cu_seqlens, chunk_size)
    T = q.shape[1] if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    pad = (-T) % chunk_size

    def core(q, k, v, g, beta, state):
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
        o, state = _chunk_core(q, k, v, g, beta, state, chunk_size)
        return o[:, :, : o.shape[2] - pad], state

    return _run(core, q, k, v, g, beta, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, cu_seqlens)


def naive_recurrent_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, cu_seqlens=None,
):
    """Recurrent reference for decoding (and a second opinion on the chunked form)."""
    return _run(_recurrent_core, q, k, v, g, beta, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, cu_seqlens)


def naive_causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False, activation: str | None = "silu", cu_seqlens=None,
):
    """Depthwise causal conv. x ``[B, T, D]``, weight ``[D, W]``, state ``[N, D, W]`` (fla's layout:
    the last W inputs, oldest first). Packed rows (``cu_seqlens``, B=1) restart from zeros."""
    lengths = None
    if cu_seqlens is not None and initial_state is None and not output_final_state:
        return _packed_conv(x, weight, activation, cu_seqlens)
    if cu_seqlens is not None:
        x, lengths = _to_padded(x, cu_seqlens)
    B, T, D = x.shape
    W = weight.shape[-1]
    xt = x.transpose(1, 2)
    history = xt.new_zeros(B, D, W) if initial_state is None else initial_state.to(xt.dtype)
    full = torch.cat([history[..., 1:], xt], dim=-1)
    y = F.conv1d(full, weight.unsqueeze(1).to(xt.dtype), groups=D).transpose(1, 2)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    final = None
    if output_final_state:
        ends = torch.tensor(lengths, device=x.device) if lengths is not None else torch.full((B,), T, device=x.device)
        padded = torch.cat([history, xt], dim=-1)
        idx = ends[:, None] + torch.arange(W, device=x.device)[None, :]
        final = padded.gather(2, idx[:, None, :].expand(B, D, W))
    if lengths is not None:
        y = _from_padded(y, lengths)
    return y, final


def _packed_conv(x, weight, activation, cu_seqlens):
    """Packed rows in one pass: tap ``s`` sees ``x[t - s]`` only where that stays in t's document."""
    T, W = x.shape[1], weight.shape[-1]
    starts = torch.zeros(T, dtype=torch.long, device=x.device)
    starts[cu_seqlens[:-1].long()] = 1
    positions = torch.arange(T, device=x.device)
    offset = positions - torch.where(starts.bool(), positions, 0).cummax(0).values  # position in its document
    w = weight.to(x.dtype)
    y = x * w[:, -1]
    for shift in range(1, W):
        shifted = F.pad(x, (0, 0, shift, 0))[:, :T]
        y = y + shifted * (offset >= shift).to(x.dtype)[None, :, None] * w[:, W - 1 - shift]
    return (F.silu(y) if activation in ("silu", "swish") else y), None
