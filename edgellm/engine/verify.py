"""Speculative verification on the runner: a token tree per row through the model in one forward.

Each row of the running decode batch brings a tree of candidate tokens: node 0 is the row's last
token (the input a plain decode step would take), the others are drafts, each after its parent. One
forward over all nodes (kernels/tree_mask.py: node i sees the context, its ancestors and itself, and
is rotated at the row's length plus its depth) gives logits at every node; the step then picks the
target's token at every node with the row's sampling settings (kernels/sampling.py, at the RNG
offsets plain decoding would use for that depth), walks the tree along those choices
(kernels/tree_accept.py), moves the accepted nodes' K/V into consecutive positions
(kernels/kv_compact.py) and advances the row by the accepted drafts plus one. So every step yields
at least the token plain decoding would have produced, and with the same seed exactly the tokens
plain decoding produces.

`verify_sample_step` is the fast path: static buffers (graphs.py TreeBuffers beside the batch's
DecodeBuffers) and a CUDA graph per VerifyKey (padded batch size, tree size bucket, LoRA on/off),
captured with the batch's decode graph. `tree_decode_step` / `commit_tree_path` are the seeds' eager
logits-out form (executeEagleBaseTreeDecodingStep): verification and acceptance left to the caller.
TreeSteps receives the engine's state, adapters and graph registry, and each call the running
batch's DecodeBuffers (decode_steps.py); it owns the tree buffers.
"""

from __future__ import annotations

import torch

from ..errors import InvalidRequestError
from ..kernels import ops
from ..kernels.tree_mask import MAX_TREE, mask_to_bits
from .adapters import Adapters
from .graphs import DecodeBuffers, StepGraphs, TreeBuffers, VerifyKey, graph_batch_sizes
from .model import TokenTree
from .state import EngineState


def tree_buckets(max_verify_tokens: int) -> list[int]:
    """Tree sizes (nodes, the root included) that get verify graphs: 2, 4, 8, ... and the maximum."""
    return graph_batch_sizes(max_verify_tokens)[1:] if max_verify_tokens > 1 else []


class TreeSteps:
    def __init__(self, state: EngineState, adapters: Adapters, graphs: StepGraphs, max_verify_tokens: int):
        self.state, self.adapters, self.graphs = state, adapters, graphs
        self.max_verify_tokens = max_verify_tokens  # nodes per tree, the root included; 0: no verify steps
        self.trees: dict[tuple[int, int], TreeBuffers] = {}  # by (padded batch size, tree nodes)

    # ---- the seeds' form: logits out, acceptance by the caller ----

    def tree_decode_step(self, inputs_embeds: torch.Tensor, tree_mask: torch.Tensor, slots=None,
                         lora=None) -> torch.Tensor:
        """Run a token tree per row after the rows' cached tokens: inputs_embeds [B, T, hidden] (node 0
        first; each node after its parent), tree_mask [B, T, T] (node i sees node j: its ancestors and
        itself). Writes the nodes' K/V at positions length .. length + T - 1 of each row's slot without
        advancing its length, and returns the logits of every node, [B, T, vocab] float32. Follow with
        commit_tree_path() to keep a path."""
        batch, nodes, hidden = inputs_embeds.shape
        state = self.state
        mask = torch.as_tensor(tree_mask).to(state.device).bool()
        if hidden != state.config.hidden_size or mask.shape != (batch, nodes, nodes) or not 1 <= nodes <= MAX_TREE:
            raise InvalidRequestError(f"tree_decode_step: inputs_embeds [B, T, {state.config.hidden_size}] and "
                                      f"tree_mask [B, T, T] with 1 <= T <= {MAX_TREE}")
        eye = torch.eye(nodes, dtype=torch.bool, device=state.device)
        if not (mask[:, eye].all() and not mask.triu(1).any()):
            raise InvalidRequestError("tree_decode_step: tree_mask must see each node itself and no later node")
        slot_ids = state.slots(slots, batch)
        lora = self.adapters.batch_of(self.adapters.rows(lora, batch))
        starts = state.kv_cache.lengths[slot_ids.long()]
        positions = starts[:, None] + mask.sum(-1) - 1  # depth = ancestors
        q_lens = torch.full((batch,), nodes, dtype=torch.int32, device=state.device)
        return state.forward(inputs_embeds.to(state.dtype), slot_ids, starts, q_lens, lora=lora,
                             tree=TokenTree(mask_to_bits(mask), positions), every_token=True)

    def commit_tree_path(self, path, accepted, slots=None) -> None:
        """Keep the path path[b, :accepted[b] + 1] (node indices, path[b, 0] = 0) of the last
        tree_decode_step in each row's cache, in consecutive positions; the row grows by accepted + 1."""
        state = self.state
        path = torch.as_tensor(path, dtype=torch.int32).to(state.device)
        accepted = torch.as_tensor(accepted, dtype=torch.int32).to(state.device)
        slot_ids = state.slots(slots, path.shape[0])
        starts = state.kv_cache.lengths[slot_ids.long()]
        ops.kv_compact(state.kv_cache.data, slot_ids, starts, path, accepted)
        state.kv_cache.lengths[slot_ids.long()] = starts + accepted + 1

    # ---- the fast path: the running decode batch, sampling and acceptance inside the step ----

    def verify_sample_step(self, buf: DecodeBuffers, tokens, parents, n_nodes) -> tuple[torch.Tensor, torch.Tensor]:
        """One speculative step of the running batch `buf`. Per row: a tree of n_nodes[i] nodes,
        tokens [n, T] (column 0, the root, is the row's last token and is ignored), parents [n, T]
        (parents[i, 0] = -1, parents[i, j] < j). The caller keeps each row's length + n_nodes within
        the KV cache capacity. Returns (new tokens [n, T'], count [n]): row i got new tokens
        [:count[i] + 1] (views of static buffers, overwritten by the next step; T' >= T)."""
        tokens = torch.as_tensor(tokens, dtype=torch.int64).cpu()
        parents = torch.as_tensor(parents, dtype=torch.int32).cpu()
        n_nodes = torch.as_tensor(n_nodes, dtype=torch.int32).cpu()
        n, width = tokens.shape
        if n != buf.live_rows or parents.shape != (n, width) or n_nodes.shape != (n,):
            raise InvalidRequestError(f"verify_sample_step: tokens and parents [{buf.live_rows}, T], "
                                      f"n_nodes [{buf.live_rows}]")
        order = torch.arange(width, dtype=torch.int32)
        bad = (order[None, 1:] < n_nodes[:, None]) & ((parents[:, 1:] >= order[1:]) | (parents[:, 1:] < 0))
        if (n_nodes < 1).any() or (n_nodes > width).any() or (parents[:, 0] != -1).any() or bad.any():
            raise InvalidRequestError("verify_sample_step: parents[:, 0] must be -1 and 0 <= parents[:, j] < j "
                                      "for the nodes j < n_nodes; 1 <= n_nodes <= T")
        result = self.verify_sample_trees(buf, [(t[:k], p[:k]) for t, p, k in
                                                zip(tokens.tolist(), parents.tolist(), n_nodes.tolist())])
        return result[:, :-1], result[:, -1]

    def verify_sample_trees(self, buf: DecodeBuffers, trees: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """verify_sample_step for trees given as (tokens, parents) lists per row, node 0 first (what the
        runtime's proposers build; not checked beyond their size). Returns [n, T' + 1] int64 on the
        device: row i's new tokens in [:count + 1] and count (accepted drafts) in its last column."""
        width = max(len(tokens) for tokens, _ in trees)
        if len(trees) != buf.live_rows or not 1 <= width <= self.max_verify_tokens:
            raise InvalidRequestError(f"verify_sample_step: {buf.live_rows} trees of 1 to max_verify_tokens="
                                      f"{self.max_verify_tokens} nodes")
        nodes = next(size for size in tree_buckets(self.max_verify_tokens) if size >= width) if width > 1 else 2
        tree = self._tree_buffers(buf.size, nodes)
        rows = [tokens + [0] * (nodes - len(tokens)) + parents + [-1] * (nodes - len(tokens)) + [len(tokens)]
                for tokens, parents in trees]
        rows += [[0] * nodes + [-1] * nodes + [1]] * (buf.size - len(trees))
        tree.packed.copy_(torch.tensor(rows, dtype=torch.int64))  # the step's one copy to the device
        graph = self.graphs.get(VerifyKey(buf.size, nodes, buf.uses_lora))
        if graph is not None:
            graph.replay()
        else:
            self._verify_body(buf, tree, buf.uses_lora)
        return tree.result[:len(trees)]

    def _tree_buffers(self, size: int, nodes: int) -> TreeBuffers:
        if (size, nodes) not in self.trees:
            self.trees[size, nodes] = TreeBuffers(size, nodes, self.state.device)
        return self.trees[size, nodes]

    def _verify_body(self, buf: DecodeBuffers, tree: TreeBuffers, uses_lora: bool) -> None:
        """One verify step on `buf` and `tree`, device work only: what a graph captures."""
        state = self.state
        cache, scratch = state.kv_cache, state.kv_cache.scratch_slot
        size, nodes = buf.size, tree.nodes
        inputs = ops.tree_inputs(tree.packed, buf.tokens, cache.lengths, buf.slots, buf.offsets, state.weights.embed,
                                 scratch)
        logits = state.forward(inputs.embeds, buf.slots, inputs.starts, inputs.n_nodes,
                               lora=self.adapters.batch(buf.lora, buf.lora_used, uses_lora),
                               tree=TokenTree(inputs.bits, inputs.positions), every_token=True)
        # The target's token at every node, drawn as plain decoding would draw it at that depth.
        targets = state.sample(logits.view(size * nodes, -1), buf.temperature, buf.top_k, buf.top_p, buf.seeds,
                               inputs.offsets, group=nodes)
        path, count, out = ops.accept_tree(inputs.tokens, inputs.parents, inputs.n_nodes, targets.view(size, nodes))
        ops.kv_compact(cache.data, buf.slots, inputs.starts, path, count)
        ops.tree_commit(count, out, inputs.starts, buf.slots, cache.lengths, buf.offsets, buf.tokens, tree.result, scratch)
        tree.logits = logits  # kept alive: pool memory a replay writes must not go to a later capture

    def capture_graphs(self, buf: DecodeBuffers, uses_lora: bool) -> None:
        """Capture the verify graphs of `buf`'s size, every tree bucket (with its decode graph, while
        every row of `buf` is padding: the captures touch only the scratch slot)."""
        for nodes in tree_buckets(self.max_verify_tokens):
            key = VerifyKey(buf.size, nodes, uses_lora)
            if self.graphs.get(key) is None:
                tree = self._tree_buffers(buf.size, nodes)  # fresh buffers hold bare roots
                self.graphs.capture(key, lambda: self._verify_body(buf, tree, uses_lora))
