"""The engine loop's step for a batch with speculating rows (serving/engine_loop.py): drafts proposed per
request, one verify step for the whole batch, each row's accepted tokens handed to its sequence."""

from __future__ import annotations

import time

from .launched import Launched


def speculative_step(loop) -> None:
    """A step of a batch with speculating rows: each such row's drafts (its request's proposer, up to
    its tokens left and the tree limit) verified in one step for the whole batch (rows without a
    tree take a bare root: their plain decode token), or a plain step where no row proposes."""
    while loop._in_flight:  # (the drafts follow from every token so far)
        loop._take(loop._in_flight.popleft())
    runner = loop.runner
    rows = list(loop.batch)
    if runner.needs_rows_each_step:
        runner.prepare_decode_rows([s.slot for s in rows], [s.prompt for s in rows], [s.row.ids for s in rows],
                                   [s.adapter for s in rows])
    groups: dict = {}  # a request's Speculation -> its rows' batch indices
    for i, seq in enumerate(rows):
        if seq.spec is not None and not seq.done:
            groups.setdefault(seq.spec, []).append(i)
    # Each row's draft limit from its request's back-off, then one proposal per proposer (the
    # runtime's one: a draft model proposes for every row in one batch of its own steps).
    wanted: dict = {}  # proposer -> (batch indices, slots, limits)
    for spec, index in groups.items():
        for i in index:
            seq = rows[i]
            left = min(seq.max_new - len(seq.row.ids),
                       runner.max_tree_drafts(len(seq.prompt), len(seq.prompt) + len(seq.row.ids)))
            entry = wanted.setdefault(spec.proposer, ([], [], []))
            entry[0].append(i)
            entry[1].append(seq.slot)
            entry[2].append(spec.limit(seq.spec_row, left))
    trees = [None] * len(rows)
    for proposer, (index, slots, limits) in wanted.items():
        if any(limit > 0 for limit in limits):
            began = time.perf_counter()
            for i, tree in zip(index, proposer.propose(slots, limits)):
                trees[i] = tree
            share = (time.perf_counter() - began) * 1e3 / len(index)
            for i in index:
                rows[i].spec.stats.propose_ms += share
    proposing = {spec for spec, index in groups.items() if any(trees[i] is not None for i in index)}
    if not proposing:
        loop.step_counts["decode"] += 1
        loop._take(Launched(rows, runner.decode_launch()))
        return
    loop.step_counts["verify"] += 1
    host = runner.verify_sample_trees([(t.tokens, t.parents) if t is not None else ([0], [-1])
                                       for t in trees]).tolist()  # one copy to the host
    accepted = [row[-1] for row in host]
    tokens = [row[:n + 1] for row, n in zip(host, accepted)]
    for spec, index in groups.items():
        if spec in proposing:
            spec.record([rows[i].spec_row for i in index], [tokens[i] for i in index],
                        [trees[i] for i in index], [accepted[i] for i in index])
        else:
            spec.record([rows[i].spec_row for i in index], [tokens[i] for i in index])
    for seq, new in zip(rows, tokens):
        if not seq.done:
            seq.offset += len(new)
            loop._advance(seq, new)
