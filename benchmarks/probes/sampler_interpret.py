"""The sampler's Triton kernels under Triton's interpreter (CPU) against worker/sampler.py's
torch spec: thresholds, draws, processing, logprobs, count updates. Run with Triton installed
(no GPU needed); tests/test_sampling_interpret.py runs it when Triton is importable.

    TRITON_INTERPRET=1 python benchmarks/probes/sampler_interpret.py [--candidates 8]

--candidates shrinks the fast resolution's buffer so that most rows take the exact
whole-row search instead (the fallback path); --sort-sizes below it make rows sort their
candidates in each of the resolution's three block sizes; a --draw-block below the
vocabulary (with few --draw-programs) makes the drawing pass skip blocks.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import triton.language as tl  # noqa: E402

from fullgraph.layers import sampling as K  # noqa: E402
from fullgraph.worker import sampler as S  # noqa: E402


def rows(vocab: int, gen: torch.Generator):
    """Logits rows with the cases that matter: peaked, flat, ties, -inf entries, bf16."""
    r = []
    for scale in (0.5, 2.0, 4.0, 8.0):
        r.append(torch.randn(vocab, generator=gen) * scale)
    r.append(torch.zeros(vocab))                                   # all tied
    tied = torch.randn(vocab, generator=gen).round()                # few distinct values
    r.append(tied)
    masked = torch.randn(vocab, generator=gen) * 3
    masked[torch.rand(vocab, generator=gen) < 0.5] = float("-inf")
    r.append(masked)
    r.append((torch.randn(vocab, generator=gen) * 3).to(torch.bfloat16).float())
    return torch.stack(r)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=K.CANDIDATES)
    ap.add_argument("--vocab", type=int, default=700)
    ap.add_argument("--sort-sizes", type=int, nargs=2, default=K.SORT_SIZES,
                    help="the resolution's smaller sort blocks (below --candidates: rows then "
                         "take each of the three blocks)")
    ap.add_argument("--draw-block", type=int, default=K.DRAW_BLOCK,
                    help="the drawing pass's block (below the vocabulary: a slice scans "
                         "several, and blocks that cannot win skip their noise)")
    ap.add_argument("--draw-programs", type=int, default=K.TARGET_PROGRAMS)
    args = ap.parse_args()
    K.DRAW_BLOCK, K.TARGET_PROGRAMS = args.draw_block, args.draw_programs
    K.CANDIDATES = args.candidates
    K._CAND = tl.constexpr(args.candidates)
    K._SORT_SMALL, K._SORT_MID = (tl.constexpr(n) for n in args.sort_sizes)
    gen = torch.Generator().manual_seed(0)
    base = rows(args.vocab, gen)
    params = [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.3, 20, 0.8, 0.0),
              (0.6, 0, 1.0, 0.1), (1.0, 3, 0.5, 0.05), (2.0, 0, 0.3, 0.0), (1.0, 400, 0.99, 0.0)]
    x, tt, kk, pp, mm = [], [], [], [], []
    for b in base:
        for t, k, p, m in params:
            x.append(b)
            tt.append(t)
            kk.append(k)
            pp.append(p)
            mm.append(m)
    x = torch.stack(x)
    n = x.shape[0]
    temp, top_k = torch.tensor(tt), torch.tensor(kk, dtype=torch.int32)
    top_p, min_p = torch.tensor(pp), torch.tensor(mm)
    seeds = torch.randint(-2 ** 62, 2 ** 62, (n,), generator=gen)
    pos = torch.randint(0, 2 ** 31, (n,), generator=gen)
    failures = 0

    thr = K.filter_thresholds(x, temp, top_k, top_p, min_p)
    ref = S.filter_thresholds(S.scale(x, temp), top_k, top_p, min_p)
    bad = (thr != ref).nonzero().flatten().tolist()
    print(f"thresholds: {n - len(bad)}/{n} equal")
    for i in bad:
        print("  row", i, "params", tt[i], kk[i], pp[i], mm[i], "kernel", thr[i].item(),
              "ref", ref[i].item())
    failures += len(bad)

    t = S.SamplingTensors(temp, top_k, top_p, seeds, pos, False, True, -1, min_p=min_p)
    tokens = torch.empty(n, dtype=torch.int64)
    K.draw(x, temp, seeds, pos, thr, tokens)
    want = S.sample_reference(x, t, S.SamplerFeatures(sample=True, filter=True))
    mism = (tokens != want).sum().item()
    print(f"draws: {n - mism}/{n} equal")
    failures += mism

    greedy = torch.zeros(n)
    K.draw(x, greedy, seeds, pos, None, tokens)
    mism = (tokens != x.argmax(-1)).sum().item()
    print(f"greedy: {n - mism}/{n} equal")
    failures += mism

    # processing: penalties, bias, banned tokens
    v = args.vocab
    state = S.SamplingState.allocate(4, v, "cpu", max_logit_bias=8)
    state.reset_slot(0, prompt_token_ids=[1, 2, 3, 50], output_token_ids=[7, 7, 9],
                     repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2,
                     logit_bias={7: 2.5, 11: -1.0, 2: 0.5})
    state.reset_slot(1, allowed_token_ids=list(range(0, v, 3)), bad_token_ids=[6])
    state.reset_slot(2, prompt_token_ids=[5], repetition_penalty=0.8, logit_bias={5: 1.0})
    state.reset_slot(3, prompt_token_ids=[4] * 10, min_tokens=3, stop_token_ids=[0, 8, 9],
                     logit_bias={8: 3.0}, frequency_penalty=0.1)
    slots = torch.tensor([0, 1, 2, -1, 0, 3, 3] + [-1] * (n - 7), dtype=torch.int32)
    ppos = pos.clone()
    ppos[5], ppos[6] = 12, 13                      # still under min_tokens, then past it
    got = K.process(x, state, slots, ppos)
    want = S.process_logits(x, state, slots, ppos)
    same = torch.equal(got, want)
    print("process:", "equal" if same else f"differ {(got != want).sum().item()}")
    failures += not same

    counts0 = state.output_counts.clone()
    K.update_counts(state, slots, torch.arange(n))
    expect = counts0.clone()
    S.update_counts(S.SamplingState(expect, *[getattr(state, f) for f in
                                              S.SamplingState.__slots__[1:]]),
                    slots, torch.arange(n))
    same = torch.equal(state.output_counts, expect)
    print("update_counts:", "equal" if same else "differ")
    failures += not same

    for nlp in (0, 3):
        rowlp = torch.where(torch.arange(n) % 3 == 0, -1, nlp).to(torch.int32)
        lp, ids, ranks = K.logprobs(x, want_tok := x.argmax(-1), nlp, rowlp)
        rlp, rids, rranks = S.compute_logprobs(x, want_tok, nlp)
        use = rowlp >= 0
        ok = (torch.allclose(lp[use], rlp[use], atol=1e-5, rtol=1e-5)
              and torch.equal(ids[use], rids[use]) and torch.equal(ranks[use], rranks[use]))
        print(f"logprobs n={nlp}:", "equal" if ok else "differ")
        failures += not ok
    # the whole chain (worker/sampler.py wraps what it returns into a SamplerOutput)
    t3 = S.SamplingTensors(temp, top_k, top_p, seeds, pos, False, True, 3, min_p=min_p)
    feats = S.SamplerFeatures(sample=True, filter=True, logprobs=True)
    tokens, lp = K.sample(x, t3, feats, None)
    want = S.sample_reference(x, t3, feats)
    rlp, rids, rranks = S.compute_logprobs(x, want, 3)
    ok = (torch.equal(tokens, want) and torch.allclose(lp[0], rlp, atol=1e-5, rtol=1e-5)
          and torch.equal(lp[1], rids) and torch.equal(lp[2], rranks))
    print("sample chain:", "equal" if ok else "differ")
    failures += not ok
    print("FAILURES", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
