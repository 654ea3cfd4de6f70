"""`edgellm bench --backend ...`: the same greedy generation on several engines, side by side (seed 004's
"PyTorch vs TensorRT" table; here triton vs onnxruntime vs transformers).

Each backend prefills the same random ISL-token prompts (a batch of them), takes the greedy token,
then runs OSL decode steps; the table gives prefill time, decode time per step, tokens/s, and how many
leading tokens of every row equal the triton backend's. triton runs its fast path (decode graphs on
CUDA, sampling on the device); onnxruntime runs the exported graph through
LLMEngineRunner(backend=...) with decode_step and an argmax; transformers runs the HF model with its
own KV cache. onnxruntime runs on the GPU only where onnxruntime-gpu is installed, else on the CPU
(its row says which), from a float32 export on the CPU.
"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import torch

from .benchmark import SHAPES, log, prefill, random_model_dir, timed
from .engine.devices import resolve_device, resolve_dtype
from .errors import EdgeLLMError

BACKEND_CHOICES = ("triton", "onnxruntime", "transformers")


def _triton(model_dir, ids, osl, device, dtype, limits):
    from .engine.runner import LLMEngineRunner

    runner = LLMEngineRunner(model_dir, device=device, dtype=dtype, **limits)
    batch = ids.shape[0]
    greedy = dict(temperature=[0.0] * batch, top_k=[1] * batch, top_p=[1.0] * batch, seeds=[0] * batch,
                  offsets=[0] * batch)

    def generate():
        first = prefill(runner, ids.to(runner.device))
        runner.start_decode(first, list(range(batch)), **greedy)
        return first

    def decode():
        return [runner.decode_sample_step().clone() for _ in range(osl)]

    return generate, decode, runner.end_decode


def _exported(backend, export_dir, ids, osl, device, limits):
    from .engine.runner import LLMEngineRunner

    runner = LLMEngineRunner(export_dir, backend=backend, device=device, **limits)
    state = {}

    def generate():
        state["token"] = runner.prefill_tokens(ids.tolist()).argmax(-1)
        return state["token"]

    def decode():
        out = []
        for _ in range(osl):
            state["token"] = runner.decode_step(runner.embed(state["token"][:, None])).argmax(-1)
            out.append(state["token"])
        return out

    return generate, decode, lambda: None


def _transformers(model_dir, ids, osl, device, dtype):
    import transformers

    name = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5.0
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **{name: dtype}).to(device).eval()
    state = {}

    def generate():
        with torch.inference_mode():
            out = model(input_ids=ids.to(device), use_cache=True)
        state["past"], state["token"] = out.past_key_values, out.logits[:, -1].argmax(-1)
        return state["token"]

    def decode():
        tokens = []
        with torch.inference_mode():
            for _ in range(osl):
                out = model(input_ids=state["token"][:, None], past_key_values=state["past"], use_cache=True)
                state["past"], state["token"] = out.past_key_values, out.logits[:, -1].argmax(-1)
                tokens.append(state["token"])
        return tokens

    return generate, decode, lambda: None


def export_for_bench(model_dir: Path, cache_dir: Path, dtype: torch.dtype, limits: dict) -> Path:
    """An export of `model_dir` for these limits under cache_dir, made once and reused."""
    import json

    from .engine.backends.export_format import ENGINE_JSON, ONNX_DTYPES
    from .export import export_onnx

    target = Path(cache_dir) / f"export-{Path(model_dir).name}-{ONNX_DTYPES[dtype]}"
    described = target / ENGINE_JSON
    if described.is_file():
        old = json.loads(described.read_text())
        if old.get("source") == str(model_dir) and all(old["limits"][k] >= v for k, v in limits.items()):
            return target
    export_onnx(model_dir, target, dtype=dtype, overwrite=True, progress=log, **limits)
    return target


def compare(model: str, backends, *, batch: int = 1, isl: int = 128, osl: int = 64, iterations: int = 3,
            device=None, dtype=None, cache_dir: str | Path = "/tmp/edgellm-bench") -> dict:
    """The side-by-side figures of `backends` for `model` (a directory or a named shape)."""
    model_dir = random_model_dir(model, cache_dir) if model in SHAPES else Path(model)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    limits = dict(max_batch_size=batch, max_input_length=isl, max_kv_cache_capacity=isl + osl + 1)
    generator = torch.Generator().manual_seed(0)
    from .engine.config import EngineConfig

    vocab = EngineConfig.from_model_dir(model_dir).vocab_size
    ids = torch.randint(10, vocab, (batch, isl), generator=generator)
    rows, reference = [], None
    for backend in backends:
        row = dict(backend=backend, device=str(device), dtype=str(dtype).replace("torch.", ""))
        try:
            if backend == "triton":
                steps = _triton(model_dir, ids, osl, device, dtype, limits)
            elif backend == "transformers":
                if importlib.util.find_spec("transformers") is None:
                    raise RuntimeError("transformers is not installed")
                steps = _transformers(model_dir, ids, osl, device, dtype)
            else:
                run_on, run_dtype = device, dtype
                if not _ort_cuda() and device.type == "cuda":
                    run_on, run_dtype = torch.device("cpu"), torch.float32  # no onnxruntime-gpu here
                export_dir = export_for_bench(model_dir, Path(cache_dir), run_dtype, limits)
                row.update(device=str(run_on), dtype=str(run_dtype).replace("torch.", ""))
                steps = _exported(backend, export_dir, ids, osl, run_on, limits)
        except (ImportError, RuntimeError, EdgeLLMError) as exc:
            row["skipped"] = str(exc)
            rows.append(row)
            log(f"  {backend}: skipped ({exc})")
            continue
        generate, decode, finish = steps
        run_device = torch.device(row["device"])
        prefill_s, decode_s = [], []
        for it in range(iterations + 1):  # the first run warms up (compilation, graph capture)
            seconds, first = timed(generate, run_device)
            step_seconds, rest = timed(decode, run_device)
            finish()
            if it:
                prefill_s.append(seconds)
                decode_s.append(step_seconds / osl)
        tokens = torch.stack([first.cpu()] + [t.cpu() for t in rest], dim=1)  # [batch, 1 + osl]
        reference = tokens if reference is None and backend == "triton" else reference
        ms = statistics.median(decode_s) * 1e3
        row.update(prefill_ms=statistics.median(prefill_s) * 1e3, decode_ms_per_step=ms,
                   tokens_per_s=batch / ms * 1e3, tokens=tokens.tolist())
        if reference is not None:
            same = (tokens == reference).int().cumprod(dim=1).sum(dim=1)  # each row's leading agreement
            row["same_as_triton"] = f"{int(same.min())}/{tokens.shape[1]}"
        log(f"  {backend} ({row['device']}, {row['dtype']}): prefill {row['prefill_ms']:.2f} ms, "
            f"decode {ms:.3f} ms/step")
        rows.append(row)
    return dict(model=model, batch=batch, isl=isl, osl=osl, rows=rows)


def _ort_cuda() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def print_table(result: dict) -> None:
    print(f"backends  {result['model']}  batch {result['batch']}  ISL {result['isl']}  OSL {result['osl']}")
    print(f"{'backend':<13s} {'device':<7s} {'dtype':<8s} {'prefill ms':>10s} {'decode ms':>9s} {'tok/s':>8s} "
          f"{'same tokens as triton':>21s}")
    for r in result["rows"]:
        if "skipped" in r:
            print(f"{r['backend']:<13s} skipped: {r['skipped']}")
            continue
        print(f"{r['backend']:<13s} {r['device']:<7s} {r['dtype']:<8s} {r['prefill_ms']:10.2f} "
              f"{r['decode_ms_per_step']:9.3f} {r['tokens_per_s']:8.1f} {r.get('same_as_triton', '-'):>21s}")
