"""Hot-path ops. Each file holds one op: Triton kernel(s), a launcher, and a `_ref` torch twin.

Call ops through the names exported here: they dispatch per DESIGN.md (see dispatch.py). An op
created with `triton=None` has no Triton kernel yet and runs its reference everywhere.
"""

from .attention import decode_attention_ref, prefill_attention_ref
from .dispatch import KernelOp, interpreter_on, use_reference
from .kv_append import kv_append_ref
from .rms_norm import add_rms_norm_ref, rms_norm_ref
from .rope import apply_rope_ref, rope_cos_sin_cache_ref, rope_inv_freq
from .sampling import filtered_probs_ref, sample_ref, uniform_from_counter
from .silu_mul import silu_mul_ref
from .vocab_remap import vocab_remap_ref

rms_norm = KernelOp("rms_norm", rms_norm_ref)
add_rms_norm = KernelOp("add_rms_norm", add_rms_norm_ref)
rope_cos_sin_cache = KernelOp("rope_cos_sin_cache", rope_cos_sin_cache_ref)
apply_rope = KernelOp("apply_rope", apply_rope_ref)
kv_append = KernelOp("kv_append", kv_append_ref)
prefill_attention = KernelOp("prefill_attention", prefill_attention_ref)
decode_attention = KernelOp("decode_attention", decode_attention_ref)
silu_mul = KernelOp("silu_mul", silu_mul_ref)
sample = KernelOp("sample", sample_ref)
vocab_remap = KernelOp("vocab_remap", vocab_remap_ref)

ALL_OPS = (rms_norm, add_rms_norm, rope_cos_sin_cache, apply_rope, kv_append, prefill_attention,
           decode_attention, silu_mul, sample, vocab_remap)

__all__ = [op.name for op in ALL_OPS] + [
    "ALL_OPS", "KernelOp", "interpreter_on", "use_reference", "rope_inv_freq",
    "filtered_probs_ref", "uniform_from_counter",
]
