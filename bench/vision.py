"""Vision-language models on a CUDA GPU (issue 14): the Qwen2.5-VL-3B and InternVL3-1B shapes with
random weights.

For one 448x448 and one 1280x720 image: the vision encoder's time (ours: host pixels to the device,
normalisation, layout and the Triton/cuBLAS forward, from a CUDA graph where the shape allows one,
and eagerly; transformers: its vision tower and projector
with SDPA attention on the same pixel_values, fp16, same weights, same run) and the FLOP floor; then
time to first token of a request with that image through LLMInferenceRuntime, split into
preprocessing / ViT / prefill, beside transformers' forward over the same prompt (ViT + prefill, no
preprocessing). Medians of --iterations runs after warm-up; the encoder cache is off.

Run:  python bench/vision.py --json bench/results/vision.json   (--text-layers N shrinks the LMs for a
quick run; --only qwen2_5_vl|internvl)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from edgellm import LLMGenerationRequest, LLMInferenceRuntime  # noqa: E402
from edgellm.benchmark import log  # noqa: E402

PEAK_FLOPS = 770e12  # H100 bf16/fp16 dense matmul measured (DESIGN.md)

QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                   window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, hidden_act="silu")
QWEN_TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                 tie_word_embeddings=True, eos_token_id=2, bos_token_id=None)
INTERN_VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     image_size=448, patch_size=14, hidden_act="gelu", norm_type="layer_norm")
INTERN_TEXT = dict(vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6}, eos_token_id=2, bos_token_id=None)
SHAPES = {"qwen2_5_vl": "Qwen2.5-VL-3B", "internvl": "InternVL3-1B"}


def build(family: str, model_dir: Path, text_layers: int | None):
    import transformers
    from vlm_models import IMG_CONTEXT, TOKENS, write_tokenizer

    if family == "qwen2_5_vl":
        text = {**QWEN_TEXT, **({"num_hidden_layers": text_layers} if text_layers else {})}
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=QWEN_VISION, **TOKENS)
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
        pre = {"min_pixels": 3136, "max_pixels": 12845056}
    else:
        text = {**INTERN_TEXT, **({"num_hidden_layers": text_layers} if text_layers else {})}
        config = transformers.InternVLConfig(vision_config=INTERN_VISION, text_config=text, image_token_id=IMG_CONTEXT)
        model_cls = transformers.InternVLForConditionalGeneration
        pre = {"size": {"height": 448, "width": 448}, "crop_to_patches": True, "min_patches": 1, "max_patches": 12}
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = model_cls(config).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else None
    model.save_pretrained(model_dir)
    write_tokenizer(model_dir, family)
    (model_dir / "preprocessor_config.json").write_text(json.dumps(pre))
    return model


def timed(fn, iterations: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(iterations):
        torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def vit_flops(family: str, patches: int, tiles: int) -> float:
    """Matmul FLOPs of one encoder pass (attention included: Qwen's window blocks at their window
    length, InternVL's within each tile) and of its merger / projector."""
    if family == "qwen2_5_vl":
        v, out = QWEN_VISION, QWEN_TEXT["hidden_size"]
        w, i, depth = v["hidden_size"], v["intermediate_size"], v["depth"]
        window = (v["window_size"] // v["patch_size"]) ** 2
        full = len(v["fullatt_block_indexes"])
        attention = 4 * w * patches * (full * patches + (depth - full) * min(window, patches))
        mlp = 3 * w * i
        pixel = 1176
    else:
        v, out = INTERN_VISION, INTERN_TEXT["hidden_size"]
        w, i, depth = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
        patches += tiles  # the CLS tokens
        attention = 4 * w * depth * patches * (patches // tiles)
        mlp = 2 * w * i
        pixel = 588
    per_token = 2 * (4 * w * w + mlp)
    merged = 4 * w
    head = 2 * patches // 4 * (merged * out + (out * out if family == "internvl" else merged * merged))
    return depth * per_token * patches + attention + head + 2 * patches * pixel * w


def profile(fn, title: str) -> None:
    """Where one call's time goes: wall time against the sum of its kernels' device time (a gap means
    the host is the bottleneck), and the kernels that take most."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - began) * 1e3
    events = prof.key_averages()
    device_ms = sum(e.device_time_total for e in events) / 1e3
    log(f"profile {title}: wall {wall:.2f} ms (profiled), kernels {device_ms:.2f} ms in {sum(e.count for e in events)} launches")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:12]:
        log(f"  {e.device_time_total / 1e3:7.3f} ms {e.count:5d}x  {e.key[:100]}")


def hf_image_inputs(family, runtime, prepared, ids_t=None) -> dict:
    from vlm_models import IMAGE_TOKENS

    inputs = dict(pixel_values=runtime.vision.encoder.pixel_values(prepared).half())
    if family != "internvl":
        inputs["image_grid_thw"] = torch.tensor([p.grid for p in prepared], device="cuda")
        if ids_t is not None:
            inputs["mm_token_type_ids"] = (ids_t == IMAGE_TOKENS[family]).int()
    return inputs


def hf_vit(family, hf, inputs):
    with torch.no_grad():
        if family == "internvl":
            out = hf.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-1,
                                              vision_feature_select_strategy="default")
        else:
            out = hf.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    out = getattr(out, "pooler_output", out)
    return out.reshape(-1, out.shape[-1])


def run_family(family: str, args) -> list[dict]:
    from vlm_models import PLACEHOLDERS, random_image

    model_dir = Path(tempfile.mkdtemp(prefix=f"{family}-"))
    log(f"building the {SHAPES[family]} shape in {model_dir}")
    hf = build(family, model_dir, args.text_layers)
    runtime = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", max_batch_size=1,
                                  max_input_length=4096, max_kv_cache_capacity=4096)
    encoder = runtime.vision.encoder
    encoder.cache_bytes = 0  # every request runs the encoder
    rows = []
    for width, height in ((448, 448), (1280, 720)):
        image = random_image(width, height, seed=width)
        prepared = encoder.prepare(image)
        inputs = hf_image_inputs(family, runtime, [prepared])
        ours_vit = timed(lambda: encoder.run([prepared]), args.iterations)  # a CUDA graph after the warm-up
        encoder.graphs.graphs.enabled = False
        eager_vit = timed(lambda: encoder.run([prepared]), args.iterations)
        if args.profile:
            profile(lambda: encoder.run([prepared]), f"{SHAPES[family]} {width}x{height} encoder (eager)")
        encoder.graphs.graphs.enabled = True
        theirs_vit = timed(lambda: hf_vit(family, hf, inputs), args.iterations)
        a, b = torch.cat(encoder.run([prepared])).float(), hf_vit(family, hf, inputs).float()
        rel = ((a - b).norm() / b.norm()).item()
        request = LLMGenerationRequest(requests=[{"prompt": "w1 w2 w3", "images": [image]}], max_generate_length=1,
                                       temperature=0)
        splits = [runtime.handle_request(request).timings for _ in range(args.iterations + 2)][2:]
        med = lambda name: statistics.median(getattr(t, name) for t in splits)  # noqa: E731
        ids = PLACEHOLDERS[family] + runtime.tokenizer.encode("w1 w2 w3")
        placed = runtime.vision.place(ids, [prepared], 0, mrope=family != "internvl")
        ids_t = torch.tensor([placed.ids], device="cuda")
        kwargs = dict(input_ids=ids_t, logits_to_keep=1, **hf_image_inputs(family, runtime, [prepared], ids_t))
        with torch.no_grad():
            try:  # transformers versions differ on whether the forward wants mm_token_type_ids
                hf(**kwargs)
            except (TypeError, ValueError):
                kwargs.pop("mm_token_type_ids", None)
            hf_ttft = timed(lambda: hf(**kwargs), args.iterations)
        tiles = prepared.grid[0] if family == "internvl" else 1
        patches = inputs["pixel_values"].shape[0] * (1024 if family == "internvl" else 1)
        floor = vit_flops(family, patches, tiles) / PEAK_FLOPS * 1e3
        rows.append(dict(model=SHAPES[family], image=f"{width}x{height}", patches=patches, tiles=tiles,
                         image_tokens=prepared.tokens, prompt_tokens=len(placed.ids), vit_ms=ours_vit, vit_eager_ms=eager_vit,
                         hf_vit_ms=theirs_vit, vit_speedup=theirs_vit / ours_vit, vit_floor_ms=floor,
                         vit_of_floor=floor / ours_vit, vit_rel_error=rel, ttft_ms=med("total_ms"),
                         preprocess_ms=med("image_preprocess_ms"), ttft_vit_ms=med("vision_ms"),
                         prefill_ms=med("prefill_ms"), hf_forward_ms=hf_ttft))
        log(f"{rows[-1]}")
    del hf, runtime
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--text-layers", type=int, default=None, help="language-model layers (default: the shape's)")
    parser.add_argument("--only", choices=sorted(SHAPES), action="append")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of one encoder call per image")
    args = parser.parse_args()
    rows = []
    for family in args.only or list(SHAPES):
        rows += run_family(family, args)
    print(f"\n{'model':>13} {'image':>9} {'patches':>7} {'ViT ms':>7} {'eager':>7} {'HF ViT':>7} {'x':>5} {'floor%':>6} | "
          f"{'TTFT':>6} {'prep':>5} {'ViT':>6} {'prefill':>7} | {'HF fwd':>7}")
    for r in rows:
        print(f"{r['model']:>13} {r['image']:>9} {r['patches']:>7} {r['vit_ms']:7.2f} {r['vit_eager_ms']:7.2f} {r['hf_vit_ms']:7.2f} "
              f"{r['vit_speedup']:5.2f} {100 * r['vit_of_floor']:5.1f}% | {r['ttft_ms']:6.1f} {r['preprocess_ms']:5.1f} "
              f"{r['ttft_vit_ms']:6.2f} {r['prefill_ms']:7.2f} | {r['hf_forward_ms']:7.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "commit": os.environ.get("EDGELLM_COMMIT", ""), "text_layers": args.text_layers,
            "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
