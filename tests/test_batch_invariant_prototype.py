"""Prototype needle tests for the batch-invariant mode (issue 24, docs/batch_invariance.md).

The library does not wire the mode in yet: these tests swap the CPU reference kernels of
fullgraph/layers/batch_invariant.py into a tiny Qwen3 engine with monkeypatch (the op
functions and methods the model, runner and sampler call), then check what the issue asks:
a prompt's tokens and logprobs are the same bits alone and at a random place among random
prompts, under several `max_num_batched_tokens`, greedy and seeded; with a prefix-cache
hit; with n > 1; generation == scoring. The inverse tests run the same comparisons with
today's ops and find a difference, so the needle comparisons can fail.
"""
from __future__ import annotations

import functools
import random

import pytest
import torch

from fullgraph import LLM
from fullgraph.layers import batch_invariant as bi
from fullgraph.layers.gdn.reference import chunk_gated_delta_rule_ref
from fullgraph.sampling_params import SamplingParams

# Small tiles and splits so that the short test prompts cross several of each.
POLICY = bi.KernelPolicy(batch_invariant=True, matmul_block_rows=16, attention_tile=16,
                         attention_split=64)
VOCAB = 740              # tiny-qwen3's tokenizer has 749 tokens
MAX_SEQS = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These engines run many small CPU ops, each an OpenMP region; while another process
    (a parallel test run) holds the cores, the regions' barrier waits made this module 35x
    slower (353 s instead of 10 s on 2 cores). With one thread it takes the same time
    either way, and every comparison here, the inverse ones included, comes out the same
    (checked at both thread counts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def use_invariant_ops(monkeypatch, policy: bi.KernelPolicy = POLICY) -> None:
    """Route tiny Qwen3's ops through the invariant kernels, as the design would: the loader
    stamps the policy on the model's modules, whose forwards (and the fused-op functions
    given the module) read it; the runner builds the mode's attention backend; the sampler's
    logprobs come from the invariant log-softmax."""
    from fullgraph.layers import linear as linear_mod
    from fullgraph.models import qwen3
    from fullgraph.worker import model_runner, sampler

    load = model_runner.load_model
    monkeypatch.setattr(model_runner, "load_model",
                        lambda cfg, device: bi.apply_kernel_policy(load(cfg, device), policy))
    monkeypatch.setattr(linear_mod.Linear, "forward", bi.linear_forward)
    monkeypatch.setattr(linear_mod.MergedLinear, "forward", bi.linear_forward)
    monkeypatch.setattr(qwen3, "norm_linear", bi.norm_linear)
    monkeypatch.setattr(qwen3, "silu_mul_linear", bi.silu_mul_linear)
    monkeypatch.setattr(qwen3.Qwen3ForCausalLM, "compute_logits", bi.compute_logits)
    backend = type("Backend", (bi.InvariantAttentionBackend,), {"policy": policy})
    monkeypatch.setattr(model_runner, "get_backend_class", lambda name: backend)
    monkeypatch.setattr(sampler, "compute_logprobs",
                        functools.partial(bi.compute_logprobs, policy=policy))


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


NEEDLE = tokens(random.Random(7), 100)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, seed=1234, max_tokens=8, logprobs=5, ignore_eos=True)


def completions(llm: LLM, needles: list[tuple[list[int], SamplingParams]], num_others: int,
                seed: int) -> list:
    """Generate `needles` at random places among `num_others` random prompts (each with
    its own random sampling); the needles' outputs, in order."""
    rng = random.Random(seed)
    prompts = [({"prompt_token_ids": tokens(rng, rng.randrange(5, 120))},
                SamplingParams(temperature=rng.choice([0.0, 0.7]), seed=rng.randrange(1 << 30),
                               max_tokens=rng.randrange(1, 12), logprobs=rng.choice([None, 2]),
                               ignore_eos=True))
               for _ in range(num_others)]
    for ids, params in needles:
        prompts.insert(rng.randrange(len(prompts) + 1), ({"prompt_token_ids": ids}, params))
    # found by their SamplingParams objects (a later insertion shifts an earlier needle)
    wanted = [next(i for i, (_, sp) in enumerate(prompts) if sp is params)
              for _, params in needles]
    outs = llm.generate([p for p, _ in prompts], [sp for _, sp in prompts], use_tqdm=False)
    return [outs[i] for i in wanted]


def result(out) -> list:
    """Token ids and every logprob (value and rank per token id), per completion."""
    return [(c.token_ids, [{t: (lp.logprob, lp.rank) for t, lp in step.items()}
                           for step in c.logprobs]) for c in out.outputs]


def engine(batched: int, dtype: str = "float32") -> LLM:
    return LLM("tiny-qwen3", max_num_batched_tokens=batched, max_num_seqs=MAX_SEQS,
               dtype=dtype)


def needle_runs(dtype: str, configs) -> tuple[list, list[list]]:
    """(each needle alone, each config's needles among others)."""
    alone = [result(completions(engine(2048, dtype), [(NEEDLE, sp)], 0, 0)[0])
             for sp in (GREEDY, SEEDED)]
    mixed = [[result(o) for o in completions(engine(batched, dtype),
                                             [(NEEDLE, GREEDY), (NEEDLE, SEEDED)], others, seed)]
             for batched, others, seed in configs]
    return alone, mixed


CONFIGS = [(64, 20, 1), (100, 40, 2), (2048, 60, 3)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_needle_alone_equals_needle_in_any_batch(monkeypatch, dtype):
    use_invariant_ops(monkeypatch)
    alone, mixed = needle_runs(dtype, CONFIGS)
    for config, got in zip(CONFIGS, mixed):
        assert got == alone, f"max_num_batched_tokens, others, seed = {config}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inverse_without_the_invariant_ops_the_needle_changes(dtype):
    """The same comparison with today's ops (MKL's row-count-dependent float32 GEMMs, SDPA's
    query blocks, the packed layout's physical KV order) finds a difference: the needle test
    can fail."""
    alone, mixed = needle_runs(dtype, CONFIGS)
    assert any(got != alone for got in mixed)


def test_graphs_and_async_scheduling_keep_the_bits(monkeypatch):
    """CPU fake graphs (padded shapes, the attention extent of the padded shape) and async
    scheduling, against eager synchronous steps."""
    use_invariant_ops(monkeypatch)

    def llm(batched: int, **kwargs) -> LLM:
        return LLM("tiny-qwen3", max_num_batched_tokens=batched, max_num_seqs=MAX_SEQS,
                   max_model_len=256, **kwargs)
    alone = [result(completions(llm(2048), [(NEEDLE, sp)], 0, 0)[0]) for sp in (GREEDY, SEEDED)]
    sizes = [1, 2, 4, 8, 16, 32, 64, 100]
    for kwargs in (dict(async_scheduling=True),
                   dict(cudagraph_runtime="fake", cudagraph_capture_sizes=sizes),
                   dict(async_scheduling=True, cudagraph_runtime="fake",
                        cudagraph_capture_sizes=sizes)):
        got = [result(o) for o in completions(llm(100, **kwargs),
                                              [(NEEDLE, GREEDY), (NEEDLE, SEEDED)], 30, 11)]
        assert got == alone, kwargs


def test_prefix_cache_hit_and_parallel_samples(monkeypatch):
    use_invariant_ops(monkeypatch)
    params = SamplingParams(n=3, temperature=0.9, seed=77, max_tokens=6, logprobs=5,
                            ignore_eos=True)
    alone = result(completions(engine(2048), [(NEEDLE, params)], 0, 0)[0])
    llm = engine(64)
    # a prompt sharing the needle's first two KV blocks fills the prefix cache first
    llm.generate([{"prompt_token_ids": NEEDLE[:70] + tokens(random.Random(3), 20)}],
                 SamplingParams(max_tokens=1), use_tqdm=False)
    out = completions(llm, [(NEEDLE, params)], 30, 4)[0]
    assert out.num_cached_tokens >= 64
    assert result(out) == alone


def scored(llm: LLM, prompt: list[int], others: int, seed: int):
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5)
    return completions(llm, [(prompt, params)], others, seed)[0].prompt_logprobs


def generation_vs_scoring(sampling: SamplingParams) -> tuple[list, list]:
    """(what generation reported for each sampled token, what scoring prompt + completion
    reports for it), each (logprob, rank) per token id of the step, in different batches
    and chunkings."""
    gen = completions(engine(64), [(NEEDLE, sampling)], 25, 5)[0].outputs[0]
    score = scored(engine(100), NEEDLE + gen.token_ids, 35, 6)
    p = len(NEEDLE)
    got = [{t: (lp.logprob, lp.rank) for t, lp in step.items()} for step in gen.logprobs]
    want = [{t: (lp.logprob, lp.rank) for t, lp in score[p + i].items()}
            for i in range(len(gen.token_ids))]
    return got, want


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_generation_equals_scoring(monkeypatch, sampling):
    use_invariant_ops(monkeypatch)
    got, want = generation_vs_scoring(sampling)
    assert got == want


def test_inverse_generation_differs_from_scoring_without_the_mode():
    got, want = generation_vs_scoring(GREEDY)
    assert got != want


# ------------------------------------------------------------------------------ op level
def test_matmul_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    needle = torch.randn(1, 64, generator=g)
    want = bi.invariant_matmul(needle, w, POLICY)
    changed = 0
    for m in (2, 5, 16, 17, 40):
        x = torch.randn(m, 64, generator=g)
        x[m // 2] = needle[0]
        assert torch.equal(bi.invariant_matmul(x, w, POLICY)[m // 2:m // 2 + 1], want)
        changed += not torch.equal(torch.nn.functional.linear(x, w)[m // 2:m // 2 + 1],
                                   torch.nn.functional.linear(needle, w))
    assert changed            # F.linear's rows do depend on M here


GDN_SHAPES = dict(num_v_heads=4, head_k_dim=16, head_v_dim=16, num_k_heads=2)


def gdn_inputs(n: int):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g),
            torch.randn(n, 4, 16, generator=g), -torch.rand(n, 4, generator=g) * 0.5,
            torch.rand(n, 4, generator=g))


def gdn_steps(x, cuts: list[int]):
    lane, outs = bi.empty_lane(**GDN_SHAPES), []
    for lo, hi in zip([0] + cuts, cuts + [x[0].shape[0]]):
        out, lane = bi.aligned_gated_delta_rule(*(t[lo:hi] for t in x), lane, POLICY)
        outs.append(out)
    return torch.cat(outs), lane.committed


def test_gdn_prefill_chunks_and_decode_agree_bit_for_bit():
    x = gdn_inputs(150)
    whole = gdn_steps(x, [])
    for cuts in ([37], [1, 2, 100], [13, 77, 140], list(range(70, 150))):  # the last: decode
        out, state = gdn_steps(x, cuts)
        assert torch.equal(out, whole[0]) and torch.equal(state, whole[1]), cuts


def test_inverse_gdn_reference_depends_on_the_cut():
    """The plain chunked reference, continued from a cut that is not on a chunk boundary,
    gives other bits than one call over the whole prompt."""
    x = gdn_inputs(150)

    def call(lo, hi, pool, has):
        qsl = torch.tensor([0, hi - lo])
        return chunk_gated_delta_rule_ref(*(t[lo:hi] for t in x), pool, torch.tensor([1]), qsl,
                                          torch.tensor([has]))
    whole = call(0, 150, torch.zeros(2, 4, 16, 16), False)
    pool = torch.zeros(2, 4, 16, 16)
    cut = torch.cat([call(0, 37, pool, False), call(37, 150, pool, True)])
    assert not torch.equal(cut, whole)


def test_policy_from_args_and_backend_support():
    assert bi.KernelPolicy.from_args(None, {}).batch_invariant is False
    assert bi.KernelPolicy.from_args(None, {bi.ENV_FLAG: "1"}).batch_invariant is True
    assert bi.KernelPolicy.from_args(False, {bi.ENV_FLAG: "1"}).batch_invariant is False
    with pytest.raises(ValueError, match=bi.ENV_FLAG):
        bi.KernelPolicy.from_args(None, {bi.ENV_FLAG: "yes please"})
    with pytest.raises(ValueError, match="multiple of attention_tile"):
        bi.KernelPolicy(attention_tile=32, attention_split=48)
    with pytest.raises(ValueError, match="sdpa does not support batch-invariant mode"):
        POLICY.require("sdpa", supported=False)
    bi.KernelPolicy().require("sdpa", supported=False)          # normal mode: no check
    assert POLICY.matmul_calls(40) == [(0, 16), (16, 16), (32, 8)]
    assert bi.KernelPolicy().matmul_calls(40) == [(0, 40)]
    assert bi.KernelPolicy().fuse_prologue(1, reduces=True)
    assert not POLICY.fuse_prologue(1, reduces=True) and POLICY.fuse_prologue(1, reduces=False)
    assert not POLICY.fuse_prologue(2, reduces=False)
