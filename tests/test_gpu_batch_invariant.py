"""Batch-invariant mode (issue 24) on a CUDA GPU, bf16, under FULL graphs.

The CPU tests (test_batch_invariant.py) on the GPU's kernels: the invariant matmul and the
invariant attention kernel at op level (a row's bits whatever else is computed with it, and
close to torch's float32 reference), then the engine: a needle prompt alone vs among random
prompts under several token budgets, generation == scoring, a prefix-cache hit with n > 1,
the inverse without the mode, and 1,000 completions of one prompt among random load.
"""
from __future__ import annotations

import random

import pytest
import torch

from fullgraph import LLM, SamplingParams
from invariant_kernels_interpret import attention_case, matmul_case
from test_batch_invariant import GREEDY, NEEDLE, SEEDED, completions, result, tokens

pytestmark = pytest.mark.gpu


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
    """Rows across M = 1..300 and every tile bucket, bf16, Qwen3-0.6B's projection shapes
    and an LM head slice (tests/invariant_kernels_interpret.py)."""
    assert matmul_case("cuda", torch.bfloat16,
                       ((1000, 1024), (4096, 1024), (1024, 3072), (151936 // 8, 1024))) == []


def test_attention_matches_sdpa_and_a_row_ignores_the_step():
    assert attention_case("cuda", torch.bfloat16) == []


@pytest.mark.parametrize("d, hq, hkv", [(128, 16, 8), (256, 8, 2)])
def test_attention_decode_row_at_the_end_of_a_kv_tile(d, hq, hkv):
    """Request 0's last position (703) ends a KV tile (64 tokens at head dim 128, 32 at 256):
    in the prefill its query tile holds earlier rows, which do not see that KV tile whole,
    while the decode row alone does. Its bits must not depend on that."""
    assert attention_case("cuda", torch.bfloat16, lengths=(704, 37, 300), hq=hq, hkv=hkv,
                          d=d) == []


@pytest.mark.parametrize("prefill_tiles", [False, True])
def test_attention_at_head_dim_256_with_gqa_group_4(prefill_tiles):
    """Qwen3.5's gated attention shape (8 query heads, 2 KV heads, head dim 256) at the mode's
    tiles and at the triton backend's prefill tiles, which serve head dims up to 256."""
    assert attention_case("cuda", torch.bfloat16, hq=8, hkv=2, d=256,
                          prefill_tiles=prefill_tiles) == []


def test_attention_at_the_prefill_tiles():
    """The triton backend's prefill tiles at Qwen3-0.6B's shape: close to SDPA, and a row's
    bits whatever tile it is in (the unmasked walk of fully seen KV tiles included)."""
    assert attention_case("cuda", torch.bfloat16, prefill_tiles=True) == []


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


@pytest.mark.parametrize("architecture", ["qwen3-vl", "qwen3.5-vl"])
def test_vision_language_needle_with_an_image_alone_equals_it_in_any_batch(
        architecture, tmp_path):
    """Qwen3-VL (head_dim 64) and Qwen3.5-VL (the hybrid's layers, head_dim 32): a prompt
    with an image alone vs among random text and image prompts under budgets of 16 / 40 /
    512 tokens; the tower runs eagerly in the mode."""
    import test_batch_invariant_vl as vl
    from test_qwen3_5_vl_engine import make_checkpoint as make_hybrid_vl_checkpoint
    from test_vl_engine import make_vl_checkpoint
    if architecture == "qwen3-vl":
        path = make_vl_checkpoint(str(tmp_path / "vl"), head_dim=64, mrope_section=(8, 12, 12))
    else:
        path = make_hybrid_vl_checkpoint(str(tmp_path / "vl"))

    def llm(batched: int) -> LLM:
        return LLM(path, device="cuda", dtype="bfloat16", max_model_len=512,
                   max_num_batched_tokens=batched, max_num_seqs=vl.MAX_SEQS,
                   num_gpu_blocks_override=256, batch_invariant=True)
    alone = [result(vl.completions(llm(512), [(vl.NEEDLE, sp)], 0, 0)[0])
             for sp in (GREEDY, SEEDED)]
    for batched, others, seed in vl.CONFIGS:
        got = [result(o) for o in vl.completions(llm(batched), [(vl.NEEDLE, GREEDY),
                                                                (vl.NEEDLE, SEEDED)],
                                                 others, seed)]
        assert got == alone, (batched, others, seed)


@pytest.fixture(scope="module")
def spec_pair(model_dir, tmp_path_factory):
    """The test model made a bigram target (its attention output kept at 0.05, so the
    history matters) and an EAGLE-3 drafter that agrees on half the vocabulary."""
    from spec_pairs import agreeing_drafter, bigram_target
    root = tmp_path_factory.mktemp("spec-invariant")
    target = bigram_target(str(root / "target"), source=model_dir, mix=0.05)
    return target, agreeing_drafter(str(root / "drafter"), target, disagree=0.5)


def speculation_equals_plain_decoding(target: str, drafter: str, lengths, max_tokens: int,
                                      seed: int) -> LLM:
    """Greedy tokens and logprob bits with a drafter (k = 3) == without, for prompts of
    `lengths`; some drafts accepted, not all. Returns the speculative engine."""
    spec = {"method": "eagle3", "model": drafter, "num_speculative_tokens": 3}
    rng = random.Random(seed)
    batch = [{"prompt_token_ids": tokens(rng, n)} for n in lengths]
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=3,
                            ignore_eos=True)
    want = [result(o) for o in engine(target, 100).generate(batch, greedy, use_tqdm=False)]
    llm = engine(target, 100, speculative_config=spec)
    assert [result(o) for o in llm.generate(batch, greedy, use_tqdm=False)] == want
    stats = llm.engine.stats
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    return llm


def test_speculative_decoding_keeps_every_bit(spec_pair):
    """In the mode, greedy speculation gives the tokens and logprob bits of plain decoding,
    and a seeded needle with speculation (drafter and rejection sampling included) is the
    same bits alone and among others, under graphs."""
    target, drafter = spec_pair
    rng = random.Random(8)
    speculation_equals_plain_decoding(target, drafter, [rng.randrange(2, 90) for _ in range(16)],
                                      20, 8)
    spec = {"method": "eagle3", "model": drafter, "num_speculative_tokens": 3}
    alone = result(completions(engine(target, 2048, speculative_config=spec),
                               [(NEEDLE, SEEDED)], 0, 0)[0])
    got = result(completions(engine(target, 64, speculative_config=spec),
                             [(NEEDLE, SEEDED)], 30, 12)[0])
    assert got == alone


def test_async_speculation_keeps_every_bit(spec_pair):
    """Async scheduling with speculation in the mode (verify steps continued on the device by
    `continue_rows`): seeded sampled tokens and logprobs equal the synchronous speculative
    engine's bit for bit."""
    target, drafter = spec_pair
    spec = {"method": "eagle3", "model": drafter, "num_speculative_tokens": 3}
    rng = random.Random(11)
    batch = [{"prompt_token_ids": tokens(rng, rng.randrange(2, 90))} for _ in range(8)]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=10 + 3 * i, ignore_eos=True,
                             logprobs=2) for i in range(8)]

    def run(llm: LLM) -> list:
        return [result(o) for o in llm.generate(batch, params, use_tqdm=False)]
    llm = engine(target, 512, speculative_config=spec, async_scheduling=True)
    assert run(llm) == run(engine(target, 512, speculative_config=spec, async_scheduling=False))
    assert llm.engine.runner.spec.num_continued > 0


@pytest.mark.parametrize("architecture", ["Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM"])
def test_hybrid_needle_and_generation_equals_scoring(architecture, tmp_path):
    """The hybrids through the mode's GDN kernel (layers/gdn/fused_aligned.py, chunks at
    absolute positions) and gated-norm row kernel, the MoE through its experts kernel: the
    needle alone == among others under budgets of 64 / 100 / 2048 tokens, and generation ==
    scoring."""
    from conftest import make_hybrid_checkpoint
    path = make_hybrid_checkpoint(str(tmp_path / "hybrid"), architecture)
    alone = [result(completions(engine(path, 2048), [(NEEDLE, sp)], 0, 0)[0])
             for sp in (GREEDY, SEEDED)]
    for batched, others, seed in CONFIGS:
        got = [result(o) for o in completions(engine(path, batched),
                                              [(NEEDLE, GREEDY), (NEEDLE, SEEDED)], others,
                                              seed)]
        assert got == alone, (batched, others, seed)
    gen = completions(engine(path, 64), [(NEEDLE, SEEDED)], 20, 5)[0].outputs[0]
    scored = completions(engine(path, 100),
                         [(NEEDLE + list(gen.token_ids),
                           SamplingParams(max_tokens=1, prompt_logprobs=0))], 30, 6)[0]
    tail = scored.prompt_logprobs[len(NEEDLE):]
    assert [entry[tok].logprob for tok, entry in zip(gen.token_ids, tail)] == \
        [step[tok].logprob for tok, step in zip(gen.token_ids, gen.logprobs)]


def test_gated_norm_rows_within_one_rounding_of_the_torch_formula():
    from gdn_aligned_interpret import gated_norm
    assert all(gated_norm("cuda", torch.bfloat16).values())


def test_hybrid_speculation_keeps_every_bit(tmp_path):
    """A hybrid target with a drafter in the mode: the GDN kernel writes a committed state
    and tail per verified position to the slot group; greedy tokens and logprobs equal plain
    decoding's bit for bit, with generation crossing a 64-token boundary at every place in a
    verify step. The drafter's heads are 32 wide, as the mode's attention kernel needs."""
    from spec_pairs import hybrid_pair
    target, drafter = hybrid_pair(str(tmp_path), drafter_head_dim=32)
    speculation_equals_plain_decoding(
        target, drafter, (1, 40, 44, 50, 55, 58, 60, 61, 62, 63, 100, 110, 120), 24, 3)
