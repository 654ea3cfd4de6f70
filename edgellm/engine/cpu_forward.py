"""forward_logits on the CPU: the same decoder forward (engine/model.py) written in numpy, for the
llama layout (RMSNorm, RoPE, a SiLU-gated MLP; GQA, biases, q/k norms and sliding windows included).

Why a path of its own: on the CPU the references run each op as a torch call, and a decode step of
the default model is ~1,200 of them (~20 ms of dispatch) around matmuls that torch hands to MKL, whose
GEMV streams float32 weights at about half of what OpenBLAS (numpy's BLAS) reaches on the same cores
(bench/RESULTS.md, 2026-12-07: 2-core AMD EPYC, all of a step's matrices 62.6 ms against 31). Here a
numpy op costs a few microseconds and every matmul is one BLAS call on the runner's own tensors
(numpy views: no copies; the KV cache is written in place). It sits beside the references like a kernel
(kernels/dispatch.py: it runs where they would, on CPU tensors without Triton's interpreter), computes
what they compute, float32 throughout, and is checked against transformers (tests/engine/test_cpu_forward.py).
Switches.cpu_blas (EDGELLM_CPU_BLAS=0) runs the references instead.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..kernels.dispatch import interpreter_on, run_settings
from .cpu_linear import dense_weight

# Queries per attention block of a prefill row: bounds its scores to [kv_heads, block x group, keys] floats.
QUERY_BLOCK = 128


def takes(cfg, rope, hidden: torch.Tensor, cache, lora, tree, positions) -> bool:
    """Whether this forward can run here: float32 CPU tensors where the references would run (no
    interpreter, no use_reference block), a llama-layout model with one RoPE table, and no adapters,
    trees or explicit (multimodal) positions. (The caller also asks for the dispatched ops: a
    forward given its own, a calibration's hooks, runs them.)"""
    return (not hidden.is_cuda and hidden.dtype == torch.float32 and cache.data.dtype == torch.float32
            and not interpreter_on() and not run_settings().force_reference
            and lora is None and tree is None and positions is None and rope.offsets is None and rope.local is None
            and cfg.norm == "rms" and cfg.mlp == "gated" and cfg.activation == "silu" and cfg.positions == "rope"
            and not cfg.sandwich_norms)


@contextlib.contextmanager
def one_torch_thread():
    """torch's CPU ops on one thread within the block (the sampling after a forward here): OpenBLAS's
    threads still spin on the other cores for a while after each call, and torch's pool contending
    with them made a sampled step 1.5x slower (default model, top-p 0.9: 68 -> 50 ms on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _array(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().numpy()


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """rms_norm_ref over the last dim of x [..., n]: x / sqrt(mean(x^2) + eps), then the weight."""
    mean_square = np.vecdot(x, x) if hasattr(np, "vecdot") else np.einsum("...i,...i->...", x, x)
    scale = 1.0 / np.sqrt(mean_square / np.float32(x.shape[-1]) + np.float32(eps))
    y = x * scale[..., None]
    y *= weight
    return y


def _operand(weight, dequantize) -> np.ndarray:
    """weight [out, in] as the [in, out] operand of x @ W^T, over the weight's own memory (a packed one
    dequantized once). A matrix with at least as many outputs as inputs (all but the MLP's down) is
    stored [in, out] on its first use, in place (the tensor keeps its shape and values, its strides
    change): OpenBLAS streams it ~1.4x faster so (gate/up 470 -> 334 us, the LM head 7.0 -> 3.8 ms
    on the 2-core EPYC), and the down projection ~1.7x slower."""
    dense = dense_weight(weight, torch.float32, dequantize)
    rows, columns = dense.shape
    if rows >= columns and dense.is_contiguous() and rows > 1:
        with torch.no_grad():
            dense.set_(dense.t().contiguous().untyped_storage(), 0, (rows, columns), (1, rows))
    return dense.detach().numpy().T


def _linear(x: np.ndarray, weight, bias, dequantize) -> np.ndarray:
    """x @ weight^T (+ bias): one BLAS call."""
    y = x @ _operand(weight, dequantize)
    return y if bias is None else y + _array(bias)


def _rotation(cos: np.ndarray, sin: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """kernels/rope.py rotate_pairs as x * c + swapped(x) * s (the same products and sums): cos/sin
    [N, half] -> c, s [N, 1, dim]; dims past 2 * half pass through (c 1, s 0)."""
    n, half = cos.shape
    c = np.ones((n, 1, dim), dtype=np.float32)
    s = np.zeros((n, 1, dim), dtype=np.float32)
    c[:, 0, :half], c[:, 0, half:2 * half] = cos, cos
    s[:, 0, :half], s[:, 0, half:2 * half] = -sin, sin
    return c, s


def _rotate(x: np.ndarray, c: np.ndarray, s: np.ndarray, half: int) -> np.ndarray:
    """x [N, heads, D] rotated by _rotation's c, s: dim i < half paired with i + half."""
    swapped = np.concatenate([x[..., half:2 * half], x[..., :half], x[..., 2 * half:]], axis=-1)
    swapped *= s
    out = x * c
    out += swapped
    return out


def _attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, first: int, scale: float, window: int) -> np.ndarray:
    """Causal attention of one row's queries q [n, heads, D] at positions first, first + 1, ... over its
    cache keys/values [kv_heads, >= first + n, D] (window > 0: each query's last `window` keys only).
    Returns [n, heads * D]."""
    n, heads, dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    q = q * np.float32(scale)
    if n == 1:  # a decode step's query: every key up to its own (within the window), no mask
        begin = max(0, first + 1 - window) if window > 0 else 0
        scores = q.reshape(kv_heads, group, dim) @ keys[:, begin:first + 1].transpose(0, 2, 1)
        return _softmax_times(scores, values[:, begin:first + 1]).reshape(1, heads * dim)
    grouped = q.reshape(n, kv_heads, group, dim).transpose(1, 0, 2, 3)  # query head h reads kv head h // group
    out = np.empty((kv_heads, n, group, dim), dtype=q.dtype)
    for lo in range(0, n, QUERY_BLOCK):
        hi = min(n, lo + QUERY_BLOCK)
        end = first + hi  # keys past the block's last query are hidden from all of it
        begin = max(0, first + lo - window + 1) if window > 0 else 0
        block = grouped[:, lo:hi].reshape(kv_heads, (hi - lo) * group, dim)
        scores = (block @ keys[:, begin:end].transpose(0, 2, 1)).reshape(kv_heads, hi - lo, group, end - begin)
        query_pos = np.arange(first + lo, first + hi)[:, None]
        key_pos = np.arange(begin, end)[None, :]
        hidden = key_pos > query_pos
        if window > 0:
            hidden |= key_pos <= query_pos - window
        scores += np.where(hidden, np.float32(-np.inf), np.float32(0))[:, None, :]
        out[:, lo:hi] = _softmax_times(scores.reshape(kv_heads, (hi - lo) * group, end - begin),
                                       values[:, begin:end]).reshape(kv_heads, hi - lo, group, dim)
    return out.transpose(1, 0, 2, 3).reshape(n, heads * dim)


def _softmax_times(scores: np.ndarray, values: np.ndarray) -> np.ndarray:
    """softmax(scores) @ values over the last dim of scores [..., keys] (scores overwritten; the
    normalisation divides the output rows, not the probabilities)."""
    scores -= scores.max(-1, keepdims=True)
    np.exp(scores, out=scores)
    total = scores.sum(-1, keepdims=True)
    out = scores @ values
    out /= total
    return out


def forward_logits(weights, cfg, cache, rope, hidden: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
                   q_lens: torch.Tensor, dequantize, every_token: bool = False, logits: bool = True,
                   before_attention=None) -> torch.Tensor | None:
    """model.forward_logits (same arguments and results) for what `takes` accepts."""
    batch, seq, _ = hidden.shape
    rows = list(zip(slots.tolist(), starts.tolist(), q_lens.tolist()))
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
    q_size, kv_size, inner = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    eps, scale = cfg.rms_norm_eps, cfg.attention_scale
    kv = cache.data.numpy()  # [layers, 2, slots, kv_heads, capacity, D], written in place
    cos, sin = rope.cos.numpy(), rope.sin.numpy()
    token_pos = (np.array([start for _, start, _ in rows])[:, None] + np.arange(seq)[None, :]).clip(0, len(cos) - 1)
    rot_cos, rot_sin = _rotation(cos[token_pos.reshape(-1)], sin[token_pos.reshape(-1)], dim)
    h = hidden.detach().numpy().reshape(batch * seq, -1).copy()  # the residual stream, added to in place
    # Each row's last real token: the one whose logits are returned (the last layer runs on it alone).
    last = np.array([b * seq + max(n - 1, 0) for b, (_, _, n) in enumerate(rows)])
    last_only = not every_token and seq > 1
    n_layers = len(weights.layers)
    with np.errstate(over="ignore"):  # exp(-x) of SiLU overflows to inf for x < -88: the right limit
        for index, lw in enumerate(weights.layers):
            qkv = _linear(_rms_norm(h, _array(lw.input_norm), eps), lw.qkv, lw.qkv_bias, dequantize)
            qk = qkv[:, :q_size + kv_size].reshape(-1, heads + kv_heads, dim)
            if cfg.qk_norm:
                qk = np.concatenate([_rms_norm(qk[:, :heads], _array(lw.q_norm), eps),
                                     _rms_norm(qk[:, heads:], _array(lw.k_norm), eps)], axis=1)
            qk = _rotate(qk, rot_cos, rot_sin, cos.shape[-1])
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, q_size + kv_size:].reshape(-1, kv_heads, dim)
            if before_attention is not None:
                before_attention(index)
            keys, values = kv[index, 0], kv[index, 1]
            for b, (slot, start, n) in enumerate(rows):
                keys[slot, :, start:start + n] = k[b * seq:b * seq + n].transpose(1, 0, 2)
                values[slot, :, start:start + n] = v[b * seq:b * seq + n].transpose(1, 0, 2)
            final = index == n_layers - 1
            if final and not logits:  # only the cache is wanted from this chunk
                return None
            window = cfg.layer_window(index)
            if final and last_only:  # from here on, each row's last token
                h, q = h[last], q[last]
                spans = [(b, b + min(n, 1), start + n - 1) for b, (_, start, n) in enumerate(rows)]
            else:  # each row's tokens: queries [lo, hi) of q at positions first, first + 1, ...
                spans = [(b * seq, b * seq + n, start) for b, (_, start, n) in enumerate(rows)]
            attn = np.zeros((len(h), q_size), dtype=h.dtype)  # padded tokens: 0, as the references
            for (slot, _, _), (lo, hi, first) in zip(rows, spans):
                if hi > lo:
                    attn[lo:hi] = _attend(q[lo:hi], keys[slot], values[slot], first, scale, window)
            h += _linear(attn, lw.o_proj, lw.o_bias, dequantize)
            gate_up = _linear(_rms_norm(h, _array(lw.post_norm), eps), lw.gate_up, None, dequantize)
            gate = gate_up[:, :inner]
            act = np.exp(-gate)
            act += 1
            np.divide(gate, act, out=act)  # SiLU(gate)
            act *= gate_up[:, inner:]
            h += _linear(act, lw.down, None, dequantize)
    if not every_token and not last_only:
        h = h[last]
    out = torch.from_numpy(_linear(_rms_norm(h, _array(weights.final_norm), eps), weights.lm_head, None, dequantize))
    return out.reshape(batch, seq, -1) if every_token else out
