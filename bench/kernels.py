"""Kernel microbenchmarks: each Triton kernel against its torch baseline (eager and torch.compile)
and against its floor (bytes / measured copy bandwidth, or FLOPs / measured matrix rate).

Three timings per kernel: "triton us" is triton.testing.do_bench (one call at a time, L2 flushed,
Python launch and event overhead included: at 10-20 us this caps even a torch copy near 50-70% of
bandwidth); "graph us" replays 20 calls on the same inputs from a CUDA graph (no launch cost, but
inputs under 50 MB stay in L2, so it can beat the DRAM floor); "stream us" replays calls on distinct
inputs whose total exceeds L2, back to back from one graph: the DRAM-bound time a kernel takes inside a
captured prefill or decode step, used for the bandwidth targets of memory-bound kernels. "x torch"
compares the eager calls, "x graphs" both sides replayed from CUDA graphs (how the engine runs them).

Run on a CUDA GPU:  python bench/kernels.py --json bench/results/kernels.json  [--only shrink,gemv]
Sizes are decode (batch 16, one token) and prefill (4096 tokens) shapes of Llama-3.2-1B (hidden 2048,
32 query heads, 8 KV heads, head_dim 64, FFN 8192, vocab 128256), fp16. The LoRA cases (batch 1 and
16, rank 16, four adapters) compare each producer kernel with its fused shrink against the same kernel
plus a lora_shrink launch ("unfused"), and each projection's GEMV with its LoRA epilogue against the
plain GEMV ("no LoRA"); read their "graph us" (launch costs are what the fusion removes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm.benchmark import copy_bandwidth  # noqa: E402
from edgellm.kernels import attention, gemv, kv_append, lora, rms_norm, rope, rope_append, sampling, glu  # noqa: E402

ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "h100-2026-11-22.json"
DEV = "cuda"
HALF = torch.float16


def bench_us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def graph_us(fn, calls: int = 20) -> float | None:
    """Per-call time of `fn` replayed from a CUDA graph of `calls` calls: the GPU time without the
    Python launch cost (what a captured decode step pays). None where `fn` cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return bench_us(graph.replay) / calls
    except Exception as exc:  # noqa: BLE001 - reported as missing
        print(f"  graph capture failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def streamed_us(fresh, nbytes: int) -> float | None:
    """Per-call GPU time in back-to-back execution, as inside a prefill: `fresh(i)` builds a call on
    its own inputs/outputs; enough sets are cycled from one CUDA graph that the data does not stay in
    the 50 MB L2, and no Python launch cost or per-call event overhead is counted."""
    sets = max(2, min(32, -(-256 * 2 ** 20 // nbytes)))
    calls = [fresh(i) for i in range(sets)]
    result = graph_us(lambda calls=calls: [c() for c in calls], calls=1)
    del calls
    torch.cuda.empty_cache()
    return None if result is None else result / sets


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    us = bench_us(lambda: a @ b)
    return 2 * 8192 ** 3 / (us * 1e-6)


def compiled(fn):
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # noqa: BLE001 - a baseline that cannot compile is reported as missing
        return None


def _copy_case(nbytes: int) -> dict:
    """A plain device copy moving the same bytes (read + write): what this size allows at best."""
    def fresh(_i=0):
        src = torch.ones(nbytes // 4, dtype=HALF, device=DEV)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    return dict(name=f"  torch copy of the same {nbytes / 1e6:.1f} MB", triton=fresh(), fresh=fresh,
                torch=lambda: None, compile=None, bytes=nbytes, baseline="-")


def cases():
    g = torch.Generator(device=DEV).manual_seed(0)

    def rnd(*shape, dtype=HALF):
        return torch.randn(*shape, generator=g, device=DEV, dtype=torch.float32).to(dtype)

    out = []
    hidden, ffn, hq, hkv, d = 2048, 8192, 32, 8, 64
    for tag, rows in (("decode b16", 16), ("prefill 4096", 4096)):
        x, r, w = rnd(rows, hidden), rnd(rows, hidden), rnd(hidden)
        out.append(dict(name=f"rms_norm {tag}", triton=lambda x=x, w=w: rms_norm.rms_norm(x, w, 1e-5),
                        torch=lambda x=x, w=w: rms_norm.rms_norm_ref(x, w, 1e-5), compile=rms_norm.rms_norm_ref,
                        compile_args=(x, w, 1e-5), bytes=2 * x.numel() * 2,
                        fresh=lambda i, rows=rows, w=w: (lambda x=rnd(rows, hidden): rms_norm.rms_norm(x, w, 1e-5))))
        if rows > 16:
            for warps in (1, 4):  # tile candidates (default: 2 for 2048 columns)
                out.append(dict(name=f"  rms_norm {tag} warps {warps}",
                                triton=lambda x=x, w=w, warps=warps: rms_norm.rms_norm(x, w, 1e-5, num_warps=warps),
                                torch=lambda: None, compile=None, bytes=2 * x.numel() * 2, baseline="-"))
        out.append(dict(name=f"add_rms_norm {tag}", triton=lambda x=x, r=r, w=w: rms_norm.add_rms_norm(x, r, w, 1e-5),
                        torch=lambda x=x, r=r, w=w: rms_norm.add_rms_norm_ref(x, r, w, 1e-5),
                        compile=rms_norm.add_rms_norm_ref, compile_args=(x, r, w, 1e-5), bytes=4 * x.numel() * 2,
                        fresh=lambda i, rows=rows, w=w: (lambda x=rnd(rows, hidden), r=rnd(rows, hidden):
                                                         rms_norm.add_rms_norm(x, r, w, 1e-5))))
        gu = rnd(rows, 2 * ffn)
        out.append(dict(name=f"glu {tag}", triton=lambda gu=gu: glu.glu(gu),
                        torch=lambda gu=gu: glu.glu_ref(gu), compile=glu.glu_ref,
                        compile_args=(gu,), bytes=3 * rows * ffn * 2,
                        fresh=lambda i, rows=rows: (lambda gu=rnd(rows, 2 * ffn): glu.glu(gu))))
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(d, 5e5).to(DEV), 8192)
    for tag, (b, s) in (("decode b16", (16, 1)), ("prefill 4096", (1, 4096))):
        q, k = rnd(b, s, hq, d), rnd(b, s, hkv, d)
        pos = (torch.arange(s, device=DEV)[None, :] + torch.randint(0, 4000, (b, 1), device=DEV))
        rope_bytes = 2 * (q.numel() + k.numel()) * 2
        out.append(dict(name=f"apply_rope {tag}", triton=lambda q=q, k=k, pos=pos: rope.apply_rope(q, k, cos, sin, pos),
                        torch=lambda q=q, k=k, pos=pos: rope.apply_rope_ref(q, k, cos, sin, pos),
                        compile=rope.apply_rope_ref, compile_args=(q, k, cos, sin, pos), bytes=rope_bytes,
                        fresh=lambda i, b=b, s=s, pos=pos: (lambda q=rnd(b, s, hq, d), k=rnd(b, s, hkv, d):
                                                            rope.apply_rope(q, k, cos, sin, pos))))
        if s > 1:
            for warps in (1, 2, 8):  # tile candidates (default 4)
                out.append(dict(name=f"  apply_rope {tag} warps {warps}",
                                triton=lambda q=q, k=k, pos=pos, warps=warps: rope.apply_rope(q, k, cos, sin, pos,
                                                                                             num_warps=warps),
                                fresh=lambda i, b=b, s=s, pos=pos, warps=warps: (
                                    lambda q=rnd(b, s, hq, d), k=rnd(b, s, hkv, d):
                                    rope.apply_rope(q, k, cos, sin, pos, num_warps=warps)),
                                torch=lambda: None, compile=None, bytes=rope_bytes, baseline="-"))
            out.append(_copy_case(rope_bytes))
        kc = torch.zeros(16, hkv, 8192, d, dtype=HALF, device=DEV)
        vc = torch.zeros_like(kc)
        kk, vv = rnd(b, s, hkv, d), rnd(b, s, hkv, d)
        slots = torch.arange(b, device=DEV, dtype=torch.int32)
        starts = torch.full((b,), 100, device=DEV, dtype=torch.int32)
        lens = torch.full((b,), s, device=DEV, dtype=torch.int32)

        def torch_append(kc=kc, vc=vc, kk=kk, vv=vv, s=s, b=b):  # vectorised torch baseline
            pos = 100 + torch.arange(s, device=DEV)
            kc[:b, :, pos] = kk.transpose(1, 2)
            vc[:b, :, pos] = vv.transpose(1, 2)

        out.append(dict(name=f"kv_append {tag}",
                        triton=lambda kc=kc, vc=vc, kk=kk, vv=vv, slots=slots, starts=starts, lens=lens:
                        kv_append.kv_append(kc, vc, kk, vv, slots, starts, lens),
                        torch=torch_append, compile=torch_append, compile_args=(), bytes=4 * kk.numel() * 2,
                        # set i writes into its own cache slot, so that no two sets share cache lines
                        fresh=lambda i, b=b, s=s, kc=kc, vc=vc, starts=starts, lens=lens: (
                            lambda kk=rnd(b, s, hkv, d), vv=rnd(b, s, hkv, d),
                            slots=torch.full((b,), i % 16, device=DEV, dtype=torch.int32):
                            kv_append.kv_append(kc, vc, kk, vv, slots, starts, lens))))
        if s > 1:
            for tokens, warps in ((16, 4), (32, 4), (128, 4), (64, 2), (64, 8)):  # tile candidates (default 64, 4)
                out.append(dict(name=f"  kv_append {tag} tokens {tokens} warps {warps}",
                                triton=lambda kc=kc, vc=vc, kk=kk, vv=vv, slots=slots, starts=starts, lens=lens,
                                tokens=tokens, warps=warps: kv_append.kv_append(kc, vc, kk, vv, slots, starts, lens,
                                                                                 tokens=tokens, num_warps=warps),
                                fresh=lambda i, b=b, s=s, kc=kc, vc=vc, starts=starts, lens=lens, tokens=tokens,
                                warps=warps: (
                                    lambda kk=rnd(b, s, hkv, d), vv=rnd(b, s, hkv, d),
                                    slots=torch.full((b,), i % 16, device=DEV, dtype=torch.int32):
                                    kv_append.kv_append(kc, vc, kk, vv, slots, starts, lens, tokens=tokens,
                                                        num_warps=warps)),
                                torch=lambda: None, compile=None, bytes=4 * kk.numel() * 2, baseline="-"))
            out.append(_copy_case(4 * kk.numel() * 2))
        # The fused op the model runs: RoPE of q and k, k and v appended (vs the two ops above).
        vq = rnd(b, s, hkv, d)
        fused_bytes = 2 * q.numel() * 2 + 4 * kk.numel() * 2
        out.append(dict(name=f"rope_kv_append {tag}",
                        triton=lambda q=q, k=k, v=vq, kc=kc, vc=vc, slots=slots, starts=starts, lens=lens:
                        rope_append.rope_kv_append(q, k, v, cos, sin, kc, vc, slots, starts, lens),
                        torch=lambda q=q, k=k, v=vq, kc=kc, vc=vc, slots=slots, starts=starts, lens=lens, pos=pos:
                        (rope.apply_rope(q, k, cos, sin, pos), kv_append.kv_append(kc, vc, k, v, slots, starts, lens)),
                        compile=None, bytes=fused_bytes, baseline="apply_rope + kv_append (Triton)",
                        fresh=lambda i, b=b, s=s, kc=kc, vc=vc, starts=starts, lens=lens: (
                            lambda q=rnd(b, s, hq, d), k=rnd(b, s, hkv, d), v=rnd(b, s, hkv, d),
                            slots=torch.full((b,), i % 16, device=DEV, dtype=torch.int32):
                            rope_append.rope_kv_append(q, k, v, cos, sin, kc, vc, slots, starts, lens))))

    # Decode attention: batch 16 over a 4096-token cache.
    b, ctx = 16, 4096
    kc, vc = rnd(b, hkv, ctx, d), rnd(b, hkv, ctx, d)
    q = rnd(b, hq, d)
    slots = torch.arange(b, device=DEV, dtype=torch.int32)
    lens = torch.full((b,), ctx, device=DEV, dtype=torch.int32)
    scale = d ** -0.5
    out.append(dict(name="decode_attention b16 x 4096",
                    triton=lambda: attention.decode_attention(q, kc, vc, slots, lens, scale),
                    torch=lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc, scale=scale, enable_gqa=True),
                    compile=None, bytes=2 * kc.numel() * 2, baseline="SDPA",
                    fresh=lambda i: (lambda kc=rnd(b, hkv, ctx, d), vc=rnd(b, hkv, ctx, d), q=rnd(b, hq, d):
                                     attention.decode_attention(q, kc, vc, slots, lens, scale))))
    # Prefill attention: one prompt of 512 to 8192 tokens, causal (SDPA as torch picks its backend;
    # bench/prefill_attention.py times each backend).
    for s in (512, 1024, 4096, 8192):
        kc, vc = rnd(1, hkv, s, d), rnd(1, hkv, s, d)
        qq = rnd(1, s, hq, d)
        zeros = torch.zeros(1, device=DEV, dtype=torch.int32)
        qlen = torch.full((1,), s, device=DEV, dtype=torch.int32)
        qt = qq.transpose(1, 2).contiguous()
        out.append(dict(name=f"prefill_attention {s}",
                        triton=lambda qq=qq, kc=kc, vc=vc, zeros=zeros, qlen=qlen:
                        attention.prefill_attention(qq, kc, vc, zeros, zeros, qlen, scale),
                        torch=lambda qt=qt, kc=kc, vc=vc: F.scaled_dot_product_attention(
                            qt, kc, vc, is_causal=True, scale=scale, enable_gqa=True),
                        compile=None, flops=2 * 2 * s * s * d * hq / 2, baseline="SDPA"))
    # A short chunk after a long cached prefix (a KV hit: 48 new tokens after 1984 reused), keys split
    # across programs (the default) against one key range per query block.
    kc, vc = rnd(1, hkv, 2048, d), rnd(1, hkv, 2048, d)
    qq = rnd(1, 48, hq, d)
    zeros = torch.zeros(1, device=DEV, dtype=torch.int32)
    start, qlen = torch.full((1,), 1984, device=DEV, dtype=torch.int32), torch.full((1,), 48, device=DEV, dtype=torch.int32)
    out.append(dict(name="prefill_attention 48 after 1984",
                    triton=lambda: attention.prefill_attention(qq, kc, vc, zeros, start, qlen, scale),
                    torch=lambda: attention.prefill_attention(qq, kc, vc, zeros, start, qlen, scale, num_splits=1),
                    compile=None, bytes=2 * 2032 * hkv * d * 2, baseline="one key range"))
    # Sampling: batch 64 over a 128256 vocabulary.
    bsz, vocab = 64, 128256
    logits = rnd(bsz, vocab, dtype=torch.float32) * 4
    temp = torch.full((bsz,), 0.8, device=DEV)
    seeds = torch.arange(bsz, device=DEV)
    offs = torch.zeros(bsz, device=DEV, dtype=torch.int64)
    for tag, k, p in (("top-k 50 + top-p 0.9", 50, 0.9), ("top-p 0.9", 0, 0.9), ("top-k 50", 50, 1.0),
                      ("greedy", 1, 1.0)):
        top_k = torch.full((bsz,), k, device=DEV, dtype=torch.int32)
        top_p = torch.full((bsz,), p, device=DEV)
        args = (logits, temp, top_k, top_p, seeds, offs)
        out.append(dict(name=f"sample b64 v128256 {tag}", triton=lambda args=args: sampling.sample(*args),
                        torch=lambda args=args: sampling.sample_ref(*args), compile=sampling.sample_ref,
                        compile_args=args, bytes=logits.numel() * 4, baseline="sort-based ref"))
        if k == 50 and p == 0.9:
            for blk, warps in ((2048, 8), (8192, 16)):  # tile candidates
                out.append(dict(name=f"  sample {tag} block {blk} warps {warps}",
                                triton=lambda args=args, blk=blk, warps=warps: sampling.sample(
                                    *args, block=blk, num_warps=warps),
                                torch=lambda: None, compile=None, bytes=logits.numel() * 4, baseline="-"))
    return out + lora_cases(rnd) + tree_cases(rnd) + vision_cases(rnd) + vocab_cases() + kv_block_cases(rnd)


def kv_block_cases(rnd):
    """A device-tier KV hit's copy (engine/kv_store.py): 31 saved blocks of 64 tokens of the Llama-3.2-1B
    shape from the pool into a cache slot, against torch's gather and copy into the slot's view (the
    store's previous way)."""
    from edgellm.kernels import kv_blocks

    layers, hkv, d, tokens, n = 16, 8, 64, 64, 31
    pool = rnd(64, layers, 2, hkv, tokens, d)
    cache = rnd(layers, 2, 2, hkv, 2080, d)
    places = torch.randperm(64, device=DEV)[:n]
    positions = torch.arange(n, device=DEV)
    table = torch.tensor(kv_blocks.block_table([(p, i, 1) for i, p in enumerate(places.tolist())]),
                         dtype=torch.int32, device=DEV)

    def torch_copy():
        view = cache[:, :, 1, :, :n * tokens].unflatten(3, (n, tokens)).permute(3, 0, 1, 2, 4, 5)
        view.copy_(pool.index_select(0, places))

    # The host tier: the same blocks read by the kernel from pinned host memory across PCIe, against a
    # DMA of them into a device buffer and torch's copy into the slot (its floor is PCIe's, not HBM's).
    host = pool[:n].cpu().pin_memory()
    host_table = torch.tensor(kv_blocks.block_table([(i, i, 1) for i in range(n)]), dtype=torch.int32, device=DEV)
    staging = torch.empty_like(pool[:n])

    def torch_host_copy():
        staging.copy_(host, non_blocking=True)
        cache[:, :, 1, :, :n * tokens].unflatten(3, (n, tokens)).permute(3, 0, 1, 2, 4, 5).copy_(staging)

    return [dict(name=f"kv_blocks to slot {n} x 64 tokens", triton=lambda: kv_blocks.blocks_to_slot(
        pool, cache, table), torch=torch_copy, compile=None, bytes=2 * pool[0].numel() * 2 * n,
        baseline="torch gather + copy"),
        dict(name=f"kv_blocks to slot {n} x 64 tokens from pinned host", triton=lambda: kv_blocks.blocks_to_slot(
            host, cache, host_table), torch=torch_host_copy, compile=None, bytes=pool[0].numel() * 2 * n,
            baseline="DMA + torch copy")]


def vocab_cases():
    """The reduced vocabulary's remap of sampled ids to full ids (one per row of a decode batch, and
    a verify step's 16-node trees at batch 16), against torch's index."""
    from edgellm.kernels import vocab_remap

    table = torch.arange(0, 128256, 8, device=DEV, dtype=torch.int32)  # a 16032-id map
    out = []
    for rows in (16, 256):
        ids = torch.randint(0, table.numel(), (rows,), device=DEV)
        out.append(dict(name=f"vocab_remap {rows} ids", triton=lambda ids=ids: vocab_remap.vocab_remap(ids, table),
                        torch=lambda ids=ids: vocab_remap.vocab_remap_ref(ids, table), compile=None,
                        bytes=rows * (8 + 4 + 8)))
    return out


def tree_cases(rnd):
    """The verify step's kernels (engine/verify.py) at the Llama-3.2-1B shape, batch 1 and 16, trees of
    16 nodes (random trees: about half the nodes branch off earlier ones), against torch written the
    way the step was written before them (vectorised, no host loops)."""
    from edgellm.kernels import kv_compact, tree_accept, tree_attention, tree_step

    hq, hkv, d, hidden, layers, vocab, t = 32, 8, 64, 2048, 16, 128256, 16
    g = torch.Generator().manual_seed(0)
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) if i % 2 else i - 1
                                                 for i in range(1, t)]) for _ in range(16)]).to(DEV, torch.int32)
    out = []

    def torch_walk(par, nodes):  # bits and depth, a level per iteration
        i = torch.arange(t, device=DEV)
        bits = torch.ones_like(par, dtype=torch.int64) << i
        depth = torch.zeros_like(par)
        up = torch.where(i < nodes[:, None], par, -1)
        for _ in range(t):
            has = up >= 0
            bits = bits | torch.where(has, torch.ones_like(bits) << up.clamp(min=0).long(), 0)
            depth = depth + has.int()
            up = torch.where(has, par.gather(1, up.clamp(min=0).long()), -1)
        return bits, depth

    for b in (1, 16):
        tag = f"b{b} T{t}"
        par = parents[:b].contiguous()
        nodes = torch.full((b,), t, device=DEV, dtype=torch.int32)
        tokens = torch.randint(0, vocab, (b, t), device=DEV)
        # Tree attention over a 4096-token context: SDPA with the tree's mask as the baseline.
        ctx = 4096
        kc, vc = rnd(b, hkv, ctx + t, d), rnd(b, hkv, ctx + t, d)
        q = rnd(b, t, hq, d)
        slots = torch.arange(b, device=DEV, dtype=torch.int32)
        starts = torch.full((b,), ctx, device=DEV, dtype=torch.int32)
        bits, _ = torch_walk(par, nodes)
        seen = ((bits[:, :, None] >> torch.arange(t, device=DEV)) & 1).bool()
        mask = torch.cat([torch.ones(b, t, ctx, dtype=torch.bool, device=DEV), seen], -1)[:, None]
        qt = q.transpose(1, 2).contiguous()
        scale = d ** -0.5
        out.append(dict(name=f"tree_attention {tag} x {ctx}",
                        triton=lambda q=q, kc=kc, vc=vc, slots=slots, starts=starts, nodes=nodes, bits=bits:
                        tree_attention.tree_attention(q, kc, vc, slots, starts, nodes, bits, scale),
                        torch=lambda qt=qt, kc=kc, vc=vc, mask=mask: F.scaled_dot_product_attention(
                            qt, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True),
                        compile=None, bytes=2 * kc.numel() * 2, baseline="SDPA + mask"))
        # The step's inputs: trees, masks, positions, offsets and embeddings from the packed rows.
        packed = torch.cat([tokens, par.long(), nodes.long()[:, None]], 1).contiguous()
        roots = tokens[:, 0].clone()
        lengths = torch.full((b + 1,), ctx, device=DEV, dtype=torch.int32)
        offsets = torch.zeros(b, device=DEV, dtype=torch.int64)
        embed = rnd(vocab, hidden)

        def torch_inputs(packed=packed, roots=roots, lengths=lengths, slots=slots, offsets=offsets, embed=embed):
            toks = packed[:, :t].clone()
            toks[:, 0] = roots
            par_ = packed[:, t:2 * t].int()
            n = packed[:, 2 * t].int()
            st = lengths[slots.long()]
            bits_, depth = torch_walk(par_, n)
            return toks, par_, n, st, bits_, st[:, None] + depth, (offsets[:, None] + depth + 1).view(-1), \
                F.embedding(toks, embed)

        out.append(dict(name=f"tree_inputs {tag}",
                        triton=lambda packed=packed, roots=roots, lengths=lengths, slots=slots, offsets=offsets,
                        embed=embed, b=b: tree_step.tree_inputs(packed, roots, lengths, slots, offsets, embed, b),
                        torch=torch_inputs, compile=None, bytes=2 * b * t * hidden * 2, baseline="torch ops"))
        # Acceptance: the target's tokens equal the drafts on a random half of the nodes.
        targets = torch.where(torch.rand(b, t, device=DEV) < 0.5, tokens.roll(-1, 1), 0)

        def torch_accept(tokens=tokens, par=par, targets=targets, b=b):
            cur = torch.zeros(b, dtype=torch.int64, device=DEV)
            count = torch.zeros(b, dtype=torch.int64, device=DEV)
            for _ in range(1, t):
                want = targets.gather(1, cur[:, None])
                match = (par.long() == cur[:, None]) & (tokens == want)
                match[:, 0] = False
                nxt = torch.where(match, torch.arange(t, device=DEV), t).min(1).values
                found = nxt < t
                cur = torch.where(found, nxt, cur)
                count += found
            return cur, count

        out.append(dict(name=f"accept_tree {tag}",
                        triton=lambda tokens=tokens, par=par, nodes=nodes, targets=targets:
                        tree_accept.accept_tree(tokens, par, nodes, targets),
                        torch=torch_accept, compile=None, bytes=b * t * 8 * 3, baseline="torch ops"))
        # KV compaction of a 15-node path in every layer's cache.
        cache = rnd(layers, 2, b + 1, hkv, ctx + t, d)
        path = torch.arange(t, device=DEV, dtype=torch.int32).flip(0).expand(b, t).contiguous()  # worst case: all move
        path[:, 0] = 0
        count = torch.full((b,), t - 1, device=DEV, dtype=torch.int32)
        moved = layers * 2 * b * hkv * (t - 1) * d * 2

        def torch_compact(cache=cache, path=path, b=b):
            src = ctx + path.long()  # [b, t]
            for i in range(b):
                cache[:, :, i, :, ctx:ctx + t] = cache[:, :, i, :, src[i]]

        out.append(dict(name=f"kv_compact {tag} x {layers} layers",
                        triton=lambda cache=cache, slots=slots, starts=starts, path=path, count=count:
                        kv_compact.kv_compact(cache, slots, starts, path, count),
                        torch=torch_compact, compile=None, bytes=2 * moved, baseline="torch index copy"))
        # The step's bookkeeping after acceptance.
        outs = torch.randint(0, vocab, (b, t), device=DEV)
        last = torch.zeros(b, device=DEV, dtype=torch.int64)
        result = torch.zeros(b, t + 1, device=DEV, dtype=torch.int64)
        cnt = torch.randint(0, t, (b,), device=DEV, dtype=torch.int32)

        def torch_commit(cnt=cnt, outs=outs, starts=starts, slots=slots, lengths=lengths, offsets=offsets,
                         last=last, result=result):
            lengths[slots.long()] = starts + cnt + 1
            offsets.add_(cnt + 1)
            last.copy_(outs.gather(1, cnt[:, None].long())[:, 0])
            result[:, :t].copy_(outs)
            result[:, t].copy_(cnt)

        out.append(dict(name=f"tree_commit {tag}",
                        triton=lambda cnt=cnt, outs=outs, starts=starts, slots=slots, lengths=lengths, offsets=offsets,
                        last=last, result=result, b=b: tree_step.tree_commit(cnt, outs, starts, slots, lengths, offsets,
                                                                        last, result, b),
                        torch=torch_commit, compile=None, bytes=b * t * 8 * 2, baseline="torch ops"))
        # The target's token at every node: sampling settings shared by each tree (group=T).
        logits = rnd(b * t, vocab, dtype=torch.float32) * 4
        temp = torch.full((b,), 0.8, device=DEV)
        top_k = torch.full((b,), 50, device=DEV, dtype=torch.int32)
        top_p = torch.full((b,), 0.9, device=DEV)
        seeds = torch.arange(b, device=DEV)
        node_offsets = torch.arange(b * t, device=DEV)
        args = (logits, temp, top_k, top_p, seeds, node_offsets)
        out.append(dict(name=f"sample grouped {tag} v{vocab} top-k 50 + top-p 0.9",
                        triton=lambda args=args: sampling.sample(*args, group=t),
                        torch=lambda args=args: sampling.sample_ref(*args, group=t), compile=None,
                        bytes=logits.numel() * 4, baseline="sort-based ref"))
    return out


def lora_cases(rnd):
    """LoRA at decode sizes (rank 16, Llama-3.2-1B shape): each producer kernel with the next
    projection's shrink fused in, against the same kernel plus a separate lora_shrink launch; the
    GEMV with its LoRA epilogue against the plain GEMV. Floors: the bytes each reads and writes."""
    out = []
    hidden, ffn, hq, hkv, d, rank, slots = 2048, 8192, 32, 8, 64, 16, 4
    for b in (1, 16):
        tag = f"b{b}"
        index = torch.tensor([i % slots for i in range(b)], device=DEV, dtype=torch.int32)
        used = lora.used_slots(index.tolist(), slots, DEV)
        a_qkv, a_o, a_down = rnd(slots, 3 * rank, hidden), rnd(slots, rank, hq * d), rnd(slots, rank, ffn)
        a_bytes = lambda a: min(b, slots) * a[0].numel() * 2  # noqa: E731 - the adapters' A rows read
        x, r, w = rnd(b, hidden), rnd(b, hidden), rnd(hidden)
        out.append(dict(name=f"add_rms_norm+qkv shrink {tag}",
                        triton=lambda x=x, r=r, w=w, a=a_qkv, i=index, u=used:
                        rms_norm.add_rms_norm(x, r, w, 1e-5, lora_a=(a, i, u)),
                        torch=lambda x=x, r=r, w=w, a=a_qkv, i=index, u=used:
                        lora.lora_shrink(rms_norm.add_rms_norm(x, r, w, 1e-5)[0], a, i, u),
                        compile=None, bytes=4 * x.numel() * 2 + a_bytes(a_qkv), baseline="unfused"))
        gu = rnd(b, 2 * ffn)
        out.append(dict(name=f"glu+down shrink {tag}",
                        triton=lambda gu=gu, a=a_down, i=index, u=used: glu.glu(gu, lora_a=(a, i, u)),
                        torch=lambda gu=gu, a=a_down, i=index, u=used: lora.lora_shrink(glu.glu(gu), a, i, u),
                        compile=None, bytes=3 * b * ffn * 2 + a_bytes(a_down), baseline="unfused"))
        ctx = 1024
        kc, vc, q = rnd(b, hkv, ctx, d), rnd(b, hkv, ctx, d), rnd(b, hq, d)
        kv_slots = torch.arange(b, device=DEV, dtype=torch.int32)
        lens = torch.full((b,), ctx, device=DEV, dtype=torch.int32)
        out.append(dict(name=f"decode_attention+o shrink {tag} x {ctx}",
                        triton=lambda q=q, kc=kc, vc=vc, s=kv_slots, n=lens, a=a_o, i=index, u=used:
                        attention.decode_attention(q, kc, vc, s, n, d ** -0.5, lora_a=(a, i, u)),
                        torch=lambda q=q, kc=kc, vc=vc, s=kv_slots, n=lens, a=a_o, i=index, u=used: lora.lora_shrink(
                            attention.decode_attention(q, kc, vc, s, n, d ** -0.5).reshape(len(i), -1), a, i, u),
                        compile=None, bytes=2 * kc.numel() * 2 + a_bytes(a_o), baseline="unfused"))
        ones = torch.ones(slots, device=DEV)
        for proj, n, k, segments, splits in (("qkv", (hq + 2 * hkv) * d, hidden, (hq * d, hkv * d, hkv * d), 8),
                                             ("o", hidden, hq * d, (hidden,), hq), ("gate_up", 2 * ffn, hidden,
                                             (ffn, ffn), 8), ("down", hidden, ffn, (hidden,), 8)):
            wt, bt, xk = rnd(n, k), rnd(slots, n, rank), (x if k == hidden else rnd(b, k))
            spec = (rnd(splits, b, len(segments) * rank, dtype=torch.float32), bt, index, used, ones, segments)
            out.append(dict(name=f"gemv {proj}+LoRA {tag}",
                            triton=lambda x=xk, wt=wt, spec=spec: gemv.gemv(x, wt, lora=spec),
                            torch=lambda x=xk, wt=wt: gemv.gemv(x, wt), compile=None, bytes=wt.numel() * 2,
                            baseline="no LoRA", fresh=lambda i, x=xk, spec=spec, n=n, k=k: (
                                lambda wt=rnd(n, k): gemv.gemv(x, wt, lora=spec))))
            out.append(dict(name=f"  gemv {proj} {tag} without LoRA", triton=lambda x=xk, wt=wt: gemv.gemv(x, wt),
                            torch=lambda x=xk, wt=wt: F.linear(x, wt), compile=None, bytes=wt.numel() * 2,
                            baseline="cuBLAS", fresh=lambda i, x=xk, n=n, k=k: (lambda wt=rnd(n, k): gemv.gemv(x, wt))))
    return out


def vision_cases(rnd):
    """The vision encoders' kernels at the Qwen2.5-VL-3B vision shape on a 1280x720 image (4784 patches,
    width 1280, 16 heads of 80, MLP 3420), against what transformers runs: torch's LayerNorm and GELU,
    SDPA over the whole image, and SDPA called once per 64-patch window (its non-flash path)."""
    import torch.nn.functional as F

    from edgellm.kernels import activation, layer_norm, rope_append, segment_attention

    n, width, heads, d, inner = 4784, 1280, 16, 80, 3420
    out = []
    x, w, b = rnd(n, width), rnd(width), rnd(width)
    out.append(dict(name="layer_norm vit 4784x1280", triton=lambda: layer_norm.layer_norm(x, w, b, 1e-6),
                    torch=lambda: F.layer_norm(x, (width,), w, b, 1e-6), compile=None, bytes=2 * x.numel() * 2,
                    baseline="F.layer_norm"))
    h = rnd(n, inner)
    out.append(dict(name="activation gelu 4784x3420", triton=lambda: activation.activation(h, "gelu"),
                    torch=lambda: F.gelu(h), compile=None, bytes=2 * h.numel() * 2, baseline="F.gelu"))
    qkv = rnd(n, 3, heads, d)
    q, k, v = qkv.unbind(1)
    scale = d ** -0.5
    full, longest = segment_attention.segment_bounds([0, n], DEV)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],  # noqa: E731
                                                          v.transpose(0, 1)[None], scale=scale)
    out.append(dict(name="segment_attention full 4784", triton=lambda: segment_attention.segment_attention(
        q, k, v, full, scale, longest), torch=lambda: sdpa(q, k, v), compile=None, flops=4 * n * n * d * heads,
        baseline="SDPA"))
    # Tile candidates (default: (64, 32, 4, 2) at head_dim 80 padded to 128; (64, 64, 4, 2) at 64).
    tiles = [(64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 2)]
    for tile in tiles:
        out.append(dict(name=f"  segment_attention full 4784 tile {tile}", triton=lambda tile=tile:
                        segment_attention.segment_attention(q, k, v, full, scale, longest, tile=tile),
                        torch=lambda: None, compile=None, flops=4 * n * n * d * heads, baseline="-"))
    # InternVL3-1B's tower: 9 tiles of 1025 tokens (a 1280x720 image), 16 heads of 64.
    tq = rnd(9 * 1025, 3, 16, 64)
    iq, ik, iv = tq.unbind(1)
    tile_bounds, tile_longest = segment_attention.segment_bounds(list(range(0, 9 * 1025 + 1, 1025)), DEV)
    batched = lambda: F.scaled_dot_product_attention(  # noqa: E731
        *(t.view(9, 1025, 16, 64).transpose(1, 2) for t in (iq, ik, iv)), scale=0.125)
    out.append(dict(name="segment_attention tiles 9x1025 d64", triton=lambda: segment_attention.segment_attention(
        iq, ik, iv, tile_bounds, 0.125, tile_longest), torch=batched, compile=None, flops=4 * 9 * 1025 ** 2 * 64 * 16,
        baseline="SDPA batched"))
    for tile in tiles:
        out.append(dict(name=f"  segment_attention tiles 9x1025 tile {tile}", triton=lambda tile=tile:
                        segment_attention.segment_attention(iq, ik, iv, tile_bounds, 0.125, tile_longest, tile=tile),
                        torch=lambda: None, compile=None, flops=4 * 9 * 1025 ** 2 * 64 * 16, baseline="-"))
    cu = list(range(0, n, 64)) + [n]
    windows, longest_w = segment_attention.segment_bounds(cu, DEV)

    def per_window():
        for lo, hi in zip(cu[:-1], cu[1:]):
            sdpa(q[lo:hi], k[lo:hi], v[lo:hi])

    out.append(dict(name="segment_attention windows 64", triton=lambda: segment_attention.segment_attention(
        q, k, v, windows, scale, longest_w), torch=per_window, compile=None, flops=4 * n * 64 * d * heads,
        baseline="SDPA per window"))
    # Multimodal RoPE + KV append, a 1196-token prompt at the Qwen2.5-VL-3B text shape (16 / 2 heads of 128).
    t, hq, hkv, hd = 1196, 16, 2, 128
    qq, kk, vv = rnd(1, t, hq, hd), rnd(1, t, hkv, hd), rnd(1, t, hkv, hd)
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(hd, 1e6).to(DEV), 4096)
    kc = torch.zeros(2, hkv, 4096, hd, dtype=HALF, device=DEV)
    vc = torch.zeros_like(kc)
    pos = torch.randint(0, 1000, (1, t, 3), device=DEV, dtype=torch.int32)
    z = torch.zeros(1, device=DEV, dtype=torch.int32)
    lens = torch.full((1,), t, device=DEV, dtype=torch.int32)
    args = (qq, kk, vv, cos, sin, kc, vc, z, z, lens, pos)
    out.append(dict(name="rope_kv_append mrope 1196", triton=lambda: rope_append.rope_kv_append(
        *args, sections=(16, 24, 24)), torch=lambda: rope_append.rope_kv_append_ref(*args, sections=(16, 24, 24)),
        compile=None, bytes=2 * (qq.numel() + 2 * kk.numel()) * 2))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains one of these (comma-separated)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    rows = []
    for case in cases():
        if args.only and not any(part in case["name"] for part in args.only.split(",")):
            continue
        try:
            t_triton = bench_us(case["triton"])
        except Exception as exc:  # noqa: BLE001 - a tile candidate that does not fit (shared memory, registers)
            print(f"  {case['name']}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", file=sys.stderr)
            continue
        t_graph = graph_us(case["triton"])
        t_stream = streamed_us(case["fresh"], case["bytes"]) if "fresh" in case and case["bytes"] > 2 ** 20 else None
        t_torch = bench_us(case["torch"])
        # Both sides replayed from CUDA graphs, as the engine runs them: no Python launch cost on either
        # (at 512 tokens the Triton attention's eager launch took 3x its GPU time; issue 19).
        t_torch_graph = graph_us(case["torch"]) if t_graph is not None and case.get("baseline") != "-" else None
        t_compiled = None
        if case.get("compile") is not None and not args.no_compile:
            fn = compiled(case["compile"])
            if fn is not None:
                try:
                    fn(*case["compile_args"])
                    t_compiled = bench_us(lambda fn=fn, a=case["compile_args"]: fn(*a))
                except Exception as exc:  # noqa: BLE001
                    print(f"  torch.compile failed for {case['name']}: {type(exc).__name__}", file=sys.stderr)
        if "bytes" in case:
            floor = case["bytes"] / bandwidth * 1e6
        else:
            floor = case["flops"] / rate * 1e6
        row = dict(name=case["name"], triton_us=t_triton, graph_us=t_graph, streamed_us=t_stream,
                   torch_us=t_torch, compiled_us=t_compiled,
                   floor_us=floor, pct_of_floor=100 * floor / t_triton,
                   streamed_pct_of_floor=100 * floor / t_stream if t_stream else None,
                   speedup_vs_torch=t_torch / t_triton, torch_graph_us=t_torch_graph,
                   speedup_in_graphs=t_torch_graph / t_graph if t_torch_graph and t_graph else None,
                   baseline=case.get("baseline", "torch ref"))
        rows.append(row)
        print(f"  {row['name']:<36s} {t_triton:9.1f} us", file=sys.stderr, flush=True)
    meta = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=__import__("triton").__version__, python=platform.python_version(),
                commit=os.environ.get("EDGELLM_COMMIT", "unknown"), copy_TBps=bandwidth / 1e12,
                bf16_mm_TFLOPs=rate / 1e12)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  copy {meta['copy_TBps']:.2f} TB/s  "
          f"bf16 mm {meta['bf16_mm_TFLOPs']:.0f} TFLOP/s  commit {meta['commit']}")
    print(f"{'kernel':<36s} {'triton us':>10s} {'graph us':>9s} {'torch us':>10s} {'compile us':>10s} {'floor us':>9s} "
          f"{'% floor':>8s} {'stream us':>9s} {'%':>4s} {'x torch':>8s} {'x graphs':>8s}  baseline")
    for r in rows:
        comp = f"{r['compiled_us']:10.1f}" if r["compiled_us"] else f"{'-':>10s}"
        graph = f"{r['graph_us']:9.1f}" if r["graph_us"] else f"{'-':>9s}"
        stream = (f"{r['streamed_us']:8.1f} {r['streamed_pct_of_floor']:4.0f}%" if r["streamed_us"]
                  else f"{'-':>8s} {'-':>5s}")
        in_graphs = f"{r['speedup_in_graphs']:7.2f}x" if r["speedup_in_graphs"] else f"{'-':>8s}"
        print(f"{r['name']:<36s} {r['triton_us']:10.1f} {graph} {r['torch_us']:10.1f} {comp} {r['floor_us']:9.1f} "
              f"{r['pct_of_floor']:7.0f}% {stream} {r['speedup_vs_torch']:7.1f}x {in_graphs}  {r['baseline']}")
    if ANCHORS.is_file():
        anchors = json.loads(ANCHORS.read_text())["kernels_torch"]
        print(f"peer figures (H100, 2026-11-22): sort top-k/top-p b64 {anchors['sort_topk_topp_sampling_b64_v128256_us']} us, "
              f"SDPA decode b16x4096 {anchors['sdpa_decode_b16_L4096_hq32_hkv8_d64_us']} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
