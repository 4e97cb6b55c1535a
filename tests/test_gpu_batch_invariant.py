"""Batch-invariant mode (issue 24) on a CUDA GPU, bf16, under FULL graphs.

The CPU tests (test_batch_invariant.py) on the GPU's kernels: the invariant matmul and the
invariant attention kernel at op level (a row's bits whatever else is computed with it, and
close to torch's float32 reference), then the engine: a needle prompt alone vs among random
prompts under several token budgets, generation == scoring, a prefix-cache hit with n > 1,
the inverse without the mode, and 1,000 completions of one prompt among random load.
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from fullgraph import LLM, SamplingParams
from fullgraph.attention.paged_invariant import invariant_attention, query_tokens, tile_map
from fullgraph.layers.invariant_gemm import invariant_mm
from fullgraph.layers.policy import KernelPolicy
from test_batch_invariant import GREEDY, NEEDLE, SEEDED, completions, result, tokens

pytestmark = pytest.mark.gpu

POLICY = KernelPolicy(batch_invariant=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A random Qwen3 with the 0.6B model's head layout (head_dim 128, 2 query heads per
    KV head) at a small width, saved by transformers."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fullgraph.models.presets import train_tokenizer
    path = str(tmp_path_factory.mktemp("qwen3-invariant"))
    tok = train_tokenizer(1024)
    tok.save_pretrained(path)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=256, intermediate_size=768,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=128, max_position_embeddings=2048, rope_theta=10000.0,
                      tie_word_embeddings=True, initializer_range=0.2,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    return path


def test_matmul_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    for n, k in ((1000, 1024), (4096, 1024), (1024, 3072), (151936 // 8, 1024)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 32
        x = torch.randn(300, k, device="cuda", dtype=torch.bfloat16)
        full = invariant_mm(x, w)
        ref = x.float() @ w.float().T
        assert (full.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
        for lo, m in ((0, 1), (5, 1), (17, 2), (40, 7), (9, 16), (1, 17), (2, 32), (64, 64),
                      (3, 65), (100, 200), (0, 256), (20, 257)):
            part = invariant_mm(x[lo:lo + m].clone(), w)
            assert torch.equal(part, full[lo:lo + m]), (n, k, lo, m)


def _paged(lengths, hkv, d, block_size, seed):
    """Random K/V for requests of `lengths` tokens, in shuffled pages."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // block_size) for n in lengths]
    order = torch.randperm(sum(pages), generator=g) + 1           # page 0: the null block
    table = torch.zeros(len(lengths) + 1, max(pages), dtype=torch.int32)
    at = 0
    for i, p in enumerate(pages):
        table[i, :p] = order[at:at + p]
        at += p
    slots = (sum(pages) + 1) * block_size
    k = torch.randn(slots, hkv, d, generator=g).to(torch.bfloat16)
    v = torch.randn(slots, hkv, d, generator=g).to(torch.bfloat16)
    return k.cuda(), v.cuda(), table.cuda()


def _attend(q, k, v, table, lengths, queries, block_size):
    """The kernel over one step: request i's last `queries[i]` tokens (its seq_len is
    lengths[i])."""
    qsl = torch.tensor([0, *itertools.accumulate(queries)], dtype=torch.int32)
    positions = torch.cat([torch.arange(n - m, n) for n, m in zip(lengths, queries)])
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    hq, hkv = q.shape[1], k.shape[1]
    tiles = tile_map(qsl.cuda(), len(lengths), q.shape[0], query_tokens(hq // hkv))
    return invariant_attention(q, k, v, table, seq_lens.cuda(), positions.cuda(), tiles,
                               block_size, q.shape[-1] ** -0.5, POLICY)


def test_attention_matches_sdpa_and_a_row_ignores_the_step():
    hq, hkv, d, bs = 16, 8, 128, 16
    lengths = [700, 37, 300]
    k, v, table = _paged(lengths, hkv, d, bs, seed=1)
    g = torch.Generator().manual_seed(2)
    q = [torch.randn(n, hq, d, generator=g).to(torch.bfloat16).cuda() for n in lengths]
    whole = _attend(torch.cat(q), k, v, table, lengths, lengths, bs)
    outs = whole.split(lengths)
    for i, n in enumerate(lengths):          # against torch's SDPA, float32, causal
        cols = torch.arange(n)
        slots = (table[i, cols // bs].long().cpu() * bs + cols % bs).cuda()
        kk = k[slots].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        vv = v[slots].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        ref = F.scaled_dot_product_attention(q[i].float().transpose(0, 1), kk, vv,
                                             is_causal=True).transpose(0, 1)
        assert (outs[i].float() - ref).abs().max() < 2e-2, i
    # request 0 alone: decode its last token; a chunk of its last 400; then in a step where
    # the others' rows come first
    last = _attend(q[0][-1:], k, v, table[:1], [700], [1], bs)
    assert torch.equal(last, outs[0][-1:])
    chunk = _attend(q[0][-400:], k, v, table[:1], [700], [400], bs)
    assert torch.equal(chunk, outs[0][-400:])
    order = [2, 1, 0]
    mixed = _attend(torch.cat([q[2][-5:], q[1][-1:], q[0][-9:]]), k, v, table[order + [3]],
                    [lengths[j] for j in order], [5, 1, 9], bs)
    assert torch.equal(mixed[-9:], outs[0][-9:])
    assert torch.equal(mixed[:5], outs[2][-5:])


def engine(path: str, batched: int, invariant: bool = True, **kwargs) -> LLM:
    return LLM(path, device="cuda", dtype="bfloat16", max_num_batched_tokens=batched,
               max_num_seqs=64, max_model_len=1024, num_gpu_blocks_override=2048,
               batch_invariant=invariant, **kwargs)


CONFIGS = [(64, 20, 1), (100, 40, 2), (2048, 60, 3)]


def needle_runs(path: str, invariant: bool):
    alone = [result(completions(engine(path, 2048, invariant), [(NEEDLE, sp)], 0, 0)[0])
             for sp in (GREEDY, SEEDED)]
    mixed = [[result(o) for o in completions(engine(path, batched, invariant),
                                             [(NEEDLE, GREEDY), (NEEDLE, SEEDED)], others, s)]
             for batched, others, s in CONFIGS]
    return alone, mixed


def test_needle_alone_equals_needle_in_any_batch_under_graphs(model_dir):
    alone, mixed = needle_runs(model_dir, True)
    for config, got in zip(CONFIGS, mixed):
        assert got == alone, config


def test_inverse_without_the_mode_the_needle_changes(model_dir):
    alone, mixed = needle_runs(model_dir, False)
    assert any(got != alone for got in mixed)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_generation_equals_scoring(model_dir, params):
    """Each sampled token's logprob == its prompt logprob when prompt + completion is scored
    in another batch, under another budget."""
    gen = completions(engine(model_dir, 64), [(NEEDLE, params)], 20, 5)[0].outputs[0]
    scored = completions(engine(model_dir, 100),
                         [(NEEDLE + list(gen.token_ids),
                           SamplingParams(max_tokens=1, prompt_logprobs=0))], 30, 6)[0]
    tail = scored.prompt_logprobs[len(NEEDLE):]
    assert len(tail) == len(gen.token_ids)
    for tok, step, entry in zip(gen.token_ids, gen.logprobs, tail):
        assert entry[tok].logprob == step[tok].logprob


def test_prefix_cache_hit_and_parallel_samples(model_dir):
    params = SamplingParams(n=3, temperature=0.9, seed=77, max_tokens=6, logprobs=5,
                            ignore_eos=True)
    alone = result(completions(engine(model_dir, 2048), [(NEEDLE, params)], 0, 0)[0])
    llm = engine(model_dir, 64)
    llm.generate([{"prompt_token_ids": NEEDLE[:70] + tokens(random.Random(3), 20)}],
                 SamplingParams(max_tokens=1), use_tqdm=False)
    got = result(completions(llm, [(NEEDLE, params)], 25, 9)[0])
    assert got == alone


def test_a_thousand_completions_of_one_prompt_are_one_text(model_dir):
    """1,000 greedy completions of one prompt submitted among 1,000 random requests of
    random lengths (so every step mixes them differently): one distinct text."""
    rng = random.Random(4)
    llm = engine(model_dir, 512)
    prompt = {"prompt_token_ids": tokens(rng, 60)}
    same = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    batch = [(prompt, same) for _ in range(1000)] + [
        ({"prompt_token_ids": tokens(rng, rng.randrange(1, 300))},
         SamplingParams(temperature=0.8, seed=i, max_tokens=rng.randrange(1, 40),
                        ignore_eos=True)) for i in range(1000)]
    rng.shuffle(batch)
    outs = llm.generate([p for p, _ in batch], [sp for _, sp in batch], use_tqdm=False)
    texts = {tuple(o.outputs[0].token_ids) for o, (_, sp) in zip(outs, batch) if sp is same}
    assert len(texts) == 1
