"""The decoder as a plain torch module with its KV cache as explicit inputs and outputs: what
`edgellm export` traces into ONNX (export/onnx_graph.py).

The engine's forward (engine/model.py) writes the cache in place through Triton kernels; an exported
graph cannot own state, so here each layer's cache comes in as an input and leaves as an output, the
"present" cache, which is the input with this step's keys and values scattered in (ONNX ScatterND).
A backend binds the output to the same memory as the input (engine/backends/), so the graph updates
the runner's cache where it lies, as the Triton path does.

Inputs (the names the graph and edgellm_engine.json use; `b` rows, `s` tokens per row, right-padded):
  inputs_embeds        [b, s, hidden]   the rows' new tokens' embeddings (the embedding lookup stays
                                        outside the graph, as in Edge-LLM's engines)
  past_lengths         [b] int32        tokens each row's cache slot already holds
  context_lengths      [b] int32        its length after this step (past + the row's real tokens)
  slots                [b] int32        each row's cache slot (distinct)
  kv_positions         [keys] int32     0 .. keys-1, keys = the longest context_length: attention reads
                                        that many cache positions (its length is what the graph uses;
                                        no shape in the graph depends on a tensor's values)
  past_key_values.{l}  [2, max_batch, kv_heads, capacity, head_dim]   layer l's keys and values, the
                                        runner's LinearKVCache.data[l] (a contiguous view)
Outputs:
  logits               [b, vocab] float32   each row's last real token's logits
  present_key_values.{l}                 the updated cache (same shape as past_key_values.{l})

One graph serves prefill (s = prompt tokens) and decode (s = 1). Supported: the llama layout and the
members of its family file (llama, mistral, qwen2, qwen3: q/k/v bias, q/k norm, sliding windows,
Llama-3 / linear RoPE scaling). LoRA adapters are not exported (the base model only).
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.config import EngineConfig
from ..engine.weights import LayerWeights, ModelWeights
from ..kernels.rms_norm import rms_norm_ref
from ..kernels.rope import rotate_pairs


class _Layer(nn.Module):
    def __init__(self, lw: LayerWeights):
        super().__init__()
        for name in ("input_norm", "qkv", "qkv_bias", "o_proj", "o_bias", "q_norm", "k_norm", "post_norm",
                     "gate_up", "down"):
            value = getattr(lw, name)
            self.register_buffer(name, None if value is None else value.detach().clone())


class ExportDecoder(nn.Module):
    def __init__(self, weights: ModelWeights, cfg: EngineConfig, inv_freq: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(_Layer(lw) for lw in weights.layers)
        self.register_buffer("final_norm", weights.final_norm.detach().clone())
        self.register_buffer("lm_head", weights.lm_head.detach().clone())
        self.register_buffer("inv_freq", inv_freq.float().clone())  # RoPE's angles are computed in the graph

    def forward(self, inputs_embeds, past_lengths, context_lengths, slots, kv_positions, *past_key_values):
        cfg = self.cfg
        rows, seq, _ = inputs_embeds.shape
        heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
        past, real = past_lengths.long(), (context_lengths - past_lengths).long()
        # A padded token becomes a copy of its row's last real token (its embedding, its position):
        # it computes and writes exactly what that token does, so ScatterND's duplicate indices
        # always carry equal values and no padded token writes past its row's context.
        token = torch.minimum(torch.arange(seq, device=past.device)[None, :], (real - 1)[:, None])
        inputs_embeds = torch.gather(inputs_embeds, 1, token[:, :, None].expand(rows, seq, inputs_embeds.shape[2]))
        positions = past[:, None] + token                                           # [rows, seq]
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        cos = angles.cos().to(inputs_embeds.dtype)[:, :, None]
        sin = angles.sin().to(inputs_embeds.dtype)[:, :, None]
        keys = kv_positions.long()
        behind = positions[:, :, None] - keys[None, None, :]                        # [rows, seq, keys]
        masks = {}
        for window in sorted(set(cfg.layer_window(i) for i in range(cfg.num_decoder_layers))):
            allowed = (behind >= 0) & (behind < window) if window else behind >= 0
            masks[window] = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, float("-inf"))
        # ScatterND indices of this step's keys/values: (k or v, slot, kv head, position)
        where = (torch.arange(2)[:, None, None, None], slots.long()[None, :, None, None],
                 torch.arange(kv_heads)[None, None, :, None], positions[None, :, None, :])
        hidden, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            x = rms_norm_ref(hidden, layer.input_norm, cfg.rms_norm_eps)
            qkv = x @ layer.qkv.t()
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            q, k, v = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
            q, k, v = q.reshape(rows, seq, heads, dim), k.reshape(rows, seq, kv_heads, dim), \
                v.reshape(rows, seq, kv_heads, dim)
            if layer.q_norm is not None:
                q, k = rms_norm_ref(q, layer.q_norm, cfg.rms_norm_eps), rms_norm_ref(k, layer.k_norm, cfg.rms_norm_eps)
            q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
            new = torch.stack((k, v)).permute(0, 1, 3, 2, 4)                         # [2, rows, kv_heads, seq, dim]
            cache = past_key_values[i].index_put(where, new)
            presents.append(cache)
            k_rows = cache[0][slots.long()][:, :, :keys.shape[0]].float()           # [rows, kv_heads, keys, dim]
            v_rows = cache[1][slots.long()][:, :, :keys.shape[0]].float()
            qg = q.float().reshape(rows, seq, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4)
            scores = (qg @ k_rows[:, :, None].transpose(-1, -2)) * cfg.attention_scale
            probs = (scores + masks[cfg.layer_window(i)][:, None, None]).softmax(-1)
            out = (probs @ v_rows[:, :, None]).to(hidden.dtype)                     # [rows, kv_heads, group, seq, dim]
            out = out.permute(0, 3, 1, 2, 4).reshape(rows, seq, heads * dim) @ layer.o_proj.t()
            hidden = hidden + (out + layer.o_bias if layer.o_bias is not None else out)
            gate, up = (rms_norm_ref(hidden, layer.post_norm, cfg.rms_norm_eps) @ layer.gate_up.t()).chunk(2, dim=-1)
            hidden = hidden + (nn.functional.silu(gate) * up) @ layer.down.t()
        last = hidden[torch.arange(rows), real - 1]
        logits = (rms_norm_ref(last, self.final_norm, cfg.rms_norm_eps) @ self.lm_head.t()).float()
        return (logits, *presents)
