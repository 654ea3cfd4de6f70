"""Probe (issue 18, host-tier KV hits): can the block-copy kernel read pinned host memory itself, how
fast, and does a per-layer copy on a side stream hide behind a 48-token prefill's layers, inside a
CUDA graph? Llama-3.2-1B KV shape: 16 layers, 8 KV heads, head_dim 64, 31 blocks of 64 tokens.

Run on a CUDA GPU:  python bench/probe_host_blocks.py
"""
import torch

from edgellm.kernels import kv_blocks


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2] * 1e3  # us


def main():
    layers, heads, hd, tokens, blocks = 16, 8, 64, 64, 31
    dev = torch.device("cuda")
    host = torch.randn(32, layers, 2, heads, tokens, hd, dtype=torch.float16).pin_memory()
    cache = torch.zeros(layers, 2, 2, heads, 2048 + 64, hd, dtype=torch.float16, device=dev)
    table = torch.tensor(kv_blocks.block_table([(i, i, 1) for i in range(blocks)]), dtype=torch.int32, device=dev)
    mb = blocks * host[0].nbytes / 1e6
    rows = []
    for split in (16, 8, 4, 2):
        us = timed(lambda: kv_blocks.blocks_to_slot(host, cache, table, split=split))
        rows.append((f"zero-copy all layers split {split}", us, mb / us * 1e3))
    ref = cache.clone()
    cache.zero_()
    kv_blocks.blocks_to_slot(host, cache, table)
    kv_blocks.blocks_to_slot_ref(host, ref, table)
    torch.cuda.synchronize()
    print("zero-copy equals ref:", torch.equal(cache, ref))
    staging = torch.empty(blocks, *host.shape[1:], dtype=host.dtype, device=dev)
    us = timed(lambda: staging.copy_(host[:blocks], non_blocking=True))
    rows.append(("DMA of the 31 blocks (one copy)", us, mb / us * 1e3))
    for split in (16, 4):
        us = timed(lambda: [kv_blocks.blocks_to_slot(host, cache, table, layer=l, split=split) for l in range(layers)])
        rows.append((f"zero-copy 16 per-layer launches split {split}", us, mb / us * 1e3))

    # A stand-in for a 48-token prefill layer: its four GEMMs (qkv, o, gate_up, down).
    x = torch.randn(48, 2048, dtype=torch.float16, device=dev)
    w = [torch.randn(2048, 3072, dtype=torch.float16, device=dev), torch.randn(2048, 2048, dtype=torch.float16, device=dev),
         torch.randn(2048, 16384, dtype=torch.float16, device=dev), torch.randn(8192, 2048, dtype=torch.float16, device=dev)]
    keys = cache[0, 0, 1, 0, :2048]

    def layer_compute():
        a = x @ w[0]
        b = x @ w[1]
        c = x @ w[2]
        return (c[:, :8192] @ w[3]) + b + a[:, :2048]

    side = torch.cuda.Stream()
    events = [torch.cuda.Event() for _ in range(layers)]

    def forward(copy: str, split=4):
        main = torch.cuda.current_stream()
        if copy == "overlap":
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for l in range(layers):
                    kv_blocks.blocks_to_slot(host, cache, table, layer=l, split=split)
                    events[l].record(side)
        elif copy == "serial":
            kv_blocks.blocks_to_slot(host, cache, table, split=16)
        out = x
        for l in range(layers):
            out = layer_compute()
            if copy == "overlap":
                main.wait_event(events[l])
            out = out + keys[:48].sum()  # "attention" reads the layer's keys
        if copy == "overlap":
            main.wait_stream(side)
        return out

    for copy, split in (("none", 0), ("serial", 16), ("overlap", 4), ("overlap", 8), ("overlap", 16), ("overlap", 2)):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            forward(copy, split)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward(copy, split)
        us = timed(graph.replay)
        rows.append((f"graph: 16 layers' GEMMs, copy {copy} split {split}", us, 0.0))
    cache.zero_()
    graph.replay()
    torch.cuda.synchronize()
    print("graph overlap copy equals ref:", torch.equal(cache, ref))
    print(f"{'case':52s} {'us':>9s} {'GB/s':>7s}")
    for name, us, gbs in rows:
        print(f"{name:52s} {us:9.1f} {gbs:7.1f}")


if __name__ == "__main__":
    main()
