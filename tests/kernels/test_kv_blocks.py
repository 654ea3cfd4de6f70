"""kernels/kv_blocks.py: saved KV blocks into cache slots and out again. Against the torch reference (`_ref`)
on fresh random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the interpreter on the
CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import kv_blocks

from kernel_cases import DEVICE, randn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,head_dim", [(4, 16), (8, 48)])
def test_kv_blocks_to_and_from_slots(dtype, tokens, head_dim):
    """Saved blocks into cache slots at scattered block positions (and out again into other places)
    against the references, on caches that start equal; the slots' other positions and the other
    slots stay as they were. The table has room for more entries than its count (as in the prefill
    graph, where a stale tail is left from earlier steps): those are not copied."""

    layers, slots, heads, capacity = 2, 3, 2, 6 * tokens
    pool = randn(5, layers, 2, heads, tokens, head_dim, dtype=dtype, seed=1)
    cache = randn(layers, 2, slots, heads, capacity, head_dim, dtype=dtype, seed=2)
    entries = [(3, 0, 1), (0, 2, 1), (4, 5, 1), (1, 1, 2)]
    stale = [(2, 4, 0)] * 20  # 24 entries of room: more than one SPLIT of programs
    table = torch.tensor(kv_blocks.block_table(entries + stale), dtype=torch.int32, device=DEVICE)
    table[0] = len(entries)
    mine, ref = cache.clone(), cache.clone()
    kv_blocks.blocks_to_slot(pool, mine, table)
    kv_blocks.blocks_to_slot_ref(pool, ref, table)
    assert torch.equal(mine, ref)
    assert torch.equal(mine[:, :, 1, :, 2 * tokens:3 * tokens], pool[0])
    assert torch.equal(mine[:, :, 2, :, tokens:2 * tokens], pool[1])
    assert torch.equal(mine[:, :, 1, :, tokens:2 * tokens], cache[:, :, 1, :, tokens:2 * tokens])
    assert torch.equal(mine[:, :, 0], cache[:, :, 0])  # the stale entries' slot
    per_layer = cache.clone()  # a layer at a time, fewer programs (the host tier's copy beside the layers)
    for layer in range(layers):
        kv_blocks.blocks_to_slot(pool, per_layer, table, layer=layer, split=3)
    assert torch.equal(per_layer, ref)
    out, out_ref = pool.clone(), pool.clone()
    back = torch.tensor(kv_blocks.block_table([(4, 5, 2), (2, 0, 0)]), dtype=torch.int32, device=DEVICE)
    kv_blocks.blocks_from_slot(out, cache, back)
    kv_blocks.blocks_from_slot_ref(out_ref, cache, back)
    assert torch.equal(out, out_ref)
    assert torch.equal(out[4], cache[:, :, 2, :, 5 * tokens:6 * tokens])
    assert torch.equal(out[2], cache[:, :, 0, :, :tokens])
    assert torch.equal(out[1], pool[1])
    with pytest.raises(ValueError, match="kv_blocks"):
        kv_blocks.blocks_to_slot(pool[:, :, :, :1], mine, table)
    with pytest.raises(ValueError, match="block table"):
        kv_blocks.blocks_to_slot(pool, mine, table.long())
