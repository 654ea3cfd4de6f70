"""The engine's A/B switches, read once: every choice below has a default that measured best on the
H100, and an environment variable that overrides it for A/B runs. `Switches.from_environment()` reads
and checks them all when a runner is built (`runner.switches`); the runner hands them to what it runs
(forward_logits' fusion choices; the kernels' RunSettings around each step), so nothing in a forward,
a kernel launcher or the decode loop reads os.environ. The README's table lists them.
"""

from __future__ import annotations

import dataclasses
import os

from ..errors import ConfigurationError

PDL_MODES = {"1": "on", "0": "off", "early": "early", "late": "late"}


@dataclasses.dataclass(frozen=True)
class Switches:
    # EDGELLM_FUSED_GEMV=0: decode-sized steps run the chain of separate ops instead of the fused GEMVs.
    fused_gemv: bool = True
    # EDGELLM_FUSED_ROPE=0 | 1: RoPE + the KV append never / wherever it can run in the qkv GEMV's
    # epilogue; None: where it measured faster (engine/model.py ROPE_EPILOGUE_MIN_BYTES).
    fused_rope: bool | None = None
    # EDGELLM_FUSED_NORM_ROWS: rows up to which each GEMV computes its RMSNorm's statistics itself (a pass
    # over x a program: cheap for one row; at 16 rows it read x twice per program and lost, Llama-3.2-1B
    # shape batch 16); above it the o and down GEMVs leave the sums of squares for the next GEMV.
    fused_norm_rows: int = 1
    # EDGELLM_GEMV_PREFETCH=<bytes per row>: what each decode GEMV prefetches of its weight rows before
    # it waits (0: none); None: 4 KB of matrices up to 4 MB (kernels/gemv.py).
    gemv_prefetch: int | None = None
    # EDGELLM_PDL=0 | early | late: programmatic dependent launch off / every kernel releasing the next
    # right after its wait / only after its loads; "on": early in one-row decode steps, late elsewhere.
    pdl: str = "on"
    # EDGELLM_INT4_CODES=f16 | ptx | words | words-ptx: the int4 GEMV's tensor-core path (float16
    # activations) makes its codes halves from their bits (1024 + q) instead of float32 codes converted,
    # with Triton's ops or four bytes at a time in PTX (kernels/gemv_weights.py `_int4_halves`; the same
    # bits out), or reads its bytes as 16-bit words in four dots (words, up to 16 rows a program; other sums): A/Bs.
    int4_codes: str = "f32"
    # EDGELLM_BYTE_CODES=ptx: the int8 and fp8 GEMVs' tensor-core path (float16) makes its codes halves with
    # PTX, two bytes an instruction (kernels/gemv_weights.py `_int8_halves`, `_fp8_halves`): an A/B, the
    # same bits out.
    byte_codes: str = "bits"
    # EDGELLM_PACKED_OPERANDS=weights: the GEMV's tensor-core dots over packed weights (int8, int4, fp8) take
    # the unpacked weights as their first operand and the rows of x as the second (W x^T;
    # kernels/gemv_weights.py `_int4_dots` says why): an A/B.
    packed_operands: str = "rows"
    # EDGELLM_INT4_TILE / EDGELLM_BYTE_TILE=<BLOCK_N>,<BLOCK_K>,<warps>,<stages>: the tile of the int4 / the
    # int8 and fp8 GEMVs' tensor-core path; EDGELLM_GEMV_SPLIT=auto: those GEMVs split K where their tiles
    # alone leave SMs idle (kernels/split_k.py); EDGELLM_PACKED_ROW_DOTS=1: one row of packed weights on the
    # tensor cores instead of the CUDA cores. A/Bs of bench/packed_gemv.py's candidates in whole decode steps.
    int4_tile: tuple | None = None
    byte_tile: tuple | None = None
    gemv_split: str = "off"
    packed_row_dots: bool = False
    # EDGELLM_PACKED_PREFILL=gemm: prefill multiplies by int4 weights as they are packed (kernels/matmul.py,
    # unpacked tile by tile) instead of writing a dequantized float16 copy for cuBLAS: an A/B of TTFT.
    packed_prefill: str = "dequantize"
    # EDGELLM_RUN_AHEAD=0: the runtime reads each decode step's tokens before queueing the next.
    run_ahead: bool = True
    # EDGELLM_HAND_OVER=0: the engine loop goes on at once after putting first tokens in streams, instead
    # of waiting (at most 0.5 ms) for the server's event loop to begin sending them (serving/request_handle.py).
    hand_over: bool = True
    # EDGELLM_MIXED_STEPS=0: the engine loop prefills admitted prompts in steps of their own between the
    # running rows' decode steps, instead of in the decode step's forward (engine/mixed_steps.py).
    mixed_steps: bool = True
    # EDGELLM_BATCH_INVARIANT=1 (the runtime's deterministic=True): each row's logits come out bitwise the same
    # whatever the batch around it (its size, the row's place, its neighbours) and wherever its prompt's
    # chunks or a reused prefix begin: every decode row through the GEMV's tensor-core tile, prefill through
    # kernels/matmul.py's fixed tiles instead of cuBLAS, attention split by the cache's size instead of the
    # batch's, no mixed steps (README, "Deterministic decoding", says what it costs).
    batch_invariant: bool = False
    # EDGELLM_FORBID_REF_ON_CUDA=1: a reference op on a CUDA tensor inside a step raises.
    forbid_reference_on_cuda: bool = False
    # EDGELLM_CPU_BLAS=0: on the CPU the forward runs the torch references instead of numpy's
    # (engine/cpu_forward.py, about twice as fast on the default model).
    cpu_blas: bool = True

    @classmethod
    def from_environment(cls, environ=None) -> "Switches":
        """The switches the environment sets (ConfigurationError for a value it cannot take)."""
        env = os.environ if environ is None else environ

        def flag(name: str, default: bool | None) -> bool | None:
            value = env.get(name)
            if value is None:
                return default
            if value not in ("0", "1"):
                raise ConfigurationError(f"{name} must be 0 or 1, got {value!r}")
            return value == "1"

        def count(name: str, default):
            value = env.get(name)
            if value is None:
                return default
            if not value.isdigit():
                raise ConfigurationError(f"{name} must be a non-negative integer, got {value!r}")
            return int(value)

        def choice(name: str, values: tuple[str, ...]) -> str:
            value = env.get(name, values[0])
            if value not in values:
                raise ConfigurationError(f"{name} must be {' or '.join(values)}, got {value!r}")
            return value

        int4_codes = choice("EDGELLM_INT4_CODES", ("f32", "f16", "ptx", "words", "words-ptx"))
        def tile(name: str):
            value = env.get(name)
            if value is None:
                return None
            parts = value.split(",")
            if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts) or \
                    any(int(p) & (int(p) - 1) for p in parts[:3]):
                raise ConfigurationError(f"{name} must be BLOCK_N,BLOCK_K,warps,stages (the first three powers "
                                         f"of two), got {value!r}")
            return tuple(int(p) for p in parts)

        pdl = env.get("EDGELLM_PDL", "1")
        if pdl not in PDL_MODES:
            raise ConfigurationError(f"EDGELLM_PDL must be one of {', '.join(PDL_MODES)}, got {pdl!r}")
        return cls(fused_gemv=flag("EDGELLM_FUSED_GEMV", True), fused_rope=flag("EDGELLM_FUSED_ROPE", None),
                   fused_norm_rows=count("EDGELLM_FUSED_NORM_ROWS", cls.fused_norm_rows),
                   gemv_prefetch=count("EDGELLM_GEMV_PREFETCH", None), pdl=PDL_MODES[pdl], int4_codes=int4_codes,
                   packed_operands=choice("EDGELLM_PACKED_OPERANDS", ("rows", "weights")),
                   byte_codes=choice("EDGELLM_BYTE_CODES", ("bits", "ptx")),
                   int4_tile=tile("EDGELLM_INT4_TILE"), byte_tile=tile("EDGELLM_BYTE_TILE"),
                   gemv_split=choice("EDGELLM_GEMV_SPLIT", ("off", "auto")),
                   packed_row_dots=flag("EDGELLM_PACKED_ROW_DOTS", False),
                   packed_prefill=choice("EDGELLM_PACKED_PREFILL", ("dequantize", "gemm")),
                   run_ahead=flag("EDGELLM_RUN_AHEAD", True), hand_over=flag("EDGELLM_HAND_OVER", True),
                   mixed_steps=flag("EDGELLM_MIXED_STEPS", True),
                   batch_invariant=flag("EDGELLM_BATCH_INVARIANT", False),
                   forbid_reference_on_cuda=flag("EDGELLM_FORBID_REF_ON_CUDA", False),
                   cpu_blas=flag("EDGELLM_CPU_BLAS", True))

    def run_settings(self) -> dict:
        """The kernels' RunSettings (kernels/dispatch.py) these switches change from the defaults: what
        a step runs under (an empty dict where none is changed; a debug block's own settings stay)."""
        names = ("pdl", "gemv_prefetch", "forbid_reference_on_cuda", "batch_invariant", "int4_codes",
                 "byte_codes", "packed_operands", "int4_tile", "byte_tile", "gemv_split", "packed_row_dots",
                 "packed_prefill")
        return {name: getattr(self, name) for name in names if getattr(self, name) != getattr(Switches, name)}


def progress_quiet() -> bool:
    """EDGELLM_QUIET=1: no progress bars, even on a terminal (read when a bar starts, not per step)."""
    return os.environ.get("EDGELLM_QUIET", "0") == "1"


def set_progress_quiet() -> None:
    """The CLI's -q: EDGELLM_QUIET=1 for this process (and the processes it starts)."""
    os.environ["EDGELLM_QUIET"] = "1"
