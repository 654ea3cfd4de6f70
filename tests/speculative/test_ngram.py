"""The n-gram proposer, the draft trees it builds and the per-row back-off, on the host (no model)."""

from edgellm.speculative.ngram import NgramIndex, NgramProposer
from edgellm.speculative.session import RowBackoff
from edgellm.speculative.tree import DraftTree


def index_of(tokens, window=3):
    index = NgramIndex(window)
    index.extend(tokens)
    return index


def test_the_longest_match_wins_and_the_most_recent_occurrence_comes_first():
    # "1 2 3" occurred followed by 4, later "9 2 3" followed by 5: the text ends "1 2 3", so the
    # trigram (one occurrence) beats the bigram "2 3" (two, the later one followed by 5).
    text = [1, 2, 3, 4, 6, 9, 2, 3, 5, 7, 1, 2, 3]
    assert index_of(text).continuations(2, 4) == [[4, 6]]
    assert index_of(text, window=2).continuations(2, 4) == [[5, 7], [4, 6]]


def test_branches_have_distinct_first_tokens_and_are_capped():
    text = [8, 1, 8, 2, 8, 1, 8, 3, 8]
    assert index_of(text, window=1).continuations(1, 4) == [[3], [1], [2]]
    assert index_of(text, window=1).continuations(1, 2) == [[3], [1]]


def test_a_copy_that_reaches_the_end_repeats_its_period():
    # The text loops "5 6 7": the match ends one period back, and the copy keeps looping.
    assert index_of([1, 5, 6, 7, 5, 6, 7]).continuations(7, 1) == [[5, 6, 7, 5, 6, 7, 5]]
    assert index_of([4, 4, 4]).continuations(5, 1) == [[4, 4, 4, 4, 4]]


def test_nothing_matches_in_new_text():
    assert index_of([1, 2, 3, 4]).continuations(5, 4) == []


def test_proposals_merge_into_a_tree_within_the_limit():
    proposer = NgramProposer(window=1, candidates=3, branches=4)
    proposer.begin([[8, 1, 2, 8, 5, 3, 8]])
    tree = proposer.propose([0], [4])[0]
    # Two continuations of 8, the most recent first; the second is cut at 4 drafts.
    assert tree.tokens == [0, 5, 3, 8, 1] and tree.parents == [-1, 0, 1, 2, 0] and tree.drafts == 4
    assert proposer.propose([0], [0]) == [None]
    proposer.extend(0, [1, 2])
    assert proposer.propose([0], [2])[0].tokens == [0, 8, 5]


def test_draft_tree_shares_prefixes():
    tree = DraftTree()
    tree.add_branch([1, 2, 3], 10)
    tree.add_branch([1, 2, 4], 10)
    tree.add_branch([5], 10)
    assert tree.tokens == [0, 1, 2, 3, 4, 5] and tree.parents == [-1, 0, 1, 2, 2, 0]


def test_backoff_waits_longer_after_each_run_of_failures_and_resets_on_success():
    backoff = RowBackoff(patience=2, max_wait=4)
    pattern = []
    for _ in range(14):
        allowed = backoff.allows()
        pattern.append(allowed)
        if allowed:
            backoff.update(0)
    # two failures, wait 1; two failures, wait 2; two failures, wait 4; then capped at 4
    assert pattern == [True, True, False, True, True, False, False, True, True] + [False] * 4 + [True]
    backoff.update(3)
    assert backoff.allows() and backoff.penalty == 1


def test_sitting_out_and_passing_steps_follow_the_same_wait_as_limit():
    """The engine loop runs a row's plain steps ahead while sits_out says it proposes nothing, spending
    its wait with pass_step: the steps it sits out are the ones limit() would have refused."""
    from edgellm.speculative.session import Speculation

    class Cheap:
        def begin(self, prompts):
            pass

        def extend(self, row, tokens):
            pass

    by_limit, by_pass = Speculation(Cheap(), [[5]], 4, adaptive=True), Speculation(Cheap(), [[5]], 4, adaptive=True)
    refused, sat_out = [], []
    for spec, record in ((by_limit, refused), (by_pass, sat_out)):
        for _ in range(20):
            if spec is by_pass and spec.sits_out(0):
                spec.pass_step(0)
                record.append(False)
                continue
            allowed = spec.limit(0, 100) > 0
            record.append(allowed)
            if allowed:
                spec.backoff[0].update(0)  # (every draft rejected)
    assert refused == sat_out and refused.count(False) >= 5


def test_a_costly_proposer_probes_with_one_token_until_trusted_and_gives_up_if_never_right():
    from edgellm.speculative.session import Speculation

    class Costly:  # proposes the same chain of 3 whatever the row's text
        costly = True

        def begin(self, prompts):
            pass

        def extend(self, row, tokens):
            pass

        def propose(self, rows, limits):
            trees = []
            for limit in limits:
                tree = DraftTree()
                tree.add_branch([1, 2, 3], limit)
                trees.append(tree if limit else None)
            return trees

    def run(accept_at):
        spec = Speculation(Costly(), [[5]], max_drafts=8, adaptive=True)
        spec.start([6])
        sizes = []
        for step in range(120):
            trees = spec.propose([0], [1000])
            sizes.append(trees[0].drafts if trees else 0)
            if trees is None:
                spec.record([0], [[7]])
            elif step in accept_at:
                spec.record([0], [[1, 7]], trees, [1])
            else:
                spec.record([0], [[7]], trees, [0])
        return {i: n for i, n in enumerate(sizes) if n}

    # Never right: probes of one token at steps 0, 2 and 7, then nothing for the rest of the request.
    assert run(()) == {0: 1, 2: 1, 7: 1}
    # Right once: full proposals until a failure, then probes backing off 1, 4, 16, 64 steps.
    assert run((2,)) == {0: 1, 2: 1, 3: 3, 5: 1, 10: 1, 27: 1, 92: 1}
