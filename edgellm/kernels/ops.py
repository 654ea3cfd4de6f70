"""The dispatched hot-path ops the engine calls: `ops.rms_norm(...)`, `ops.sample(...)`, ...

Each is a KernelOp pairing a file's Triton launcher with its `_ref` twin (see dispatch.py for which
runs when). Without triton installed every op runs its reference.
"""

from . import attention, gemv as _gemv, kv_append as _kv_append, lora, rope, rope_append, sampling
from . import rms_norm as _rms_norm, glu as _glu, vocab_remap as _vocab_remap
from . import kv_compact as _kv_compact, tree_accept, tree_attention as _tree_attention, tree_step
from . import activation as _activation, layer_norm as _layer_norm, segment_attention as _segment_attention
from . import dequantize as _dequantize, kv_blocks, logit_processing as _logit_processing, matmul as _matmul
from ._triton import HAS_TRITON
from .dispatch import KernelOp


def _op(name: str, module, decider: int = 0) -> KernelOp:
    return KernelOp(name, getattr(module, name + "_ref"), getattr(module, name) if HAS_TRITON else None, decider)


rms_norm = _op("rms_norm", _rms_norm)
add_rms_norm = _op("add_rms_norm", _rms_norm)
rope_cos_sin_cache = _op("rope_cos_sin_cache", rope)
apply_rope = _op("apply_rope", rope)
kv_append = _op("kv_append", _kv_append)
prefill_attention = _op("prefill_attention", attention)
decode_attention = _op("decode_attention", attention)
glu = _op("glu", _glu)
sample = _op("sample", sampling)
process_logits = _op("process_logits", _logit_processing)
count_tokens = _op("count_tokens", _logit_processing)
vocab_remap = _op("vocab_remap", _vocab_remap)
gemv = _op("gemv", _gemv)
matmul = _op("matmul", _matmul)
rope_kv_append = _op("rope_kv_append", rope_append)
lora_shrink = _op("lora_shrink", lora)
lora_expand = _op("lora_expand", lora)
accept_tree = _op("accept_tree", tree_accept)
kv_compact = _op("kv_compact", _kv_compact)
tree_attention = _op("tree_attention", _tree_attention)
tree_inputs = _op("tree_inputs", tree_step)
tree_commit = _op("tree_commit", tree_step)
layer_norm = _op("layer_norm", _layer_norm)
add_layer_norm = _op("add_layer_norm", _layer_norm)
activation = _op("activation", _activation)
segment_attention = _op("segment_attention", _segment_attention)
dequantize = _op("dequantize", _dequantize)
blocks_to_slot = _op("blocks_to_slot", kv_blocks, decider=1)  # the cache: the pool may be pinned host memory
blocks_from_slot = _op("blocks_from_slot", kv_blocks, decider=1)

ALL_OPS = (rms_norm, add_rms_norm, rope_cos_sin_cache, apply_rope, kv_append, prefill_attention,
           decode_attention, glu, sample, process_logits, count_tokens, vocab_remap, gemv, matmul, rope_kv_append, lora_shrink, lora_expand,
           accept_tree, kv_compact, tree_attention, tree_inputs, tree_commit, layer_norm, add_layer_norm, activation,
           segment_attention, dequantize, blocks_to_slot, blocks_from_slot)


def reference_ops():
    """A namespace with the same op names bound straight to the torch references (no dispatch):
    what `forward_logits(..., kernels=reference_ops())` runs, e.g. under torch.compile."""
    import types

    return types.SimpleNamespace(**{op.name: op.reference for op in ALL_OPS})
