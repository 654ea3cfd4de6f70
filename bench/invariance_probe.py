"""Where batch invariance breaks, op by op: a random-weight shape with Switches.batch_invariant, one prompt
prefilled and decoded one step alone, then as row 0 of batches of 2 and 3 (other random prompts beside
it), eagerly (no graphs) with every dispatched op of the decode step recorded; prints whether the prefill
and the step's logits match bitwise and the first op whose output for that row differs (its index, name,
shapes and the largest difference), then the same with graphs (logits only). The tool that found the
GEMV's norm statistics summed in a stride-dependent order (bench/RESULTS.md, 2026-12-08).

Run on a CUDA GPU:  python bench/invariance_probe.py [smollm2-135m llama-3.2-1b ...]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

import torch  # noqa: E402

from edgellm.benchmark import random_model_dir  # noqa: E402
from edgellm.engine.runner import LLMEngineRunner  # noqa: E402
from edgellm.engine.switches import Switches  # noqa: E402
from edgellm.kernels import ops  # noqa: E402

RECORDED = ("rms_norm", "add_rms_norm", "gemv", "matmul", "decode_attention", "prefill_attention",
            "rope_kv_append", "glu")
_record: list | None = None


def _recording(name: str):
    op = getattr(ops, name)

    def call(*args, **kwargs):
        out = op(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        if _record is not None and isinstance(first, torch.Tensor):
            _record.append((name, first.detach().clone()))
        return out
    return call


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(49152) for _ in range(rng.randint(5, 300))] for _ in range(n)]


def one_step(runner, batch):
    """(prefill logits, the decode step's logits, the step's recorded ops)."""
    global _record
    n = len(batch)
    slots = list(range(n))
    logits = runner.prefill_tokens(batch, slots=slots).clone()
    runner.start_decode(logits.argmax(-1), slots, [0.0] * n, [0] * n, [1.0] * n, list(range(n)), [0] * n)
    _record = []
    runner.decode_sample_step()
    step = runner.decode_logits().clone()
    recorded, _record = _record, None
    runner.end_decode()
    return logits, step, recorded


def first_difference(alone, batched):
    for i, ((name, a), (other, b)) in enumerate(zip(alone, batched)):
        if name != other:
            return f"op {i}: the ops differ ({name} alone, {other} batched)"
        a0, b0 = a.reshape(a.shape[0], -1)[0], b.reshape(b.shape[0], -1)[0]
        if a0.shape != b0.shape:
            return f"op {i} {name}: shapes {tuple(a.shape)} alone, {tuple(b.shape)} batched"
        if not torch.equal(a0, b0):
            return f"op {i} {name} {tuple(b.shape)}: max |diff| {(a0.float() - b0.float()).abs().max().item():.3g}"
    return "none of the recorded ops" if len(alone) == len(batched) else f"{len(alone)} ops alone, {len(batched)} batched"


def main() -> None:
    for name in RECORDED:
        setattr(ops, name, _recording(name))
    for shape in sys.argv[1:] or ["smollm2-135m", "llama-3.2-1b"]:
        model_dir = random_model_dir(shape, "/tmp/edgellm-bench-models")
        for graphs in (False, True):
            runner = LLMEngineRunner(model_dir, device="cuda", dtype="float16", max_batch_size=16, max_input_length=320,
                                     max_kv_cache_capacity=512, switches=Switches(batch_invariant=True),
                                     cuda_graphs=graphs)
            target = prompts(1, 1)[0]
            prefill, step, alone = one_step(runner, [target])
            for size in (2, 3):
                batch = prompts(size, size)
                batch[0] = target
                prefill_b, step_b, batched = one_step(runner, batch)
                line = f"{shape} graphs={graphs} batch of {size}: prefill equal {torch.equal(prefill[0], prefill_b[0])}, " \
                       f"step equal {torch.equal(step[0], step_b[0])}"
                print(line + ("" if graphs else f"; first difference: {first_difference(alone, batched)}"))


if __name__ == "__main__":
    main()
