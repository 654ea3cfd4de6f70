"""What the kernel tests share: the device (CUDA where there is a GPU, else the CPU under the Triton
interpreter, set in conftest), the dtypes and tolerances, and random inputs."""

import random

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# The interpreter computes in numpy, which has no bfloat16: bfloat16 is checked on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def cache_with_lengths(lengths, hkv, capacity, head_dim, dtype, seed=0):
    k_cache = randn(len(lengths) + 1, hkv, capacity, head_dim, dtype=dtype, seed=seed)
    v_cache = randn(len(lengths) + 1, hkv, capacity, head_dim, dtype=dtype, seed=seed + 1)
    return k_cache, v_cache


def fused_shrink_case(rows, k, gr, seed=5):
    """An A stack of three adapters and an index with rows on adapters 2, none, 0, 2, ... (rows of
    the decode batches the fused LoRA shrinks serve)."""
    from edgellm.kernels import lora

    a_stack = randn(3, gr, k, seed=seed) * 0.3
    slots = [(2, -1, 0)[i % 3] for i in range(rows)]
    index = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    return a_stack, index, lora.used_slots(slots, 3, DEVICE)


def check_fused_shrink(t, t_ref, index, dtype):
    has = index >= 0
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(t.sum(0)[has], t_ref.sum(0)[has], **tol)
    assert t_ref.sum(0)[has].abs().max() > 0.1  # a real product, not zeros on both sides


def random_trees(batch, t, seed, vocab=12):
    """parents [B, T] (parent before child, node 0 the root), n_nodes [B], tokens [B, T] with
    distinct tokens among siblings."""
    rng = random.Random(seed)
    parents = torch.full((batch, t), -1, dtype=torch.int32)
    tokens = torch.zeros(batch, t, dtype=torch.int64)
    nodes = torch.tensor([rng.randint(1, t) for _ in range(batch)], dtype=torch.int32)
    for b in range(batch):
        used = {}
        for i in range(1, t):
            parent = rng.randrange(i) if rng.random() < 0.7 else i - 1
            free = [x for x in range(vocab) if x not in used.setdefault(parent, set())]
            token = rng.choice(free) if free else 0
            used[parent].add(token)
            parents[b, i], tokens[b, i] = parent, token
    return parents.to(DEVICE), nodes.to(DEVICE), tokens.to(DEVICE)
