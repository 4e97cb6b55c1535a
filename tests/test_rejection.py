"""Speculative decoding's rejection sampling (worker/spec_decode/rejection.py): greedy
acceptance, exactness of the sampled rule (chi-square against the target distribution, with
a draft distribution that is deliberately wrong), reproducibility, batch independence, and
that it runs inside a (fake) CUDA graph."""
from __future__ import annotations

import pytest
import torch

from fullgraph.worker.cudagraph.fake import FakeGraphRuntime
from fullgraph.worker.sampler import SamplingTensors
from fullgraph.worker.spec_decode import rejection
from fullgraph.worker.spec_decode.rejection import (draft_gumbel_noise, rejection_sample,
                                                    target_probs)

V, K, N, POS = 6, 2, 20000, 50
# chi-square quantile 0.999 with V - 1 = 5 degrees of freedom (scipy.stats.chi2.ppf)
CHI2_999 = {3: 16.266, 5: 20.515}
# the target's logits at the K + 1 slots, and deliberately wrong draft distributions: too
# much mass where the target has little, none at all on some tokens the target likes
TARGET = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0],
                       [-1.0, 0.0, 1.5, 0.5, 0.0, 1.0],
                       [0.0, 0.3, -0.3, 1.2, -1.2, 0.6]])
DRAFT_Q = torch.tensor([[0.02, 0.08, 0.1, 0.3, 0.5, 0.0],
                        [0.6, 0.0, 0.05, 0.05, 0.3, 0.0]])
ARGMAX_DRAFTS = [1, 2]       # what a deterministic drafter proposes at the K slots


def tensors(r, temperature=1.0, top_k=0, top_p=1.0, seeds=None, positions=None,
            min_p=None) -> SamplingTensors:
    return SamplingTensors(
        temperature=torch.full((r,), float(temperature)),
        top_k=torch.full((r,), top_k, dtype=torch.int32), top_p=torch.full((r,), top_p),
        seeds=torch.tensor(list(seeds) if seeds is not None else list(range(r)),
                           dtype=torch.int64),
        positions=torch.tensor(list(positions) if positions is not None else [POS] * r,
                               dtype=torch.int64),
        all_greedy=temperature == 0, any_top_k_top_p=top_k > 0 or top_p < 1.0 or bool(min_p),
        num_logprobs=-1, min_p=None if min_p is None else torch.full((r,), min_p))


def logits_with_argmax(ids: list[list[int]]) -> torch.Tensor:
    """[R, len, V] random logits whose argmax at [r, j] is ids[r][j]."""
    z = torch.randn(len(ids), len(ids[0]), V, generator=torch.Generator().manual_seed(1))
    for r, row in enumerate(ids):
        for j, tok in enumerate(row):
            z[r, j, tok] = z[r, j].max() + 1.0
    return z


# ------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("argmax, accepted, tokens", [
    ([1, 2, 3, 4], 3, [1, 2, 3, 4]),        # every draft matches: drafts + the bonus token
    ([5, 2, 3, 4], 0, [5, -1, -1, -1]),     # the first draft is rejected: the target's token
    ([1, 2, 0, 4], 2, [1, 2, 0, -1]),       # two accepted, the third corrected
])
def test_greedy_takes_the_longest_matching_prefix(argmax, accepted, tokens):
    drafts = torch.tensor([[1, 2, 3]])
    out = rejection_sample(drafts, logits_with_argmax([argmax]), tensors(1, temperature=0))
    assert out.num_accepted.tolist() == [accepted]
    assert out.token_ids.tolist() == [tokens]


def test_greedy_rows_are_independent_and_draft_probs_do_not_matter():
    drafts = torch.tensor([[1, 2, 3], [4, 4, 4], [0, 1, 2]])
    z = logits_with_argmax([[1, 2, 3, 5], [4, 0, 4, 4], [3, 1, 2, 0]])
    q = torch.softmax(torch.randn(3, 3, V), -1)
    out = rejection_sample(drafts, z, tensors(3, temperature=0), q)
    assert out.num_accepted.tolist() == [3, 1, 0]
    assert out.token_ids.tolist() == [[1, 2, 3, 5], [4, 0, -1, -1], [3, -1, -1, -1]]
    for i in range(3):
        alone = rejection_sample(drafts[i:i + 1], z[i:i + 1], tensors(1, temperature=0))
        assert alone.token_ids.tolist() == out.token_ids[i:i + 1].tolist()


def test_greedy_rows_among_sampled_ones_equal_an_all_greedy_step():
    """The all-greedy path (fewer kernels in a graph) and the general path's greedy rows
    agree, rows with fewer drafts (-1) included."""
    drafts = torch.tensor([[1, 2, 3], [1, 2, -1], [4, -1, -1], [0, 0, 0]])
    z = logits_with_argmax([[1, 2, 3, 5], [1, 2, 0, 4], [4, 0, 4, 4], [3, 1, 2, 0]])
    greedy = rejection_sample(drafts, z, tensors(4, temperature=0))
    assert greedy.num_accepted.tolist() == [3, 2, 1, 0]
    assert greedy.token_ids.tolist() == [[1, 2, 3, 5], [1, 2, 0, -1], [4, 0, -1, -1],
                                         [3, -1, -1, -1]]
    mixed = tensors(5, temperature=1.0)
    mixed.temperature[:4] = 0.0                      # the last row samples: general path
    out = rejection_sample(torch.cat([drafts, drafts[:1]]), torch.cat([z, z[:1]]), mixed)
    assert out.token_ids[:4].tolist() == greedy.token_ids.tolist()
    assert out.num_accepted[:4].tolist() == greedy.num_accepted.tolist()


# ------------------------------------------------------------------------------ sampled
def draw_drafts(q: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """[N, K] drafts drawn from q ([K, V], the same for every row) with the drafter's stream,
    as a drafter would: Gumbel-max over log q at each draft's position."""
    cols = []
    for j in range(q.shape[0]):
        noise = draft_gumbel_noise(seeds, torch.full_like(seeds, POS + j), V)
        cols.append((q[j].log()[None, :] + noise).argmax(-1))
    return torch.stack(cols, dim=1)


def chi_square(tokens: torch.Tensor, p: torch.Tensor) -> float:
    """Pearson's statistic of the observed tokens against p (over p's support)."""
    observed = torch.bincount(tokens, minlength=V).double()
    support = p > 0
    assert observed[~support].sum() == 0, "a token outside the target's support"
    expected = p.double() * tokens.numel()
    return float(((observed - expected)[support] ** 2 / expected[support]).sum())


def speculate(temperature=1.0, top_k=0, deterministic=False):
    """N requests verifying K drafts against TARGET: (output, the target's p per slot)."""
    t = tensors(N, temperature=temperature, top_k=top_k)
    z = TARGET[None].expand(N, -1, -1)
    if deterministic:          # an argmax drafter: the same tokens for every request
        drafts = torch.tensor(ARGMAX_DRAFTS)[None].expand(N, -1)
        out = rejection_sample(drafts, z, t)
    else:
        drafts = draw_drafts(DRAFT_Q, t.seeds)
        out = rejection_sample(drafts, z, t, DRAFT_Q[None].expand(N, -1, -1))
    p = target_probs(TARGET, tensors(K + 1, temperature=temperature, top_k=top_k))
    return out, p


def chi_squares(out, p) -> list[float]:
    """Per slot j, the emitted token's statistic among the rows that emit one there (slot j
    is emitted exactly when the first j drafts were accepted)."""
    stats = []
    for j in range(K + 1):
        rows = out.num_accepted >= j
        assert rows.sum() > 500             # enough draws to test every slot
        stats.append(chi_square(out.token_ids[rows, j], p[j]))
    return stats


@pytest.mark.parametrize("temperature, top_k, deterministic", [
    (1.0, 0, False), (0.7, 4, False), (1.0, 0, True)])
def test_sampled_tokens_follow_the_target_distribution(temperature, top_k, deterministic):
    out, p = speculate(temperature, top_k, deterministic)
    df = int((p[0] > 0).sum()) - 1
    for stat in chi_squares(out, p):
        assert stat < CHI2_999[df]
    # draft 0 is accepted with probability sum_x min(p(x), q(x))
    q0 = torch.nn.functional.one_hot(torch.tensor(ARGMAX_DRAFTS[0]), V).float() \
        if deterministic else DRAFT_Q[0]
    rate = (out.num_accepted >= 1).float().mean().item()
    assert abs(rate - torch.minimum(p[0], q0).sum().item()) < 0.015


def test_the_check_fails_without_the_correction(monkeypatch):
    """The test above has power: drawing a rejected slot from p instead of max(p - q, 0)
    over-weights what the draft proposes, and drawing the drafts with the target's own noise
    couples draft and correction; the statistic catches both."""
    monkeypatch.setattr(rejection, "residual_distribution", lambda p, q: p)
    assert chi_squares(*speculate())[0] > 10 * CHI2_999[5]
    monkeypatch.undo()
    monkeypatch.setattr(rejection, "DRAFT_STREAM", 0)
    assert chi_squares(*speculate())[0] > 10 * CHI2_999[5]


def test_an_exact_drafter_is_always_accepted():
    p = target_probs(TARGET, tensors(K + 1))
    t = tensors(2000)
    drafts = draw_drafts(p[:K], t.seeds)
    out = rejection_sample(drafts, TARGET[None].expand(2000, -1, -1), t,
                           p[None, :K].expand(2000, -1, -1))
    assert out.num_accepted.eq(K).all()
    assert torch.equal(out.token_ids[:, :K], drafts)


def test_reproducible_and_independent_of_the_batch():
    r = 16
    t = tensors(r, seeds=range(100, 100 + r), positions=range(r))
    z = torch.randn(r, K + 1, V, generator=torch.Generator().manual_seed(3))
    q = torch.softmax(torch.randn(r, K, V, generator=torch.Generator().manual_seed(4)), -1)
    drafts = torch.randint(0, V, (r, K), generator=torch.Generator().manual_seed(5))
    t.temperature[::3] = 0.0                    # greedy rows mixed in
    out = rejection_sample(drafts, z, t, q)
    again = rejection_sample(drafts, z, t, q)
    assert torch.equal(out.token_ids, again.token_ids)
    for i in range(r):
        one = tensors(1, temperature=t.temperature[i].item(), seeds=[100 + i], positions=[i])
        alone = rejection_sample(drafts[i:i + 1], z[i:i + 1], one, q[i:i + 1])
        assert torch.equal(alone.token_ids[0], out.token_ids[i])


def test_runs_in_a_graph_without_host_syncs():
    """Captured on one step's inputs, replayed on another's: the replay equals eager."""
    r = 8
    gen = torch.Generator().manual_seed(6)
    t = tensors(r, seeds=range(r), positions=range(r), top_k=4)
    drafts = torch.zeros(r, K, dtype=torch.int64)
    z, q = torch.zeros(r, K + 1, V), torch.full((r, K, V), 1.0 / V)
    graph, out = FakeGraphRuntime().capture(lambda: rejection_sample(drafts, z, t, q))
    drafts.copy_(torch.randint(0, V, (r, K), generator=gen))
    z.copy_(torch.randn(r, K + 1, V, generator=gen))
    q.copy_(torch.softmax(torch.randn(r, K, V, generator=gen), -1))
    t.seeds.add_(1000)
    t.positions.add_(7)
    FakeGraphRuntime().replay(graph)
    eager = rejection_sample(drafts, z, t, q)
    assert torch.equal(out.token_ids, eager.token_ids)
    assert torch.equal(out.num_accepted, eager.num_accepted)
