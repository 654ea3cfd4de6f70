"""Decode and time-to-first-token benchmark of the engine (what `edgellm bench` runs; bench/decode.py
adds the transformers and torch.compile baselines).

Models are a local directory or a named shape of a public model with random weights (speed does not
depend on the values). Decode is timed on the runner's fast path: rows prefilled with an ISL-token
prompt, then OSL steps of `decode_sample_step` (CUDA graphs, sampling inside, no host sync between
steps). The floor of a step is the bytes it must read (every weight once, plus each row's KV cache up
to its length) over the measured device copy bandwidth.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .errors import ConfigurationError

# Hugging Face config.json fields of the named random-weight shapes.
SHAPES = {
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=128001, hidden_act="silu", torch_dtype="float16"),
    # Llama 3.1 8B: 16 GB of fp16 weights, where a decode step is the bytes it reads (the quantization shape).
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=128001, hidden_act="silu", torch_dtype="float16"),
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, hidden_act="silu", torch_dtype="float16"),
    # Gemma 3 1B: 5 sliding-window layers (512) to each global one, 4 query heads of 256 over one KV head.
    "gemma3-1b": dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
        max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=512, sliding_window_pattern=6,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
        torch_dtype="float16"),
    # GPT-2 XL (1.5B): 48 layers of 25 heads of 64, learned positions, LayerNorm, GELU MLP.
    "gpt2-xl": dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, n_positions=1024,
        vocab_size=50257, layer_norm_epsilon=1e-5, activation_function="gelu_new", tie_word_embeddings=True,
        bos_token_id=50256, eos_token_id=50256, torch_dtype="float16"),
    # Phi-4-mini (3.8B, the smallest Phi): partial rotary (0.75), LongRoPE, a 200k vocabulary.
    "phi4-mini": dict(
        architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, vocab_size=200064,
        max_position_embeddings=131072, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
        partial_rotary_factor=0.75, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=True,
        rope_scaling=dict(type="longrope", short_factor=[1.0] * 48, long_factor=[1.5] * 48),
        bos_token_id=199999, eos_token_id=199999, torch_dtype="float16"),
}
# The same Gemma 3 shape with every layer global: what the sliding windows save at long contexts.
SHAPES["gemma3-1b-global"] = {**SHAPES["gemma3-1b"], "layer_types": ["full_attention"] * 26}


def layer_matrices(shape: str) -> dict[str, tuple[int, int]]:
    """(N, K) of the weight matrices one decode step reads in a llama-family shape: the fused qkv, o,
    fused gate/up and down projections, and the LM head."""
    hf = SHAPES[shape]
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim", hidden // heads)
    kv = hf.get("num_key_value_heads", heads) * head_dim
    return {"qkv": (heads * head_dim + 2 * kv, hidden), "o": (hidden, heads * head_dim),
            "gate_up": (2 * hf["intermediate_size"], hidden), "down": (hidden, hf["intermediate_size"]),
            "lm_head": (hf["vocab_size"], hidden)}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def random_model_dir(shape: str, root: str | Path) -> Path:
    """A model directory of `shape` with random fp16 weights under `root` (made once, then reused)."""
    if shape not in SHAPES:
        raise ConfigurationError(f"unknown shape {shape!r}; named shapes: {', '.join(SHAPES)}")
    from safetensors.torch import save_file

    from .engine.config import EngineConfig
    from .engine.weights import expected_shapes

    hf = SHAPES[shape]
    model_dir = Path(root) / f"random-{shape}"
    if (model_dir / "model.safetensors").is_file():
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    log(f"writing random {shape} weights to {model_dir} ...")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # drawing 1e9 numbers is much faster there
    generator = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, shp in expected_shapes(EngineConfig.from_hf_dict(hf)).items():
        if "norm" in name or ".ln_" in name:  # RMSNorm / LayerNorm scales (GPT-2's ln_1, ln_2, ln_f)
            tensors[name] = torch.ones(shp, dtype=torch.float16)
        elif name.endswith(".bias"):
            tensors[name] = torch.zeros(shp, dtype=torch.float16)
        else:
            tensors[name] = (torch.randn(shp, generator=generator, device=device) * 0.02).half().cpu()
    save_file(tensors, str(model_dir / "model.safetensors.tmp"))
    (model_dir / "config.json").write_text(json.dumps(hf, indent=1))
    (model_dir / "model.safetensors.tmp").rename(model_dir / "model.safetensors")
    return model_dir


def random_lora_dir(model_dir: str | Path, adapter_dir: str | Path, *, rank: int, alpha: float, seed: int = 0,
                    targets=("q", "k", "v", "o", "gate", "up", "down")) -> Path:
    """A random LoRA adapter for the model in `model_dir`, in PEFT's layout (adapter_config.json and
    adapter_model.safetensors), written without the peft package: what benchmarks and GPU tests load."""
    from safetensors.torch import save_file

    from .engine.config import EngineConfig
    from .engine.lora import module_shapes

    cfg = EngineConfig.from_model_dir(model_dir)
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shapes = module_shapes(cfg)
    tensors = {}
    for layer in range(cfg.num_decoder_layers):
        for module in targets:
            out_features, in_features = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{'mlp' if module in ('gate', 'up', 'down') else 'self_attn'}"
            tensors[f"{prefix}.{module}_proj.lora_A.weight"] = \
                torch.randn(rank, in_features, generator=generator) / in_features ** 0.5
            tensors[f"{prefix}.{module}_proj.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=[f"{m}_proj" for m in targets], bias="none")))
    return adapter_dir


def copy_bandwidth(device="cuda") -> float:
    """Bytes per second of a 256 MiB device-to-device copy (read + write counted), median of
    triton's do_bench: the bandwidth every floor in bench/ is measured against."""
    import triton.testing

    x = torch.randn(128 * 2 ** 20, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() * 2 / (ms * 1e-3)


def weight_bytes(runner) -> int:
    """Bytes one decode step reads from the weights: every layer, the final norm and the LM head
    (the embedding table only for the batch's rows, which is negligible)."""
    w = runner.weights
    tensors = [t for layer in w.layers for t in vars(layer).values() if t is not None] + [w.final_norm, w.lm_head]
    return sum(t.nbytes for t in tensors)  # a QuantizedWeight counts its packed bytes


def kv_bytes_read(runner, context: float) -> float:
    """Bytes one decode step reads from one row's KV cache at `context` tokens: every layer's keys and
    values, a sliding-window layer's over its window only."""
    cfg = runner.config
    per_layer_token = 2 * cfg.num_kv_heads * cfg.head_dim * runner.kv_cache.data.element_size()
    return sum(per_layer_token * min(context, cfg.layer_window(i) or context) for i in range(cfg.num_decoder_layers))


def timed(fn, device="cuda"):
    """(seconds, fn's result), a CUDA device synchronised before and after."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _random_prompts(runner, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, runner.config.vocab_size, (batch, length), generator=generator).to(runner.device)


def prefill(runner, ids: torch.Tensor, lora=None) -> torch.Tensor:
    """Prefill `ids` and sample each row's first token greedily: what TTFT measures. lora: one
    adapter name per row, or None (the runner's active adapter)."""
    batch = ids.shape[0]
    logits = runner.prefill_step(runner.embed(ids), [ids.shape[1]] * batch, lora=lora)
    zeros = torch.zeros(batch, device=runner.device)
    return runner.sample(logits, zeros, torch.ones(batch, dtype=torch.int32, device=runner.device),
                         torch.ones(batch, device=runner.device), zeros.long(), zeros.long())


def bench_decode(runner, batch: int, isl: int, osl: int, iterations: int, bandwidth: float, lora=None) -> dict:
    """Decode tokens/s of `batch` rows, ISL-token prompts, OSL steps each iteration (median);
    lora: one adapter name per row, or None (the runner's active adapter)."""
    ids = _random_prompts(runner, batch, isl)
    greedy = dict(temperature=[0.0] * batch, top_k=[1] * batch, top_p=[1.0] * batch, seeds=[0] * batch,
                  offsets=[0] * batch)
    step_times = []
    torch.cuda.reset_peak_memory_stats()
    for it in range(iterations + 1):  # the first iteration warms up (and captures the graph)
        first = prefill(runner, ids, lora)
        runner.start_decode(first, list(range(batch)), **greedy, lora=lora)

        def steps():
            for _ in range(osl):
                runner.decode_sample_step()

        elapsed, _ = timed(steps)
        if it:
            step_times.append(elapsed / osl)
    ms = statistics.median(step_times) * 1e3
    floor_bytes = weight_bytes(runner) + batch * kv_bytes_read(runner, isl + osl / 2)
    floor_ms = floor_bytes / bandwidth * 1e3
    return dict(batch=batch, isl=isl, osl=osl, tokens_per_s=batch / ms * 1e3, ms_per_step=ms, floor_ms=floor_ms,
                pct_of_floor=100 * floor_ms / ms, peak_gpu_mem_gb=torch.cuda.max_memory_allocated() / 1e9)


def bench_ttft(runner, prompt_len: int, iterations: int) -> dict:
    ids = _random_prompts(runner, 1, prompt_len, seed=1)
    prefill(runner, ids)  # warm-up: kernel compilation, cuBLAS heuristics
    times = [timed(lambda: prefill(runner, ids))[0] for _ in range(max(3, iterations))]
    return dict(prompt_len=prompt_len, ttft_ms=statistics.median(times) * 1e3)


def make_runner(model_dir: str | Path, *, batches, isl: int, osl: int, ttft_lens, dtype: str = "float16",
                cuda_graphs: bool = True, vocab_map: str | Path | None = None, quantization: str | None = None,
                quantize_lm_head: bool = False):
    """An engine on the GPU sized for these runs: batch, prompt and cache limits (and a reduced
    vocabulary's map, a quantization, if given)."""
    from .engine.runner import LLMEngineRunner

    log(f"loading {model_dir} ...")
    return LLMEngineRunner(model_dir, device="cuda", dtype=dtype, max_batch_size=max(batches),
                           max_input_length=max([isl, *ttft_lens]), max_kv_cache_capacity=max([isl + osl, *ttft_lens]),
                           cuda_graphs=cuda_graphs, vocab_map=vocab_map, quantization=quantization,
                           quantize_lm_head=quantize_lm_head)


def run(model: str, *, batches=(1, 4, 16, 64), isl: int = 128, osl: int = 256, ttft_lens=(128, 1024, 4096),
        iterations: int = 3, dtype: str = "float16", cuda_graphs: bool = True, cache_dir: str | Path = "/tmp/edgellm-bench",
        runner=None, quantization: str | None = None, quantize_lm_head: bool = False) -> dict:
    """Our figures for one model (a directory or a named shape; its weights packed at load with
    `quantization`), on `runner` if given (built for these sizes by make_runner). Returns a JSON-ready dict."""
    if not torch.cuda.is_available():
        raise ConfigurationError("the benchmark needs a CUDA GPU")
    if runner is None:
        model_dir = random_model_dir(model, cache_dir) if model in SHAPES else Path(model)
        runner = make_runner(model_dir, batches=batches, isl=isl, osl=osl, ttft_lens=ttft_lens, dtype=dtype,
                             cuda_graphs=cuda_graphs, quantization=quantization, quantize_lm_head=quantize_lm_head)
    bandwidth = copy_bandwidth(runner.device)
    result = dict(model=model, dtype=dtype, cuda_graphs=cuda_graphs, copy_TBps=bandwidth / 1e12,
                  quantization=(quantization or "none") + ("+head" if quantize_lm_head else ""),
                  weight_gb=weight_bytes(runner) / 1e9, decode=[], ttft=[])
    for batch in batches:
        row = bench_decode(runner, batch, isl, osl, iterations, bandwidth)
        log(f"  decode b{batch}: {row['tokens_per_s']:.0f} tok/s, {row['ms_per_step']:.3f} ms/step "
            f"({row['pct_of_floor']:.0f}% of floor)")
        result["decode"].append(row)
    for length in ttft_lens:
        row = bench_ttft(runner, length, iterations)
        log(f"  TTFT {length}: {row['ttft_ms']:.2f} ms")
        result["ttft"].append(row)
    result["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def print_table(result: dict, label: str = "edgellm") -> None:
    packed = result.get("quantization", "none")
    print(f"{label}  {result['model']}  {result['dtype']}" + (f" {packed}" if packed != "none" else "") +
          f"  copy {result['copy_TBps']:.2f} TB/s  weights {result['weight_gb']:.2f} GB")
    print(f"{'batch':>5s} {'tok/s':>9s} {'ms/step':>8s} {'floor ms':>8s} {'% floor':>7s} {'peak GB':>7s}")
    for r in result["decode"]:
        print(f"{r['batch']:5d} {r['tokens_per_s']:9.0f} {r['ms_per_step']:8.3f} "
              f"{r['floor_ms']:8.3f} {r['pct_of_floor']:6.0f}% {r['peak_gpu_mem_gb']:7.2f}")
    print("TTFT " + "  ".join(f"{r['prompt_len']}: {r['ttft_ms']:.2f} ms" for r in result["ttft"]))
