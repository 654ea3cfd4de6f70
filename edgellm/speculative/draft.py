"""A draft model proposes: a smaller model with the same tokenizer, run by its own LLMEngineRunner
(own KV cache, own CUDA graphs), guesses the next k tokens greedily.

Per row the draft keeps its cache in step with the text: `valid` positions of its slot hold the
text's first tokens, `pending` are tokens the target accepted that the draft has not read yet.
Each proposal reads the pending tokens (one prefill chunk after the cached prefix), takes its argmax,
then k - 1 greedy decode steps (the fast path: graphs, no host sync until the end); with
draft_top_k > 1 the next best tokens at every depth become sibling leaves of the chain. The chain
tokens the target then accepts already have their K/V in the draft's cache, so only the rest is
pending next time. The draft runs without LoRA adapters, whatever the rows use.
"""

from __future__ import annotations

import torch

from ..engine.runner import LLMEngineRunner
from ..errors import ConfigurationError
from .tree import DraftTree


class DraftModelProposer:
    def __init__(self, config, target: LLMEngineRunner):
        cfg = target.config
        self.runner = LLMEngineRunner(
            config.draft_model, device=target.device, dtype=target.dtype, max_batch_size=cfg.max_supported_batch_size,
            max_input_length=cfg.max_kv_cache_capacity, max_kv_cache_capacity=cfg.max_kv_cache_capacity,
            cuda_graphs=target.graphs.enabled, prefill_chunk_size=target.prefill_chunk_size, max_lora_rank=0)
        draft = self.runner.config
        for name in ("vocab_size", "bos_token_id", "eos_token_ids"):
            if getattr(draft, name) != getattr(cfg, name):
                raise ConfigurationError(
                    f"draft model {config.draft_model} has {name} {getattr(draft, name)!r}, the model "
                    f"{getattr(cfg, name)!r}: a draft must share the model's tokenizer")
        self.k = config.num_speculative_tokens
        self.top_k = config.draft_top_k
        self.valid: list[int] = []
        self.pending: list[list[int]] = []
        self.chains: list[list[int]] = []  # per row: the proposed chain's tokens whose K/V the draft holds

    def begin(self, prompts: list[list[int]]) -> None:
        runner = self.runner
        ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.int64)
        for i, prompt in enumerate(prompts):
            ids[i, :len(prompt)] = torch.tensor(prompt)
        runner.prefill_step(runner.embed(ids.to(runner.device)), [len(p) for p in prompts])
        self.valid = [len(p) for p in prompts]
        self.pending = [[] for _ in prompts]
        self.chains = [[] for _ in prompts]

    def extend(self, row: int, tokens: list[int]) -> None:
        chain = self.chains[row]
        matched = 0
        while matched < min(len(chain), len(tokens)) and chain[matched] == tokens[matched]:
            matched += 1
        self.valid[row] += matched
        self.pending[row] += tokens[matched:]
        self.chains[row] = []

    def propose(self, rows: list[int], limits: list[int]) -> list[DraftTree | None]:
        chosen = [(k, row, limit) for k, (row, limit) in enumerate(zip(rows, limits)) if limit > 0]
        trees: list[DraftTree | None] = [None] * len(rows)
        if not chosen:
            return trees
        runner, device = self.runner, self.runner.device
        slots = [row for _, row, _ in chosen]
        pending = [self.pending[row] for row in slots]
        ids = torch.zeros(len(slots), max(map(len, pending)), dtype=torch.int64)
        for i, tokens in enumerate(pending):
            ids[i, :len(tokens)] = torch.tensor(tokens)
        cached = [self.valid[row] for row in slots]
        logits = runner.prefill_step(runner.embed(ids.to(device)), [c + len(p) for c, p in zip(cached, pending)],
                                     slots=slots, cached_lengths=cached)
        depth = min(self.k, max(limit for _, _, limit in chosen))
        best = [logits.topk(self.top_k, dim=-1).indices]  # [n, top_k] per depth; column 0 is the chain
        if depth > 1:
            n = len(slots)
            zeros = torch.zeros(n, device=device)
            runner.start_decode(best[0][:, 0], slots, zeros, torch.ones(n, dtype=torch.int32, device=device),
                                torch.ones(n, device=device), torch.zeros(n, dtype=torch.int64, device=device),
                                torch.zeros(n, dtype=torch.int64, device=device))
            try:
                for _ in range(depth - 1):
                    runner.decode_sample_step()
                    best.append(runner.decode_logits().topk(self.top_k, dim=-1).indices)
            finally:
                runner.end_decode()
        choices = torch.stack(best, dim=1).tolist()  # [n, depth, top_k]: the one sync
        for i, (k, row, limit) in enumerate(chosen):
            self.valid[row] += len(self.pending[row])
            self.pending[row] = []
            chain = [choices[i][d][0] for d in range(min(depth, limit))]
            self.chains[row] = chain[:-1]  # the last chain token was never fed to the draft
            tree = DraftTree()
            tree.add_branch(chain, limit)
            for d in range(len(chain)):  # siblings: the draft's next choices at each depth
                for alternative in choices[i][d][1:]:
                    tree.add_branch(chain[:d] + [alternative], limit)
            trees[k] = tree
        return trees
