"""Offline, no GPU: the GEMV (kernels/gemv.py) compiled for Hopper (sm_90) by this machine's Triton, and
the SASS instructions of each variant counted, in all and by kind: what each way of unpacking packed
weights costs per weight before any device time is spent on it. The launch is the real launcher's
(gemv.gemv on CPU tensors, its kernel call caught instead of run), with the launcher's specialisations
(16-byte-aligned pointers, sizes divisible by 16 marked so, ints equal to 1 as constants).

Run:  python bench/sass_gemv.py [--rows 1 16] [--n 2048 --k 2048]
      python bench/sass_gemv.py --check    (every switch's variant compiles, its loop as written: CI runs it)
The GPU machine's Triton may compile differently; the counts are for comparing variants here.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm.kernels import gemv  # noqa: E402
from edgellm.kernels.dispatch import run_with  # noqa: E402
from edgellm.quant import quantize  # noqa: E402

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8", torch.int32: "i32",
         torch.int64: "i64", torch.int8: "i8"}


class _Caught:
    """Stands in for a kernel: [grid](*args, **kwargs) keeps the call."""

    def __init__(self):
        self.call = None

    def __getitem__(self, grid):
        def keep(*args, **kwargs):
            self.call = (args, kwargs)
        return keep


def _caught(module, name: str, launch, settings: dict):
    """(args, kwargs) of the kernel module.<name> that launch() calls under `settings`, caught, not run."""
    caught, real = _Caught(), getattr(module, name)
    setattr(module, name, caught)
    try:
        with run_with(**settings):
            launch()
    finally:
        setattr(module, name, real)
    return caught.call


def compile_call(args, kwargs, fn=None):
    """The caught call of `fn` (default: the GEMV's kernel) compiled for sm_90: the compiled kernel (asm:
    ttgir, ptx, cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = fn or gemv._gemv_kernel
    names = fn.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in kwargs or fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = kwargs[name] if name in kwargs else args[i]
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32" if abs(value) < 2 ** 31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    source = ASTSource(fn, signature, constexprs, attrs)
    options = {"num_warps": kwargs.get("num_warps", 4)}
    if "num_stages" in kwargs:
        options["num_stages"] = kwargs["num_stages"]
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def sass(compiled) -> str:
    from triton.tools.disasm import get_sass

    return get_sass(compiled.asm["cubin"])


def counts(text: str) -> collections.Counter:
    """Opcodes of the SASS (without predicates and modifiers)."""
    ops = collections.Counter()
    for line in text.splitlines():
        found = re.match(r"^[-0-9:A-Z]+\t(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if found:
            ops[found.group(2)] += 1
    return ops


def loop_body(text: str) -> str:
    """The longest loop of the SASS: from a label to the last branch back to it (the K loop)."""
    lines = text.splitlines()
    labels = {re.match(r"^(\w+):", line).group(1): i for i, line in enumerate(lines) if re.match(r"^\w+:$", line)}
    best = (0, 0)
    for i, line in enumerate(lines):
        found = re.search(r"BRA (\w+);", line)
        if found and labels.get(found.group(1), i) < i and i - labels[found.group(1)] > best[1] - best[0]:
            best = (labels[found.group(1)], i + 1)
    return "\n".join(lines[best[0]:best[1]])


def variant(x, weight, tile, row_fma, fused=None, **settings):
    """gemv(x, weight, tile=, row_fma=, **fused) under `settings` compiled: (the kernel, weights a thread
    unpacks per trip around the K loop)."""
    args, kwargs = _caught(gemv, "_gemv_kernel", lambda: gemv.gemv(x, weight, tile=tile, row_fma=row_fma,
                                                                  **(fused or {})), settings)
    # (weights a thread unpacks per trip around the K loop)
    per_thread = kwargs["BLOCK_N"] * kwargs["BLOCK_K"] // (32 * kwargs["num_warps"])
    return compile_call(args, {k: v for k, v in kwargs.items() if k != "launch_pdl"}), per_thread


KINDS = ("CVT", "F2F", "I2F", "F2I", "HADD2", "HFMA2", "HMUL2", "FADD", "FFMA", "FMUL", "LOP3", "PRMT", "SHF", "IMAD",
         "LDG", "LDS", "STS", "LDSM", "HMMA", "HGMMA", "BAR", "SHFL")


def matmul_variant(x, weight, **settings):
    """kernels/matmul.py's call of matmul(x, weight) under `settings`, compiled for sm_90."""
    from edgellm.kernels import matmul

    args, kwargs = _caught(matmul, "_matmul_kernel", lambda: matmul.matmul(x, weight), settings)
    return compile_call(args, kwargs, matmul._matmul_kernel)


def check() -> int:
    """Every variant the GEMV's switches select, with the epilogues split-K must keep, compiled for sm_90,
    and the instructions each was written to issue (or not) in its K loop: what the interpreter cannot
    see (it runs no PTX and checks no return types). 0 when all hold, else 1, each miss said."""
    from edgellm.kernels import lora, rope

    torch.manual_seed(0)
    k, n, m = 512, 256, 16
    w = torch.randn(2 * n, k, dtype=torch.float16) * 0.02
    weights = {kind: quantize(w, kind) for kind in ("int8", "int4", "fp8")}
    weights["fp16"] = w
    x, x1 = torch.randn(m, k, dtype=torch.float16), torch.randn(1, k, dtype=torch.float16)
    norm = (torch.ones(k, dtype=torch.float16), 1e-5)
    residual = torch.randn(m, 2 * n, dtype=torch.float16)
    sums = torch.zeros(64, m, dtype=torch.float32)
    slots = [3, -1, 0, 1] * (m // 4)
    used = lora.used_slots(slots, 4, "cpu")
    index = torch.tensor(slots, dtype=torch.int32)
    spec = (torch.zeros(1, m, 48, dtype=torch.float16), torch.randn(4, 2 * n, 16, dtype=torch.float16), index, used,
            torch.ones(4), (2 * n - 32, 16, 16))
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(64, 10000.0), 32)
    caches = [torch.zeros(m + 1, 2, 32, 64, dtype=torch.float16) for _ in range(2)]
    ints = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    rope_spec = gemv.RopeAppend(cos, sin, *caches, ints(*range(m)), ints(*[3] * m), ints(*[1] * m), 4)
    split = (64, 128, 4, 3, 2)
    cases = [  # (name, x, weight, tile, row_fma, fused, settings, wanted opcodes, unwanted opcodes)
        ("fp16 split + rope", x[:, None], weights["fp16"], (16, 128, 4, 3, 2), False, dict(rope_append=rope_spec), {},
         (), ()),
        ("fp16 split + lora", x, weights["fp16"], (16, 128, 4, 3, 2), False, dict(lora=spec), {}, (), ()),
    ]
    for operands in ("rows", "weights"):
        mma = ("HGMMA",) if operands == "weights" else ("HMMA",)
        for codes in ("f32", "f16", "ptx", "words", "words-ptx"):
            settings = dict(packed_operands=operands, int4_codes=codes)
            free = ("I2F", "F2F") if codes != "f32" else ()
            cases += [(f"int4 {operands}/{codes}", x, weights["int4"], (64, 128, 4, 3), False, {}, settings, mma, free),
                      (f"int4 {operands}/{codes} split + norm, glu", x, weights["int4"], split, False,
                       dict(norm=norm, glu="silu"), settings, mma, free)]
        for kind in ("int8", "fp8"):
            for codes in ("bits", "ptx"):
                settings = dict(packed_operands=operands, byte_codes=codes)
                wanted = mma + (("F2FP",) if kind == "fp8" and codes == "ptx" else ())
                cases.append((f"{kind} {operands}/{codes} split + residual, sums", x, weights[kind], (64, 256, 4, 3, 2),
                              False, dict(residual=residual, sumsq_out=sums), settings, wanted, ("I2F",)))
    for kind in ("int4", "int8", "fp8", "fp16"):
        for codes in ("f32", "ptx"):
            settings = dict(int4_codes=codes, byte_codes="ptx" if codes == "ptx" else "bits")
            cases.append((f"{kind} one row, CUDA cores, {codes}", x1, weights[kind], None, True, dict(norm=norm), settings,
                          (), ()))
    for codes in ("f32", "f16", "ptx"):  # (prefill over packed int4: kernels/matmul.py)
        cases.append((f"int4 prefill matmul, {codes}", torch.randn(256, k, dtype=torch.float16), weights["int4"], None,
                      "matmul", {}, dict(int4_codes=codes), ("HGMMA",), ("I2F", "F2F") if codes != "f32" else ()))
    failures = 0
    for name, xx, weight, tile, row_fma, fused, settings, wanted, unwanted in cases:
        try:
            compiled = matmul_variant(xx, weight, **settings) if row_fma == "matmul" else \
                variant(xx, weight, tile, row_fma, fused, **settings)[0]
            ops = counts(loop_body(sass(compiled)))
        except Exception as error:  # noqa: BLE001 - reported, counted
            failures += 1
            print(f"FAIL {name}: does not compile: {type(error).__name__}: {str(error).strip().splitlines()[-1][:200]}")
            continue
        missing = [op for op in wanted if not ops[op]]
        present = [op for op in unwanted if ops[op]]
        if missing or present:
            failures += 1
            print(f"FAIL {name}: its K loop lacks {missing} / issues {present}")
        else:
            print(f"ok   {name}")
    print(f"{len(cases) - failures} of {len(cases)} variants compile for sm_90 as written")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--check", action="store_true", help="compile every switch's variant, check its loop, exit 1 on a miss")
    args = parser.parse_args()
    if args.check:
        return check()
    w = torch.randn(args.n, args.k, dtype=torch.float16) * 0.02
    weights = {"fp16": w, "int8": quantize(w, "int8"), "int4": quantize(w, "int4")}
    cases = []
    for m in args.rows:
        x = torch.randn(m, args.k, dtype=torch.float16)
        if m == 1:
            cases += [(f"m1 {kind} fma", x, weights[kind], None, True, {}) for kind in weights]
        for kind in weights:
            cases.append((f"m{m} {kind} dot", x, weights[kind], None, False, {}))
        for operands in ("rows", "weights"):
            for codes in ("f32", "f16", "ptx", "words", "words-ptx"):
                cases.append((f"m{m} int4 {operands}/{codes} (64,128,4,3)", x, weights["int4"], (64, 128, 4, 3), False,
                              dict(packed_operands=operands, int4_codes=codes)))
            for codes in ("bits", "ptx"):
                cases.append((f"m{m} int8 {operands}/{codes} (64,128,4,3)", x, weights["int8"], (64, 128, 4, 3), False,
                              dict(packed_operands=operands, byte_codes=codes)))
    print(f"{'variant':40s} {'kernel':>6s} {'loop':>5s} {'/ weight':>8s}  loop by kind: " + " ".join(f"{k:>5s}" for k in KINDS))
    for name, x, weight, tile, row_fma, settings in cases:
        try:
            compiled, per_thread = variant(x, weight, tile, row_fma, **settings)
            text = sass(compiled)
        except Exception as error:  # noqa: BLE001 - a variant that does not compile is reported as such
            print(f"{name:40s} failed: {type(error).__name__}: {str(error).splitlines()[0][:150]}")
            continue
        ops = counts(loop_body(text))
        print(f"{name:40s} {sum(counts(text).values()):6d} {sum(ops.values()):5d} {sum(ops.values()) / per_thread:8.2f}  "
              + " " * 14 + " ".join(f"{ops[k]:5d}" for k in KINDS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
