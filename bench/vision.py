"""Vision-language models on a CUDA GPU (issue 14): the Qwen2.5-VL-3B shapes with random weights.

For one 448x448 and one 1280x720 image: the vision encoder's time (ours: layout + Triton/cuBLAS
forward; transformers: its vision tower with SDPA attention, fp16, same weights, same run) and the
FLOP floor; then time to first token of a request with that image through LLMInferenceRuntime,
split into preprocessing / ViT / prefill, beside transformers' forward over the same prompt (ViT +
prefill, no preprocessing). Medians of --iterations runs after warm-up; the encoder cache is off.

Run:  python bench/vision.py --json bench/results/vision.json   (--text-layers N shrinks the LM for a quick run)
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

VISION_3B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                 window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                 temporal_patch_size=2, hidden_act="silu")
TEXT_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
               rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
               tie_word_embeddings=True, eos_token_id=2, bos_token_id=None)
PEAK_FLOPS = 770e12  # H100 bf16/fp16 dense matmul measured (DESIGN.md)


def build(model_dir: Path, text_layers: int):
    import transformers
    from vlm_models import TOKENS, write_tokenizer

    config = transformers.Qwen2_5_VLConfig(text_config={**TEXT_3B, "num_hidden_layers": text_layers},
                                           vision_config=VISION_3B, **TOKENS)
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else None
    model.save_pretrained(model_dir)
    write_tokenizer(model_dir)
    (model_dir / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056}))
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


def vit_flops(vision, patches: int) -> float:
    """Matmul FLOPs of one encoder pass over `patches` patches (attention included, window layers
    at their window length)."""
    w, i, depth = vision["hidden_size"], vision["intermediate_size"], vision["depth"]
    per_token = 2 * (3 * w * w + w * w + 3 * w * i)
    window = (vision["window_size"] // vision["patch_size"]) ** 2
    full = len(vision["fullatt_block_indexes"])
    attention = 4 * w * patches * (full * patches + (depth - full) * min(window, patches))
    merged = 4 * w
    head = 2 * patches // 4 * (merged * merged + merged * TEXT_3B["hidden_size"])
    return depth * per_token * patches + attention + head + 2 * patches * 1176 * w


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--text-layers", type=int, default=TEXT_3B["num_hidden_layers"])
    args = parser.parse_args()
    from vlm_models import IMAGE_TOKEN, random_image

    model_dir = Path(tempfile.mkdtemp(prefix="vlm3b-"))
    log(f"building the Qwen2.5-VL-3B shape ({args.text_layers} text layers) in {model_dir}")
    hf = build(model_dir, args.text_layers)
    runtime = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", max_batch_size=1,
                                  max_input_length=2048, max_kv_cache_capacity=2048)
    runtime.vision.encoder.cache_bytes = 0  # every request runs the encoder
    encoder = runtime.vision.encoder
    rows = []
    for width, height in ((448, 448), (1280, 720)):
        image = random_image(width, height, seed=width)
        prepared = encoder.prepare(image)
        pixels = torch.from_numpy(prepared.pixels).to("cuda", torch.float16)
        grid = torch.tensor([prepared.grid], device="cuda")
        ours_vit = timed(lambda: encoder.run([prepared]), args.iterations)
        with torch.no_grad():
            hf_vit = timed(lambda: hf.model.visual(pixels, grid_thw=grid), args.iterations)
            a = torch.cat(encoder.run([prepared])).float()
            b = getattr(hf.model.visual(pixels, grid_thw=grid), "pooler_output", None)
            b = (b if b is not None else hf.model.visual(pixels, grid_thw=grid)).float()
        rel = ((a - b).norm() / b.norm()).item()
        request = LLMGenerationRequest(requests=[{"prompt": "w1 w2 w3", "images": [image]}], max_generate_length=1,
                                       temperature=0)
        splits = []
        for _ in range(args.iterations + 2):
            splits.append(runtime.handle_request(request).timings)
        splits = splits[2:]
        med = lambda name: statistics.median(getattr(t, name) for t in splits)  # noqa: E731
        ids = [3, IMAGE_TOKEN, 4] + runtime.tokenizer.encode("w1 w2 w3")
        placed = runtime.vision.place(ids, [prepared], 0, mrope=True)
        ids_t = torch.tensor([placed.ids], device="cuda")
        kwargs = dict(input_ids=ids_t, pixel_values=pixels, image_grid_thw=grid, logits_to_keep=1)
        with torch.no_grad():
            try:  # transformers versions differ on whether the forward wants mm_token_type_ids
                hf(**kwargs, mm_token_type_ids=(ids_t == IMAGE_TOKEN).int())
                kwargs["mm_token_type_ids"] = (ids_t == IMAGE_TOKEN).int()
            except (TypeError, ValueError):
                pass
            hf_ttft = timed(lambda: hf(**kwargs), args.iterations)
        patches = prepared.pixels.shape[0]
        floor = vit_flops(VISION_3B, patches) / PEAK_FLOPS * 1e3
        rows.append(dict(image=f"{width}x{height}", patches=patches, image_tokens=prepared.tokens,
                         prompt_tokens=len(placed.ids), vit_ms=ours_vit, hf_vit_ms=hf_vit,
                         vit_speedup=hf_vit / ours_vit, vit_floor_ms=floor, vit_of_floor=floor / ours_vit,
                         vit_rel_error=rel, ttft_ms=med("total_ms"), preprocess_ms=med("image_preprocess_ms"),
                         ttft_vit_ms=med("vision_ms"), prefill_ms=med("prefill_ms"), hf_forward_ms=hf_ttft))
        log(f"{rows[-1]}")
    print(f"\n{'image':>9} {'patches':>7} {'ViT ms':>7} {'HF ViT':>7} {'x':>5} {'floor%':>6} | "
          f"{'TTFT':>6} {'prep':>5} {'ViT':>6} {'prefill':>7} | {'HF fwd':>7}")
    for r in rows:
        print(f"{r['image']:>9} {r['patches']:>7} {r['vit_ms']:7.2f} {r['hf_vit_ms']:7.2f} {r['vit_speedup']:5.2f} "
              f"{100 * r['vit_of_floor']:5.1f}% | {r['ttft_ms']:6.1f} {r['preprocess_ms']:5.1f} {r['ttft_vit_ms']:6.2f} "
              f"{r['prefill_ms']:7.2f} | {r['hf_forward_ms']:7.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "commit": os.environ.get("EDGELLM_COMMIT", ""), "text_layers": args.text_layers,
            "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
