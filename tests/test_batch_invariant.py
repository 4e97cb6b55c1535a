"""Batch-invariant mode (issue 24, docs/batch_invariance.md) on the CPU.

With `LLM(batch_invariant=True)` a prompt's tokens and logprobs must be the same bits alone
and at a random place among random prompts, under several `max_num_batched_tokens`, greedy
and seeded; with a prefix-cache hit; with n > 1; with fake graphs and async scheduling; and
the logprob generation reports for a token must equal that token's prompt logprob when
prompt + completion is scored again. The inverse tests run the same comparisons without the
mode and find a difference, so the comparisons can fail. Op-level tests check the invariant
attention against torch's SDPA and the aligned gated delta rule against itself cut anywhere.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fullgraph import LLM
from fullgraph.attention.invariant import attention_extent, paged_attention
from fullgraph.config import ENV_FLAG
from fullgraph.engine.args import EngineArgs, check_kernel_policy
from fullgraph.layers.gdn.aligned import aligned_chunk_gated_delta_rule
from fullgraph.layers.gdn.reference import chunk_gated_delta_rule_ref
from fullgraph.layers.linear import invariant_matmul
from fullgraph.layers.policy import KernelPolicy
from fullgraph.sampling_params import SamplingParams

VOCAB = 740              # tiny-qwen3's tokenizer has 749 tokens
MAX_SEQS = 64
# small tiles and splits for the op-level tests, so that short inputs cross several
SMALL = KernelPolicy(batch_invariant=True, matmul_block_rows=16, attention_tile=16,
                     attention_split=64)


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


def engine(batched: int, dtype: str = "float32", invariant: bool = True, **kwargs) -> LLM:
    return LLM("tiny-qwen3", max_num_batched_tokens=batched, max_num_seqs=MAX_SEQS,
               dtype=dtype, batch_invariant=invariant, **kwargs)


def needle_runs(dtype: str, configs, invariant: bool = True) -> tuple[list, list[list]]:
    """(each needle alone, each config's needles among others)."""
    alone = [result(completions(engine(2048, dtype, invariant), [(NEEDLE, sp)], 0, 0)[0])
             for sp in (GREEDY, SEEDED)]
    mixed = [[result(o) for o in completions(engine(batched, dtype, invariant),
                                             [(NEEDLE, GREEDY), (NEEDLE, SEEDED)], others, seed)]
             for batched, others, seed in configs]
    return alone, mixed


# (max_num_batched_tokens, other prompts, seed). Whether today's ops change the needle depends
# on the CPU's kernels: on an AMD EPYC with avx512_bf16 only the last two find a bfloat16
# difference (the inverse check below needs one).
CONFIGS = [(64, 20, 1), (100, 40, 2), (2048, 60, 3), (64, 60, 5), (100, 60, 7)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_needle_alone_equals_needle_in_any_batch(dtype):
    alone, mixed = needle_runs(dtype, CONFIGS)
    for config, got in zip(CONFIGS, mixed):
        assert got == alone, f"max_num_batched_tokens, others, seed = {config}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inverse_without_the_invariant_ops_the_needle_changes(dtype):
    """The same comparison with today's ops (MKL's row-count-dependent float32 GEMMs, SDPA's
    query blocks, the packed layout's physical KV order) finds a difference: the needle test
    can fail."""
    alone, mixed = needle_runs(dtype, CONFIGS, invariant=False)
    assert any(got != alone for got in mixed)


def test_graphs_and_async_scheduling_keep_the_bits():
    """CPU fake graphs (padded shapes, the attention extent of the padded shape) and async
    scheduling, against eager synchronous steps."""
    def llm(batched: int, **kwargs) -> LLM:
        return engine(batched, max_model_len=256, **kwargs)
    alone = [result(completions(llm(2048), [(NEEDLE, sp)], 0, 0)[0]) for sp in (GREEDY, SEEDED)]
    sizes = [1, 2, 4, 8, 16, 32, 64, 100]
    for kwargs in (dict(async_scheduling=True),
                   dict(cudagraph_runtime="fake", cudagraph_capture_sizes=sizes),
                   dict(async_scheduling=True, cudagraph_runtime="fake",
                        cudagraph_capture_sizes=sizes)):
        got = [result(o) for o in completions(llm(100, **kwargs),
                                              [(NEEDLE, GREEDY), (NEEDLE, SEEDED)], 30, 11)]
        assert got == alone, kwargs


def test_prefix_cache_hit_and_parallel_samples():
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


def generation_vs_scoring(sampling: SamplingParams, make_engine) -> tuple[list, list]:
    """(what generation reported for each sampled token, what scoring prompt + completion
    reports for it), each (logprob, rank) per token id of the step, in different batches
    and chunkings. `make_engine(max_num_batched_tokens)` builds each side's engine."""
    gen = completions(make_engine(64), [(NEEDLE, sampling)], 25, 5)[0].outputs[0]
    score = scored(make_engine(100), NEEDLE + gen.token_ids, 35, 6)
    p = len(NEEDLE)
    got = [{t: (lp.logprob, lp.rank) for t, lp in step.items()} for step in gen.logprobs]
    want = [{t: (lp.logprob, lp.rank) for t, lp in score[p + i].items()}
            for i in range(len(gen.token_ids))]
    return got, want


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_generation_equals_scoring(sampling):
    got, want = generation_vs_scoring(sampling, engine)
    assert got == want


def test_inverse_generation_differs_from_scoring_without_the_mode():
    got, want = generation_vs_scoring(GREEDY, lambda b: engine(b, invariant=False))
    assert got != want


# ------------------------------------------------------------------------------ op level
def test_matmul_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    needle = torch.randn(1, 64, generator=g)
    want = invariant_matmul(needle, w, SMALL)
    changed = 0
    for m in (2, 5, 16, 17, 40):
        x = torch.randn(m, 64, generator=g)
        x[m // 2] = needle[0]
        assert torch.equal(invariant_matmul(x, w, SMALL)[m // 2:m // 2 + 1], want)
        changed += not torch.equal(torch.nn.functional.linear(x, w)[m // 2:m // 2 + 1],
                                   torch.nn.functional.linear(needle, w))
    assert changed            # F.linear's rows do depend on M here


# One lane's state held in tensors of its own rather than in pools: the rule cut anywhere
# (prefill chunks, decode tokens) against one call over the whole sequence.
@dataclass(slots=True)
class GDNLaneState:
    """One lane's gated-delta-rule state in the mode: the recurrent state at its last
    absolute chunk boundary (position a multiple of `gdn_chunk`), and the rule's inputs
    (q, k, v, g, beta) of the tokens after it, fewer than a chunk."""
    committed: torch.Tensor                   # [HV, DK, DV] float32
    tail: tuple[torch.Tensor, ...]            # per input, [n < chunk, ...]


def aligned_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             g: torch.Tensor, beta: torch.Tensor, lane: GDNLaneState,
                             policy: KernelPolicy) -> tuple[torch.Tensor, GDNLaneState]:
    """`aligned_chunk_gated_delta_rule` for one lane's new tokens, its state held in `lane`
    rather than in pools. Inputs as layers/gdn/reference.py's for one lane; returns (outputs
    of the new tokens, new lane state)."""
    chunk, n, new = policy.gdn_chunk, lane.tail[0].shape[0], q.shape[0]
    state_pool = torch.stack([torch.zeros_like(lane.committed), lane.committed])
    tail_pools = []
    for held in lane.tail:
        pool = held.new_zeros(2, chunk - 1, *held.shape[1:])
        pool[1, :n] = held
        tail_pools.append(pool)
    one = torch.ones(1, dtype=torch.bool, device=q.device)
    out = aligned_chunk_gated_delta_rule(
        q, k, v, g, beta, state_pool, tail_pools, torch.ones(1, dtype=torch.long, device=q.device),
        torch.tensor([0, new], device=q.device), torch.tensor([n + new], device=q.device), one,
        policy)
    kept = (n + new) % chunk
    return out, GDNLaneState(state_pool[1], tuple(pool[1, :kept] for pool in tail_pools))


def empty_lane(num_v_heads: int, head_k_dim: int, head_v_dim: int, num_k_heads: int,
               dtype: torch.dtype = torch.float32, device=None) -> GDNLaneState:
    """A lane before its first token: a zero state and no tail (g and the state float32, as
    layers/gdn/gating.py and state.py keep them)."""
    def zeros(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dt, device=device)
    return GDNLaneState(zeros(num_v_heads, head_k_dim, head_v_dim, dt=torch.float32),
                        (zeros(0, num_k_heads, head_k_dim), zeros(0, num_k_heads, head_k_dim),
                         zeros(0, num_v_heads, head_v_dim),
                         zeros(0, num_v_heads, dt=torch.float32), zeros(0, num_v_heads)))


GDN_SHAPES = dict(num_v_heads=4, head_k_dim=16, head_v_dim=16, num_k_heads=2)


def gdn_inputs(n: int):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g),
            torch.randn(n, 4, 16, generator=g), -torch.rand(n, 4, generator=g) * 0.5,
            torch.rand(n, 4, generator=g))


def gdn_steps(x, cuts: list[int]):
    lane, outs = empty_lane(**GDN_SHAPES), []
    for lo, hi in zip([0] + cuts, cuts + [x[0].shape[0]]):
        out, lane = aligned_gated_delta_rule(*(t[lo:hi] for t in x), lane, SMALL)
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


def test_attention_matches_sdpa_over_several_splits_and_ignores_other_rows():
    """`paged_attention` against torch's SDPA (causal, one request, GQA) over a context
    that crosses several tiles and splits; then a query row's bits alone vs among other
    rows and with a wider extent."""
    g = torch.Generator().manual_seed(0)
    n, hq, hkv, d = 150, 4, 2, 16
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (hq, hkv, hkv))
    scale = d ** -0.5
    perm = torch.randperm(n, generator=g)                  # KV slots in any physical order
    k_cache, v_cache = torch.zeros(n, hkv, d), torch.zeros(n, hkv, d)
    k_cache[perm], v_cache[perm] = k, v
    extent = attention_extent([n], SMALL)
    assert extent == 192                                  # three 64-token splits
    slots = torch.cat([perm, torch.zeros(extent - n, dtype=torch.long)])[None].expand(n, -1)
    pos = torch.arange(extent)
    visible = (pos[None, :] <= torch.arange(n)[:, None]) & (pos[None, :] < n)
    got = paged_attention(q, k_cache, v_cache, slots, visible, scale, SMALL)
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                          v.transpose(0, 1), is_causal=True, scale=scale,
                                          enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    row = 97
    alone = paged_attention(q[row:row + 1], k_cache, v_cache, slots[row:row + 1],
                            visible[row:row + 1], scale, SMALL)
    wider = torch.cat([slots[row:row + 1], torch.zeros(1, 128, dtype=torch.long)], 1)
    wide = paged_attention(q[row:row + 1], k_cache, v_cache, wider,
                           F.pad(visible[row:row + 1], (0, 128)), scale, SMALL)
    assert torch.equal(alone[0], got[row]) and torch.equal(wide, alone)


def test_policy_from_args_and_environment():
    assert KernelPolicy.from_args(None, {}).batch_invariant is False
    assert KernelPolicy.from_args(None, {ENV_FLAG: "1"}).batch_invariant is True
    assert KernelPolicy.from_args(None, {ENV_FLAG: "true"}).batch_invariant is True
    assert KernelPolicy.from_args(False, {ENV_FLAG: "1"}).batch_invariant is False
    assert KernelPolicy.from_args(True, {}).batch_invariant is True
    with pytest.raises(ValueError, match=ENV_FLAG):
        KernelPolicy.from_args(None, {ENV_FLAG: "yes please"})
    with pytest.raises(ValueError, match="multiple of attention_tile"):
        KernelPolicy(attention_tile=32, attention_split=48)
    assert SMALL.matmul_calls(40) == [(0, 16), (16, 16), (32, 8)]
    assert KernelPolicy().matmul_calls(40) == [(0, 40)]
    # the KV tile by head dim: 64 x 128 elements at most, and a divisor of the split
    assert [KernelPolicy().attention_tile_for(d) for d in (64, 128, 256)] == [64, 64, 32]
    assert KernelPolicy(attention_tile=48, attention_split=144).attention_tile_for(256) == 16


def test_environment_variable_turns_the_mode_on(monkeypatch):
    monkeypatch.setenv(ENV_FLAG, "1")
    assert EngineArgs("tiny-qwen3").create_engine_config().kernel_policy.batch_invariant
    assert not EngineArgs("tiny-qwen3", batch_invariant=False).create_engine_config() \
        .kernel_policy.batch_invariant
    monkeypatch.setenv(ENV_FLAG, "maybe")
    with pytest.raises(ValueError, match=ENV_FLAG):
        EngineArgs("tiny-qwen3").create_engine_config()


def test_parts_without_the_mode_are_refused_by_name(monkeypatch):
    with pytest.raises(ValueError, match="attention backend 'sdpa' does not support "
                                         "batch-invariant mode"):
        EngineArgs("tiny-qwen3", attention_backend="sdpa",
                   batch_invariant=True).create_engine_config()
    # every model declares the mode now; one that did not would be named
    assert EngineArgs("tiny-qwen3-vl", batch_invariant=True).create_engine_config() \
        .kernel_policy.batch_invariant
    from fullgraph.models.interface import ModelCapabilities
    from fullgraph.models.qwen3_vl import Qwen3VLForConditionalGeneration
    monkeypatch.setattr(Qwen3VLForConditionalGeneration, "capabilities", ModelCapabilities())
    with pytest.raises(ValueError, match="Qwen3VLForConditionalGeneration on cpu does not support "
                                         "batch-invariant"):
        EngineArgs("tiny-qwen3-vl", batch_invariant=True).create_engine_config()
    # on the GPU: what a model declares for "cuda" (every model but Qwen3.5-VL); one that
    # declares the CPU alone is refused there by name
    on = KernelPolicy(batch_invariant=True)
    check_kernel_policy(on, torch.device("cuda"),
                        EngineArgs("tiny-qwen3").create_engine_config().model, "flex")
    hybrid = EngineArgs("tiny-qwen3.5").create_engine_config().model
    check_kernel_policy(on, torch.device("cuda"), hybrid, "triton")
    from fullgraph.models.qwen3_next import HybridForCausalLM
    monkeypatch.setattr(HybridForCausalLM, "capabilities",
                        ModelCapabilities(prefix_caching=False, batch_invariant=("cpu",)))
    with pytest.raises(ValueError, match="Qwen3_5ForCausalLM on cuda does not support "
                                         "batch-invariant"):
        check_kernel_policy(on, torch.device("cuda"), hybrid, "flex")
    with pytest.raises(ValueError, match="--compile-layers does not support batch-invariant"):
        check_kernel_policy(on, torch.device("cuda"),
                            EngineArgs("tiny-qwen3").create_engine_config().model, "flex",
                            compile_layers=True)
    # normal mode: nothing is checked
    check_kernel_policy(KernelPolicy(), torch.device("cuda"), hybrid, "sdpa", compile_layers=True)
