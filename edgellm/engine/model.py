"""The one decoder forward of every family (engine/families/): the llama layout, with the other
families' differences read from EngineConfig's switches (LayerNorm, plain MLP, learned positions,
sandwich norms, GeGLU, embedding and attention scales, per-layer sliding windows and RoPE bases).

One function serves prefill and decode: a right-padded chunk of `q_lens[b]` tokens per row, placed
at positions starts[b] ... of cache slot slots[b]. Every hot-path op goes through `edgellm.kernels.ops`
(which picks Triton or the torch reference); the matmuls are cuBLAS, or the Triton GEMV at decode sizes.
On the CPU, where the references would run, engine/cpu_forward.py runs the same forward in numpy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..kernels import gemv, matmul
from ..kernels import ops as dispatched_ops
from ..kernels._triton import early_release
from ..kernels.dispatch import run_settings
from ..quant.formats import QuantizedWeight
from . import cpu_forward
from .config import EngineConfig
from .cpu_linear import cpu_linear
from .kv_cache import LinearKVCache
from .lora import LoraStacks
from .switches import Switches
from .weights import LayerWeights, ModelWeights

DEFAULT_SWITCHES = Switches()


class TokenTree(NamedTuple):
    """A chunk that is a speculative token tree rather than a sequence (kernels/tree_mask.py): node
    i of row b is stored at cache position starts[b] + i, rotated at positions[b, i] (the row's
    length plus its depth) and sees the context and the nodes whose bits bits[b, i] has."""
    bits: torch.Tensor       # [B, T] int64
    positions: torch.Tensor  # [B, T] int


class RopeTables(NamedTuple):
    """The rotary tables of an engine: cos/sin [positions, rotary_dim / 2]; for multimodal RoPE also
    each slot's position offset ([slots] int32 on the device, kernels/rope_append.py) and the (t, h, w)
    frequency sections; `local`: the sliding-window layers' own (cos, sin) where their RoPE base
    differs (Gemma 3)."""
    cos: torch.Tensor
    sin: torch.Tensor
    offsets: torch.Tensor | None = None
    sections: tuple[int, int, int] | None = None
    local: tuple[torch.Tensor, torch.Tensor] | None = None


class LoraBatch(NamedTuple):
    """The adapters of one forward: the engine's stacks (engine/lora.py) and each row's slot, [B]
    int32 on the device (-1: no adapter); forward_logits widens it to one entry per token."""
    stacks: LoraStacks
    index: torch.Tensor
    used: torch.Tensor  # kernels/lora.py used_slots(): the batch's distinct adapters


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora: LoraBatch | None,
             layer: int, group: str, ops, t: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias), plus each row's adapter delta for this projection group (qkv, o,
    gate_up, down): the LoRA shrink (`t`: its partials, when the kernel that made x computed them),
    then the expand, which at decode sizes is the GEMV's epilogue."""
    if lora is None:
        return _linear(x, weight, bias, ops)
    a_stack, b_stack = lora.stacks.layers[layer][group]
    if t is None:
        t = ops.lora_shrink(x, a_stack, lora.index, lora.used)
    spec = (t, b_stack, lora.index, lora.used, lora.stacks.scale, lora.stacks.segments[group])
    if _decode_sized(x, weight):
        return ops.gemv(x, weight, bias, lora=spec)
    return ops.lora_expand(_matmul(x, weight, bias, ops), *spec)


def _fused(op, *args, lora_a=None, **kwargs):
    """op(*args, **kwargs), and the LoRA shrink partials that the op computes when given lora_a (else None)."""
    if lora_a is None:
        return op(*args, **kwargs), None
    *outs, t = op(*args, lora_a=lora_a, **kwargs)
    return (outs[0] if len(outs) == 1 else tuple(outs)), t


def _shrink_operand(lora: LoraBatch | None, layer: int, group: str, rows: int):
    """The lora_a argument (A stack, index, used) for the op that produces this group's input, or None.
    Only for decode-sized batches: the fused shrink reads each row's A chunk in that row's programs,
    which at prefill sizes would re-read the adapters once per token (the tiled lora_shrink does not)."""
    if lora is None or not _gemv_rows(rows):
        return None
    return lora.stacks.layers[layer][group][0], lora.index, lora.used


def _attention_block(lw: LayerWeights, cfg: EngineConfig, qkv: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, rope: RopeTables,
                     slots: torch.Tensor, starts: torch.Tensor,
                     q_lens: torch.Tensor, ends: torch.Tensor, ops, lora: LoraBatch | None,
                     layer: int, tree: "TokenTree | None", positions: torch.Tensor | None,
                     residual: torch.Tensor | None = None, rotated: bool = False,
                     sumsq_out: torch.Tensor | None = None, max_keys: int | None = None,
                     last: tuple[torch.Tensor, torch.Tensor] | None = None, project: bool = True) -> torch.Tensor:
    """Attention and the o projection (plus `residual`, when given: the fused decode path's add, and
    with sumsq_out the sums of squares of its rows, gemv's). rotated: `qkv` holds the rotated queries
    only, their keys and values already in the cache (the qkv GEMV's rope_append epilogue). max_keys:
    forward_logits'. last: (rows, token index per row): every token's keys and values go into the
    cache, then only these queries attend (one a row, [B, 1] out); last=(): the keys and values only
    (returns None). project=False: the attention's output [B, S, q_size], before the o projection."""
    batch, seq, _ = qkv.shape
    window = cfg.layer_window(layer)
    if rotated:
        q = qkv.reshape(batch, seq, cfg.num_attention_heads, cfg.head_dim)
        return _attend(lw, cfg, q, keys, values, slots, starts, q_lens, ends, ops, lora, layer, tree, window, residual,
                       sumsq_out, max_keys, project)
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = q.reshape(batch, seq, cfg.num_attention_heads, cfg.head_dim)
    k = k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = ops.rms_norm(q, lw.q_norm, cfg.rms_norm_eps)
        k = ops.rms_norm(k, lw.k_norm, cfg.rms_norm_eps)
    if tree is not None:
        positions = tree.positions
    # Multimodal RoPE: a prompt's (t, h, w) positions [B, S, 3] are absolute; later 1-D positions are
    # shifted by each slot's offset (rope.offsets, None for text models).
    three = positions is not None and positions.dim() == 3
    if cfg.positions == "learned":  # no rotation: positions went into the embedding
        ops.kv_append(keys, values, k, v, slots, starts, q_lens)
        q = q.contiguous()
    else:
        cos, sin = rope.local if window and rope.local is not None else (rope.cos, rope.sin)
        q = ops.rope_kv_append(q, k, v, cos, sin, keys, values, slots, starts, q_lens, positions,
                               offsets=None if three else rope.offsets, sections=rope.sections if three else None)
    if last is not None:
        if not last:
            return None
        q = q[last][:, None]
    return _attend(lw, cfg, q, keys, values, slots, starts, q_lens, ends, ops, lora, layer, tree, window, residual,
                   sumsq_out, max_keys, project)


def _attend(lw: LayerWeights, cfg: EngineConfig, q: torch.Tensor, keys, values, slots, starts, q_lens, ends, ops,
            lora: LoraBatch | None, layer: int, tree: "TokenTree | None", window: int,
            residual: torch.Tensor | None, sumsq_out: torch.Tensor | None = None,
            max_keys: int | None = None, project: bool = True) -> torch.Tensor:
    """Attention of the rotated queries q [B, S, heads, head_dim] over the cache, then (project) the o
    projection."""
    batch, seq = q.shape[:2]
    scale = cfg.attention_scale
    t = None
    settings = run_settings()  # (batch-invariant prefill: a one-token chunk's query as any chunk's)
    if seq == 1 and (settings.decode_step or not settings.batch_invariant):
        out, t = _fused(ops.decode_attention, q[:, 0], keys, values, slots, ends, scale, window,
                        lora_a=_shrink_operand(lora, layer, "o", batch))
        out = out[:, None]
    elif tree is None:
        out = ops.prefill_attention(q, keys, values, slots, starts, q_lens, scale, window, max_keys=max_keys)
    else:
        out = ops.tree_attention(q, keys, values, slots, starts, q_lens, tree.bits, scale, window)
    out = out.reshape(batch, seq, cfg.q_size)
    if not project:
        return out
    if residual is not None:  # (no LoRA on this path: _fusable)
        return _linear(out, lw.o_proj, lw.o_bias, ops, residual=residual, sumsq_out=sumsq_out)
    return _project(out, lw.o_proj, lw.o_bias, lora, layer, "o", ops, t)


def forward_logits(weights: ModelWeights, cfg: EngineConfig, cache: LinearKVCache,
                   rope: RopeTables | tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor, slots: torch.Tensor,
                   starts: torch.Tensor, q_lens: torch.Tensor, kernels=None,
                   lora: LoraBatch | None = None, tree: TokenTree | None = None,
                   every_token: bool = False, positions: torch.Tensor | None = None,
                   max_keys: int | None = None, before_attention=None, logits: bool = True,
                   switches: Switches = DEFAULT_SWITCHES) -> torch.Tensor | None:
    """hidden: input embeddings [B, S, H]; slots/starts/q_lens: [B] int tensors on the device.
    `rope`: RopeTables, or (cos, sin). `kernels`: where the ops come from (default: the dispatched
    `edgellm.kernels.ops`). `lora`: per-row LoRA adapters (None: the base model for every row).
    `tree`: the chunk is a token tree (speculative verification), S > 1. `positions`: [B, S, 3]
    multimodal RoPE positions of the chunk's tokens (default: starts[b] + i, shifted by rope.offsets).
    `max_keys`: at most how many keys any row sees after this chunk (starts + q_lens), where the caller
    knows it: prefill attention then splits its keys only as far as they go (kernels/attention.py).
    With Switches.batch_invariant, whether the chunk is a decode step's (RunSettings.decode_step, set
    by EngineState.forward), not its number of rows, sends its projections to the GEMV and its queries to
    decode attention, and everything else to prefill's kernels (kernels/matmul.py, prefill attention).
    `before_attention(layer)`: called before each layer's attention reads its cache (a KV hit's host
    blocks copied on a side stream: the layer waits for its own, engine/prefill_steps.py). `switches`:
    the fusion choices (engine/switches.py; the runner's, default the measured ones).

    Only each row's last token reaches the logits: past its keys/values the last layer runs on that
    token alone (attention as one decode query, o projection and MLP on one row a row), unless every
    token's logits are asked for, the chunk is a tree, or the ops observe every projection (GPTQ's
    calibration). A 16-layer model's prefill skips a sixteenth of its matmuls. logits=False:
    a chunk that holds no row's last token (a long prompt's earlier chunks): the last layer stops at
    its keys and values, no LM head, returns None.

    Appends the chunk's keys/values to the cache (lengths are the caller's to update) and returns
    the logits of each row's last real token, [B, vocab], float32; every_token: of every token of
    the chunk, [B, S, vocab].
    """
    ops = kernels or dispatched_ops
    if not isinstance(rope, RopeTables):
        rope = RopeTables(*rope)
    batch, seq, _ = hidden.shape
    # (Batch-invariant: the last layer runs on every token, as a one-token chunk's does.)
    last_only = not every_token and tree is None and seq > 1 and not getattr(ops, "observe_linear", None) \
        and not switches.batch_invariant
    row_lora = lora
    if lora is not None and seq > 1:  # the LoRA kernels take one adapter index per token
        lora = lora._replace(index=lora.index.repeat_interleave(seq))
    ends = starts + q_lens  # each row's cache length after this chunk (computed once, not per layer)
    hidden = _scaled_inputs(weights, cfg, hidden, starts, tree)
    if switches.cpu_blas and ops is dispatched_ops and cpu_forward.takes(cfg, rope, hidden, cache, lora, tree, positions):
        return cpu_forward.forward_logits(weights, cfg, cache, rope, hidden, slots, starts, q_lens, ops.dequantize,
                                          every_token, logits, before_attention)
    if _fusable(weights, cfg, lora, hidden, ops, switches):
        return _forward_fused(weights, cfg, cache, rope, hidden, slots, starts, q_lens, ends, ops, tree, positions,
                              every_token, max_keys, before_attention, switches)
    residual = None
    x = hidden
    tokens = batch * seq
    pending = None  # the previous layer's MLP-output norm (sandwich norms), fused into the next norm
    if not every_token:  # each row's last token: the one whose logits are returned
        last = (q_lens.long() - 1).clamp(min=0)
        rows = torch.arange(batch, device=hidden.device)
    for index, lw in enumerate(weights.layers):
        qkv, residual = _qkv_block(lw, cfg, x, residual, pending, lora, index, tokens, ops)
        keys, values = cache.layer(index)
        if before_attention is not None:
            before_attention(index)
        if not logits and index == len(weights.layers) - 1:  # only the cache is wanted from this chunk
            return _attention_block(lw, cfg, qkv, keys, values, rope, slots, starts, q_lens, ends, ops, lora, index,
                                    tree, positions, last=())
        if last_only and index == len(weights.layers) - 1:  # from here on, each row's last token
            attn = _attention_block(lw, cfg, qkv, keys, values, rope, slots, starts, q_lens, ends, ops, row_lora,
                                    index, tree, positions, max_keys=max_keys, last=(rows, last))
            residual, lora, tokens = residual[rows, last][:, None], row_lora, batch
        else:
            attn = _attention_block(lw, cfg, qkv, keys, values, rope, slots, starts, q_lens, ends, ops, lora, index,
                                    tree, positions, max_keys=max_keys)
        x, residual = _mlp_block(lw, cfg, attn, residual, lora, index, tokens, ops)
        pending = lw.mlp_out_norm
    if every_token:
        (final, _), _ = _norm(ops, cfg, x, residual, weights.final_norm, weights.final_norm_bias, pre=pending)
        return _linear(final, weights.lm_head, None, ops).float()
    if not last_only:
        x, residual = x[rows, last][:, None], residual[rows, last][:, None]
    (final, _), _ = _norm(ops, cfg, x, residual, weights.final_norm, weights.final_norm_bias, pre=pending)
    return _linear(final[:, 0], weights.lm_head, None, ops).float()


def _scaled_inputs(weights: ModelWeights, cfg: EngineConfig, hidden: torch.Tensor, starts: torch.Tensor,
                   tree: TokenTree | None = None) -> torch.Tensor:
    """The input embeddings [B, S, H] scaled (embed_scale) and, with learned positions, plus those of
    each token (the rows' chunks placed at `starts`)."""
    if cfg.embed_scale != 1.0:  # rounded to the activations' dtype first, as transformers does
        hidden = hidden * float(torch.tensor(cfg.embed_scale, dtype=hidden.dtype))
    if weights.positions is not None:  # learned absolute positions (GPT-2), added to the embedding
        pos = tree.positions if tree is not None else starts[:, None] + torch.arange(hidden.shape[1],
                                                                                     device=hidden.device)
        hidden = hidden + weights.positions[pos.long().clamp(max=weights.positions.shape[0] - 1)]
    return hidden


def _qkv_block(lw: LayerWeights, cfg: EngineConfig, x, residual, pending, lora: LoraBatch | None, index: int,
               tokens: int, ops):
    """A layer's input norm (after the residual add) and qkv projection: (qkv, residual)."""
    (x, residual), t = _norm(ops, cfg, x, residual, lw.input_norm, lw.input_norm_bias,
                             _shrink_operand(lora, index, "qkv", tokens), pre=pending)
    return _project(x, lw.qkv, lw.qkv_bias, lora, index, "qkv", ops, t), residual


def _mlp_block(lw: LayerWeights, cfg: EngineConfig, attn, residual, lora: LoraBatch | None, index: int,
               tokens: int, ops):
    """A layer's post-attention norm (after the residual add) and MLP: (the MLP's output, residual)."""
    (x, residual), t = _norm(ops, cfg, attn, residual, lw.post_norm, lw.post_norm_bias,
                             _shrink_operand(lora, index, "gate_up", tokens), pre=lw.attn_out_norm)
    if cfg.mlp == "plain":  # fc, activation, proj, with biases (GPT-2; no LoRA)
        x = ops.activation(_linear(x, lw.gate_up, lw.gate_up_bias, ops), cfg.activation)
        return _linear(x, lw.down, lw.down_bias, ops), residual
    gate_up = _project(x, lw.gate_up, None, lora, index, "gate_up", ops, t)
    x, t = _fused(ops.glu, gate_up, activation=cfg.activation, lora_a=_shrink_operand(lora, index, "down", tokens))
    return _project(x, lw.down, None, lora, index, "down", ops, t), residual


class Part(NamedTuple):
    """One attention group of a mixed step (forward_mixed): input embeddings [B, S, H] of chunks of
    q_lens[b] tokens placed at starts[b] of cache slot slots[b] (all [B] int on the device)."""
    hidden: torch.Tensor
    slots: torch.Tensor
    starts: torch.Tensor
    q_lens: torch.Tensor


def forward_mixed(weights: ModelWeights, cfg: EngineConfig, cache: LinearKVCache, rope: RopeTables,
                  parts: list[Part], lora: LoraBatch | None = None, kernels=None) -> torch.Tensor:
    """One step over several attention groups: the running rows' decode tokens ([B, 1]) beside a prompt
    chunk ([B', S]) (engine/mixed_steps.py). Every token-wise op (norms, projections, MLP) runs once
    over all the parts' tokens, so the chunk's tokens share the decode step's weight reads; attention
    runs per part (decode attention for one-token rows, prefill attention for chunks). lora: each
    token's adapter (index: one entry per token, the parts' tokens in order). Appends every token's
    keys and values to the cache (lengths are the caller's to update) and returns the logits of each
    row's last token, the parts' rows in order, [rows, vocab] float32. No trees, explicit positions or
    per-slot RoPE offsets (the engines with those take separate steps)."""
    ops = kernels or dispatched_ops
    hidden = [_scaled_inputs(weights, cfg, part.hidden, part.starts) for part in parts]
    shapes = [tuple(h.shape[:2]) for h in hidden]
    sizes = [rows * seq for rows, seq in shapes]
    ends = [part.starts + part.q_lens for part in parts]
    x = torch.cat([h.reshape(-1, h.shape[-1]) for h in hidden])[None]
    tokens, residual, pending = x.shape[1], None, None
    for index, lw in enumerate(weights.layers):
        qkv, residual = _qkv_block(lw, cfg, x, residual, pending, lora, index, tokens, ops)
        keys, values = cache.layer(index)
        out = [_attention_block(lw, cfg, piece.view(rows, seq, -1), keys, values, rope, part.slots, part.starts,
                                part.q_lens, end, ops, None, index, None, None, project=False).reshape(rows * seq, -1)
               for part, piece, (rows, seq), end in zip(parts, qkv[0].split(sizes), shapes, ends)]
        attn = _project(torch.cat(out)[None], lw.o_proj, lw.o_bias, lora, index, "o", ops)
        x, residual = _mlp_block(lw, cfg, attn, residual, lora, index, tokens, ops)
        pending = lw.mlp_out_norm
    last, begin = [], 0
    for part, (rows, seq) in zip(parts, shapes):  # each row's last token, as flat token indices
        last.append(begin + torch.arange(rows, device=x.device) * seq + part.q_lens.long() - 1)
        begin += rows * seq
    last = torch.cat(last)
    (final, _), _ = _norm(ops, cfg, x[:, last], residual[:, last], weights.final_norm, weights.final_norm_bias,
                          pre=pending)
    return _linear(final[0], weights.lm_head, None, ops).float()


def _fusable(weights: ModelWeights, cfg: EngineConfig, lora: LoraBatch | None, hidden: torch.Tensor, ops,
             switches: Switches = DEFAULT_SWITCHES) -> bool:
    """Whether the step can take the fused decode path (_forward_fused): decode-sized rows on the GPU,
    RMSNorm and a gated MLP, no sandwich norms, no LoRA, no calibration hook, switches.fused_gemv."""
    if lora is not None or cfg.norm != "rms" or cfg.mlp != "gated" or getattr(ops, "observe_linear", None) \
            or not switches.fused_gemv or not _decode_sized(hidden.reshape(-1, hidden.shape[-1])):
        return False
    return all(lw.attn_out_norm is None and lw.mlp_out_norm is None and
               all(gemv.supports(w) for w in (lw.qkv, lw.o_proj, lw.gate_up, lw.down)) for lw in weights.layers) \
        and gemv.supports(weights.lm_head)


# A single row's qkv GEMV of at most this many weight bytes keeps rope_kv_append as a kernel of its own:
# H100, SmolLM2-135M shape (1.1 MB) batch 1 1895 -> 1792 tok/s with the epilogue,
# while batch 16 (19065 -> 19894) and the Llama-3.2-1B shape (12.6 MB; 893 -> 908) gain by it.
ROPE_EPILOGUE_MIN_BYTES = 4 << 20


def _rope_fusable(cfg: EngineConfig, rope: RopeTables, layer: int, tree, positions, rows: int,
                  qkv_bytes: int, setting: bool | None = None, invariant: bool = False) -> bool:
    """Whether the qkv GEMV finishes with RoPE and the KV append (gemv.RopeAppend): rotary positions
    over the whole head at the cache positions, from the model's one table (no q/k norms between the
    projection and the rotation, no trees, explicit or multimodal positions, per-layer tables), and
    where it measured faster (ROPE_EPILOGUE_MIN_BYTES; batch-invariant: at every batch size, since the
    separate kernels round the queries elsewhere); setting (Switches.fused_rope) False / True: never /
    wherever it can run."""
    small = rows == 1 and qkv_bytes <= ROPE_EPILOGUE_MIN_BYTES and not invariant
    if setting is False or (setting is None and small):
        return False
    return cfg.positions != "learned" and not cfg.qk_norm and tree is None and positions is None \
        and rope.offsets is None and 2 * rope.cos.shape[-1] == cfg.head_dim \
        and not (cfg.layer_window(layer) and rope.local is not None)


def _forward_fused(weights: ModelWeights, cfg: EngineConfig, cache: LinearKVCache, rope: RopeTables,
                   hidden: torch.Tensor, slots, starts, q_lens, ends, ops, tree, positions, every_token: bool,
                   max_keys: int | None = None, before_attention=None, switches: Switches = DEFAULT_SWITCHES):
    """forward_logits at decode sizes with the residual adds in the epilogues of the o and down
    projections, SiLU * up in the gate/up projection's, each RMSNorm inside the GEMV that reads its
    output, and (_rope_fusable) RoPE + the KV append in the qkv projection: per layer qkv, attention,
    o, gate/up, down (up to five launches fewer than the chain of separate ops; each fused op computes
    what the separate ones would). h is the residual stream (the sum that add_rms_norm would have
    written). The norm's statistics: at one row each GEMV reads its row of x for them (row_rstd); over
    more rows the o and down GEMVs leave their output rows' sums of squares in parts as they store them
    (sumsq_out, one zeroed [parts, rows] buffer per norm), so the next GEMV's programs read those parts
    (added up in one order) instead of a pass over x each (which lost: Switches.fused_norm_rows); the first layer's input norm
    and the final norm stay kernels of their own there."""
    rows = hidden.shape[0] * hidden.shape[1]
    fuse_norm = rows <= switches.fused_norm_rows and not switches.batch_invariant  # (one way for every batch)
    eps = cfg.rms_norm_eps
    n_layers = len(weights.layers)
    # (the last down GEMV's sums would feed the final norm, which stays a kernel of its own: no row for them)
    sums = None
    if not fuse_norm:
        parts = max(gemv.sumsq_parts(w, rows) for lw in weights.layers for w in (lw.o_proj, lw.down))
        sums = torch.zeros(2 * n_layers - 1, parts, rows, dtype=torch.float32, device=hidden.device)

    def project(x, weight, bias, norm_weight, sumsq=None, **epilogue):
        if fuse_norm or sumsq is not None:
            return ops.gemv(x, weight, bias, norm=(norm_weight, eps), norm_sumsq=sumsq, **epilogue)
        return ops.gemv(ops.rms_norm(x, norm_weight, eps), weight, bias, **epilogue)

    def sumsq(i):  # the sums of squares of the residual stream after its i-th update (o, down, o, ...)
        return sums[i] if sums is not None and 0 <= i < len(sums) else None

    h = hidden
    with early_release(rows == 1):
        for index, lw in enumerate(weights.layers):
            keys, values = cache.layer(index)
            rotate = _rope_fusable(cfg, rope, index, tree, positions, rows, lw.qkv.nbytes, switches.fused_rope,
                                   switches.batch_invariant)
            spec = gemv.RopeAppend(rope.cos, rope.sin, keys, values, slots, starts, q_lens, cfg.num_attention_heads) \
                if rotate else None
            qkv = project(h, lw.qkv, lw.qkv_bias, lw.input_norm, sumsq(2 * index - 1), rope_append=spec)
            if before_attention is not None:
                before_attention(index)
            h = _attention_block(lw, cfg, qkv, keys, values, rope, slots, starts, q_lens, ends, ops, None, index, tree,
                                 positions, residual=h, rotated=rotate, sumsq_out=sumsq(2 * index), max_keys=max_keys)
            x = project(h, lw.gate_up, lw.gate_up_bias, lw.post_norm, sumsq(2 * index), glu=cfg.activation)
            h = ops.gemv(x, lw.down, lw.down_bias, residual=h, sumsq_out=sumsq(2 * index + 1))
        if not every_token:
            last = (q_lens.long() - 1).clamp(min=0)
            h = h[torch.arange(h.shape[0], device=h.device), last][:, None]
        logits = project(h, weights.lm_head, None, weights.final_norm).float()
    return logits if every_token else logits[:, 0]


def _norm(ops, cfg: EngineConfig, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
          bias: torch.Tensor | None, lora_a=None, pre: torch.Tensor | None = None):
    """((norm(x + residual), x + residual), LoRA shrink partials or None); residual None: x alone.
    RMSNorm (llama family) computes the next projection's LoRA shrink in the same kernel when given
    lora_a, and with `pre` (a sandwich norm's weight) normalises x itself before the add; LayerNorm
    (GPT-2) takes a bias."""
    eps = cfg.rms_norm_eps
    if cfg.norm == "layer":
        if residual is None:
            return (ops.layer_norm(x, weight, bias, eps), x), None
        return ops.add_layer_norm(x, residual, weight, bias, eps), None
    if residual is None:
        out, t = _fused(ops.rms_norm, x, weight, eps, lora_a=lora_a)
        return (out, x), t
    if pre is None:  # (the llama path's call, unchanged)
        return _fused(ops.add_rms_norm, x, residual, weight, eps, lora_a=lora_a)
    return _fused(ops.add_rms_norm, x, residual, weight, eps, lora_a=lora_a, pre_weight=pre)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ops,
            residual: torch.Tensor | None = None, sumsq_out: torch.Tensor | None = None) -> torch.Tensor:
    # At decode sizes (a few rows) on the GPU, the Triton skinny GEMM: it streams the LM head faster
    # than cuBLAS (H100, 1B shape: 177 us vs 194 us), matches it on the layer matrices, and, launched
    # with PDL like its neighbours, overlaps their launch and drain (SmolLM2 shape batch 1 1194 vs 1087
    # tok/s with cuBLAS and no PDL; Llama-3.2-1B shape even). Else cuBLAS.
    observe = getattr(ops, "observe_linear", None)  # calibration (quant/gptq.py) sees each linear's input
    if observe is not None:
        observe(x, weight)
    if _decode_sized(x, weight):
        return ops.gemv(x, weight, bias, residual=residual, sumsq_out=sumsq_out)
    y = _matmul(x, weight, bias, ops)
    y = y if residual is None else y + residual
    if sumsq_out is not None:  # (all in its first part: gemv's sumsq_out)
        sumsq_out[0] += y.reshape(-1, y.shape[-1]).float().square().sum(-1)
    return y


def _matmul(x: torch.Tensor, weight, bias: torch.Tensor | None, ops) -> torch.Tensor:
    """x @ weight^T (+ bias) where the GEMV does not run: cuBLAS on the GPU (a packed weight dequantized
    per call: prefill's many tokens share it), engine/cpu_linear.py on the CPU."""
    if not x.is_cuda:
        return cpu_linear(x, weight, bias, ops.dequantize)
    if isinstance(weight, QuantizedWeight):
        if run_settings().packed_prefill == "gemm" and matmul.supports(weight):  # (int4 read packed: an A/B)
            return ops.matmul(x, weight, bias)
        weight = ops.dequantize(weight, x.dtype)
    if run_settings().batch_invariant:  # (fixed tiles: a row's sums whatever the rows around it)
        return ops.matmul(x, weight, bias)
    return F.linear(x, weight, bias)


def _gemv_rows(rows: int) -> bool:
    """Whether rows of this many tokens take the GEMV (and the fused decode path): a few rows; with
    RunSettings.batch_invariant, a decode step's rows, however many (RunSettings.decode_step)."""
    settings = run_settings()
    return settings.decode_step if settings.batch_invariant else rows <= gemv.MAX_ROWS


def _decode_sized(x: torch.Tensor, weight=None) -> bool:
    """GEMV rows (_gemv_rows) on the GPU: the GEMV's work (unless the weight is packed in a way it does not
    read); a packed weight also up to gemv.PACKED_MAX_ROWS rows (outside batch invariance, whose
    prefill chunks all take one path), where dequantizing it whole for cuBLAS would cost more than it reads."""
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)) or \
            (weight is not None and not gemv.supports(weight)):
        return False
    rows = x.numel() // x.shape[-1]
    return _gemv_rows(rows) or (isinstance(weight, QuantizedWeight) and rows <= gemv.PACKED_MAX_ROWS
                                and not run_settings().batch_invariant)
