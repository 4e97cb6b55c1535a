"""The flex backend's uncompiled (CPU) path, attention/gathered.py: its KV extent follows the
step, never the cache size (issue 21), eagerly and inside a recorded (fake) graph, and it
computes what eager FlexAttention did."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fullgraph.attention.flex import MIXED_Q_BLOCK, FlexAttentionBackend
from fullgraph.attention.gathered import GatheredMetadata
from fullgraph.attention.metadata import AttentionSpec, PersistentInputs, StepAttentionInputs
from fullgraph.worker.cudagraph.fake import FakeGraphRuntime

BS, HQ, HKV, D = 4, 4, 2, 8
MAX_SEQS, MAX_TOKENS, MAX_BLOCKS = 6, 64, 12       # max_model_len 48
SMALL, LARGE = 64, 4000     # KV cache sizes, in blocks (both above any bound below)


class Runner:
    """Persistent step buffers, like the model runner's: every step writes into the same
    tensors, so a graph captured on one step replays another of the same padded shape."""

    def __init__(self, num_blocks: int, max_tokens: int = MAX_TOKENS,
                 max_blocks: int = MAX_BLOCKS) -> None:
        self.spec = AttentionSpec(1, HQ, HKV, D, BS, num_blocks, MAX_SEQS, max_tokens,
                                  max_blocks, torch.float32)
        self.bt = torch.zeros(MAX_SEQS + 1, max_blocks, dtype=torch.int32)
        self.pos = torch.zeros(max_tokens, dtype=torch.int64)
        self.seq = torch.zeros(MAX_SEQS, dtype=torch.int32)
        self.qsl = torch.zeros(MAX_SEQS + 1, dtype=torch.int32)
        self.slots = torch.zeros(max_tokens, dtype=torch.int64)
        self.backend = FlexAttentionBackend(self.spec, torch.device("cpu"),
                                            PersistentInputs(self.bt, self.pos))
        g = torch.Generator().manual_seed(num_blocks)
        self.cache = tuple(torch.randn(num_blocks * BS, HKV, D, generator=g) for _ in range(2))

    def step(self, seq_lens, q_lens, seed=0, shared=0, r_pad=None, t_pad=None):
        """Random distinct blocks per request (the first `shared` shared by all), written
        into the persistent buffers; returns the step inputs and (table, positions, rows)."""
        rng = np.random.default_rng(seed)
        n, nb = len(seq_lens), self.spec.num_blocks
        free = list(rng.permutation(np.arange(1, nb)))
        common = [int(free.pop()) for _ in range(shared)]
        bt = np.zeros(tuple(self.bt.shape), np.int32)
        for i, L in enumerate(seq_lens):
            k = -(-L // BS)
            bt[i, :k] = (common + [int(free.pop()) for _ in range(k)])[:k]
        pos = np.concatenate([np.arange(L - q, L) for L, q in zip(seq_lens, q_lens)])
        req = np.repeat(np.arange(n), q_lens)
        t, r_pad, t_pad = len(pos), r_pad or n, t_pad or len(pos)
        self.bt.copy_(torch.from_numpy(bt))
        self.pos.zero_()
        self.pos[:t] = torch.from_numpy(pos)
        self.seq.zero_()
        self.seq[:n] = torch.tensor(seq_lens, dtype=torch.int32)
        self.qsl.zero_()
        self.qsl[1:n + 1] = torch.from_numpy(np.cumsum(q_lens))
        self.qsl[n + 1:r_pad + 1] = t
        uniform = q_lens[0] if len(set(q_lens)) == 1 and t_pad == q_lens[0] * r_pad else None
        inputs = StepAttentionInputs(
            num_reqs=n, num_tokens=t, num_reqs_padded=r_pad, num_tokens_padded=t_pad,
            uniform_query_len=uniform, positions=self.pos[:t_pad],
            slot_mapping=self.slots[:t_pad], seq_lens=self.seq[:r_pad],
            query_start_loc=self.qsl[:r_pad + 1], block_table=self.bt[:r_pad + 1],
            positions_cpu=self.pos.numpy(), seq_lens_cpu=self.seq.numpy(),
            query_start_loc_cpu=self.qsl.numpy(), block_table_cpu=self.bt.numpy())
        return inputs, (bt, pos, req)

    def attend(self, inputs, q):
        b = self.backend
        b.prepare(inputs)
        meta = b.build(inputs)
        b.update(meta, inputs)
        return meta, b.forward(q, self.cache, meta)


def dense_reference(q, cache, bt, pos, req, scale):
    """Each token over its own request's positions 0..pos, one at a time."""
    out = torch.empty_like(q)
    for t in range(len(pos)):
        p = np.arange(int(pos[t]) + 1)
        slots = torch.from_numpy(bt[req[t], p // BS].astype(np.int64) * BS + p % BS)
        k = cache[0][slots].repeat_interleave(HQ // HKV, dim=1)
        v = cache[1][slots].repeat_interleave(HQ // HKV, dim=1)
        w = (torch.einsum("hd,lhd->hl", q[t], k) * scale).softmax(-1)
        out[t] = torch.einsum("hl,lhd->hd", w, v)
    return out


def queries(t, seed=1):
    return torch.randn(t, HQ, D, generator=torch.Generator().manual_seed(seed))


# (seq_lens, q_lens, shared prefix blocks): the decode layout, uniform multi-token queries,
# and the packed layout with prefills, decodes and a shared prefix
STEPS = [([9, 17, 3], [1, 1, 1], 0), ([12, 20], [3, 3], 2), ([9, 17, 5, 30], [9, 4, 1, 13], 0),
         ([20, 22, 7], [20, 2, 7], 3)]


def step_blocks(seq_lens, q_lens, bt, pos, req):
    """The KV blocks per row an eager step needs: the longest request's (decode layout) or
    the most distinct blocks any query block of the packed tokens may see."""
    if len(set(q_lens)) == 1:
        return -(-max(seq_lens) // BS)
    blocks = [{int(bt[req[t], b]) for t in range(i, min(i + MIXED_Q_BLOCK, len(pos)))
               for b in range(int(pos[t]) // BS + 1)}
              for i in range(0, len(pos), MIXED_Q_BLOCK)]
    return max(len(b) for b in blocks)


@pytest.mark.parametrize("seq_lens, q_lens, shared", STEPS)
def test_eager_extent_is_the_steps_blocks_whatever_the_cache_size(seq_lens, q_lens, shared):
    """Eager FlexAttention scored every query against all `num_blocks * BS` cache positions;
    the gathered path scores it against the blocks its step's rows see, so the step costs
    the same in a 64-block and a 4000-block cache, and the output is the reference's."""
    shapes = []
    for nb in (SMALL, LARGE):
        runner = Runner(nb)
        inputs, (bt, pos, req) = runner.step(seq_lens, q_lens, shared=shared)
        q = queries(inputs.num_tokens)
        meta, out = runner.attend(inputs, q)
        assert isinstance(meta, GatheredMetadata)
        blocks = step_blocks(seq_lens, q_lens, bt, pos, req)
        rows = len(seq_lens) if meta.decode else -(-inputs.num_tokens // MIXED_Q_BLOCK)
        assert meta.kv_blocks.shape == (rows, blocks)
        assert meta.mask.shape == (rows, 1, meta.row_len, blocks * BS)
        shapes.append((meta.kv_blocks.shape, meta.mask.shape))
        ref = dense_reference(q, runner.cache, bt, pos, req, runner.spec.scale)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert shapes[0] == shapes[1]


def test_long_uniform_queries_take_one_row_per_request():
    """Uniform queries longer than the compiled decode layout's query block (a long prompt on
    its own) still get a row per request: its KV is gathered once, not once per 16 tokens."""
    runner = Runner(200, max_tokens=320, max_blocks=40)
    inputs, (bt, pos, req) = runner.step([150, 160], [150, 150])
    q = queries(inputs.num_tokens)
    meta, out = runner.attend(inputs, q)
    assert meta.decode and meta.kv_blocks.shape == (2, 40)
    ref = dense_reference(q, runner.cache, bt, pos, req, runner.spec.scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def created_shapes(graph) -> list[tuple[int, ...]]:
    """The shapes of the tensors a recorded graph's ops create, in order: what it computes
    (views of their inputs and in-place updates, such as `block_logical`'s, create none)."""
    def tensors(x):
        return [t for t in (x if isinstance(x, (tuple, list)) else (x,))
                if isinstance(t, torch.Tensor)]
    shapes = []
    for _, args, kwargs, out in graph.ops:
        inputs = {t.untyped_storage().data_ptr()
                  for a in (*args, *kwargs.values()) for t in tensors(a)}
        shapes += [tuple(t.shape) for t in tensors(out)
                   if t.untyped_storage().data_ptr() not in inputs]
    return shapes


@pytest.mark.parametrize("decode", [True, False])
def test_graph_extent_is_the_padded_shapes_bound_and_replays_exactly(decode):
    """Captured on one step (fake graph runtime: the recorded ops replay verbatim), the path
    gathers the bound of the padded shape — a table row per request, a query block's worth of
    rows in the packed layout — never the cache: the recorded ops are the same for a 64- and
    a 4000-block cache. A replay for another step of that shape (longer contexts, other blocks,
    padding lanes) gives the reference's output."""
    if decode:        # 3 of 4 padded requests, one token each
        first, second = ([5, 2, 7], [1, 1, 1]), ([40, 13, 29], [1, 1, 1])
        pad = dict(r_pad=4, t_pad=4)
    else:             # 24 of 26 padded tokens, 4 of 5 padded requests
        first, second = ([9, 4, 6, 3], [9, 4, 6, 3]), ([30, 45, 9, 16], [16, 1, 4, 3])
        pad = dict(r_pad=5, t_pad=26)
    recorded = []
    for nb in (SMALL, LARGE):
        runner = Runner(nb)
        b = runner.backend
        inputs, _ = runner.step(*first, seed=1, **pad)
        q_buf = torch.zeros(inputs.num_tokens_padded, HQ, D)
        b.prepare(inputs)
        meta = b.build(inputs)

        def forward():
            b.update(meta, inputs)
            return b.forward(q_buf, runner.cache, meta)

        runtime = FakeGraphRuntime()
        graph, out = runtime.capture(forward)
        bound = MAX_BLOCKS if decode else min(MIXED_Q_BLOCK, 5) * MAX_BLOCKS
        assert meta.kv_blocks.shape[1] == bound
        recorded.append(created_shapes(graph))
        assert not any({nb, nb * BS} & set(s) for s in recorded[-1])   # nothing cache-sized
        # a later step of the same padded shape: host work, new queries, then the replay
        step, (bt, pos, req) = runner.step(*second, seed=2, **pad)
        b.prepare(step)
        n = step.num_tokens
        q_buf[:n] = queries(n, seed=3)
        runtime.replay(graph)
        ref = dense_reference(q_buf[:n], runner.cache, bt, pos, req, runner.spec.scale)
        torch.testing.assert_close(out[:n], ref, atol=1e-5, rtol=1e-5)
        assert not out[n:].any()                  # padding lanes see nothing
    assert recorded[0] == recorded[1]


def test_cpu_engine_flex_matches_sdpa_token_for_token():
    """The default CPU engine (flex, eager) and the SDPA reference engine agree token for
    token on greedy requests that share a prefix, prefill in chunks and decode together."""
    from fullgraph.entrypoints.llm import LLM
    from fullgraph.sampling_params import SamplingParams
    common = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=48,
                  num_gpu_blocks_override=96)
    flex = LLM("tiny-qwen3", **common)
    sdpa = LLM("tiny-qwen3", attention_backend="sdpa", **common)
    assert isinstance(flex.engine.runner.backend, FlexAttentionBackend)
    rng = np.random.default_rng(0)
    prefix = [int(x) for x in rng.integers(1, 700, 40)]
    prompts = [{"prompt_token_ids": prefix + [int(x) for x in rng.integers(1, 700, k)]}
               for k in (1, 7, 30, 70)]
    prompts += [{"prompt_token_ids": [int(x) for x in rng.integers(1, 700, k)]} for k in (3, 90)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    a = flex.generate(prompts, params, use_tqdm=False)
    b = sdpa.generate(prompts, params, use_tqdm=False)
    assert [x.outputs[0].token_ids for x in a] == [y.outputs[0].token_ids for y in b]
