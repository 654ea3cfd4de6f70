"""A draft model proposes: a smaller model with the same tokenizer, run by its own LLMEngineRunner
(own KV cache, own CUDA graphs), guesses the next k tokens greedily.

Per row the draft keeps its cache in step with the text: `valid` positions of its slot hold the
text's first tokens, `pending` are tokens the target accepted that the draft has not read yet.
Each proposal reads the pending tokens and guesses k tokens greedily: k decode steps when one token
is pending (the usual case), else a prefill chunk of the pending tokens after the cached prefix and
k - 1 decode steps (the fast path: graphs, no host sync until the end); with
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
    costly = True  # each proposal runs the draft model k times (speculative/session.py backs off sooner)

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
        # Per row, by its slot (the draft's cache slot is the row's slot in the model's cache):
        self.valid: dict[int, int] = {}
        self.pending: dict[int, list[int]] = {}
        self.chains: dict[int, list[int]] = {}  # the proposed chain's tokens whose K/V the draft holds
        self._decoding: list[int] | None = None  # the slots of the draft's started decode batch

    def _greedy_steps(self, tokens, slots: list[int], steps: int, lengths: list[int] | None = None) -> list[torch.Tensor]:
        """`steps` greedy decode steps of the draft from `tokens` (one per row, appended first, at
        `lengths` if given): the top_k choices after each, [n, top_k] on the device. The draft's decode
        batch stays started between proposals; the same rows again only get new tokens and lengths."""
        runner, device = self.runner, self.runner.device
        if self._decoding != slots:  # greedy rows on these slots (their tokens and lengths come next)
            n = len(slots)
            zeros = torch.zeros(n, dtype=torch.int64, device=device)
            runner.start_decode(zeros, slots, torch.zeros(n, device=device), torch.ones(n, dtype=torch.int32, device=device),
                                torch.ones(n, device=device), zeros, zeros)
            self._decoding = list(slots)
        runner.restart_decode_rows(tokens, lengths)
        best = []
        for _ in range(steps):
            runner.decode_sample_step()
            best.append(runner.full_ids(runner.decode_logits().topk(self.top_k, dim=-1).indices))
        return best

    def begin(self, prompts: list[list[int]]) -> None:
        """Rows (slots) 0 .. n-1 start from these prompts, prefilled into the draft's cache together;
        every other row is forgotten."""
        self.runner.end_decode()
        self._decoding = None
        self.valid, self.pending, self.chains = {}, {}, {}
        self._prefill_rows(list(range(len(prompts))), prompts)

    def begin_row(self, slot: int, prompt: list[int]) -> None:
        """One row starts (the engine loop: a sequence that just joined, in its slot)."""
        self._prefill_rows([slot], [prompt])

    def end_row(self, slot: int) -> None:
        for state in (self.valid, self.pending, self.chains):
            state.pop(slot, None)

    def _prefill_rows(self, slots: list[int], prompts: list[list[int]]) -> None:
        runner = self.runner
        ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.int64)
        for i, prompt in enumerate(prompts):
            ids[i, :len(prompt)] = torch.tensor(prompt)
        runner.prefill_step(runner.embed(ids.to(runner.device)), [len(p) for p in prompts], slots=slots)
        for slot, prompt in zip(slots, prompts):
            self.valid[slot], self.pending[slot], self.chains[slot] = len(prompt), [], []

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
        runner = self.runner
        slots = [row for _, row, _ in chosen]
        pending = [self.pending[row] for row in slots]
        depth = min(self.k, max(limit for _, _, limit in chosen))
        n = len(slots)
        if all(len(tokens) == 1 for tokens in pending):
            # The usual case: one pending token per row, read by the first of `depth` decode steps
            # (no prefill chunk), after setting the draft's lengths back to the valid prefix.
            best = self._greedy_steps([tokens[0] for tokens in pending], slots, depth, [self.valid[row] for row in slots])
        else:
            ids = torch.zeros(n, max(map(len, pending)), dtype=torch.int64)
            for i, tokens in enumerate(pending):
                ids[i, :len(tokens)] = torch.tensor(tokens)
            cached = [self.valid[row] for row in slots]
            logits = runner.prefill_step(runner.embed(ids.to(runner.device)),
                                         [c + len(p) for c, p in zip(cached, pending)], slots=slots,
                                         cached_lengths=cached)
            # [n, top_k]; column 0 continues the chain
            first = runner.full_ids(logits.topk(self.top_k, dim=-1).indices)
            best = [first] + (self._greedy_steps(first[:, 0], slots, depth - 1) if depth > 1 else [])
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
