"""Graph manager, dispatcher and capture on the CPU (fake graphs with replay semantics)."""
from __future__ import annotations

import contextlib
import gc
import random
import types

import pytest
import torch

from conftest import graph_input_tensors
from fullgraph import LLM, SamplingParams
from fullgraph.config import CUDAGraphMode, SchedulerConfig
from fullgraph.engine.args import capture_sizes, lazy_capture_sizes
from fullgraph.worker.cudagraph.descriptor import BatchExecutionDescriptor, Dispatcher
from fullgraph.worker.cudagraph.fake import FakeGraphRuntime
from fullgraph.worker.cudagraph import manager
from fullgraph.worker.cudagraph.manager import CUDAGraphManager, PiecewiseGraph, unowned

FULL = CUDAGraphMode.FULL


def test_default_capture_sizes():
    sizes = capture_sizes(None, None, SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192))
    assert sizes[:5] == [1, 2, 4, 8, 16] and 248 in sizes and 256 in sizes and 272 in sizes
    assert sizes[-1] == 512 and sizes == sorted(set(sizes))
    small = capture_sizes(None, None, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=20))
    assert small == [1, 2, 4, 8, 16]
    assert capture_sizes(None, 64, SchedulerConfig())[-1] == 64
    assert capture_sizes([16, 3, 3, 1], None, SchedulerConfig()) == [1, 3, 16]
    with pytest.raises(ValueError):
        capture_sizes([0, 4], None, SchedulerConfig())


def make_dispatcher(mode=FULL, sizes=(1, 2, 4, 8, 16), seqs=8, tokens=64):
    d = Dispatcher(mode, sizes, seqs, tokens, pad_eager=True)
    d.captured = set(d.descriptors_to_capture())
    return d


def test_descriptors_to_capture():
    d = make_dispatcher()
    descs = d.descriptors_to_capture()
    decode = [x for x in descs if x.uniform_query_len == 1]
    mixed = [x for x in descs if x.uniform_query_len is None]
    assert [x.num_reqs for x in decode] == [8, 4, 2, 1]          # capped by max_num_seqs
    assert [x.num_tokens for x in mixed] == [16, 8, 4, 2, 1]
    assert all(x.num_reqs == min(x.num_tokens, 8) for x in mixed)
    assert descs[0].num_tokens == 16                             # largest first
    only_decode = make_dispatcher(CUDAGraphMode.FULL_DECODE_ONLY)
    assert all(x.uniform_query_len == 1 for x in only_decode.descriptors_to_capture())
    assert make_dispatcher(CUDAGraphMode.NONE).descriptors_to_capture() == []


def test_dispatch_picks_smallest_fitting_graph_and_counts_fallbacks():
    d = make_dispatcher()
    assert d.dispatch(3, 3, 1) == BatchExecutionDescriptor(FULL, 4, 4, 1)
    assert d.dispatch(1, 1, 1) == BatchExecutionDescriptor(FULL, 1, 1, 1)
    assert d.dispatch(9, 3, None) == BatchExecutionDescriptor(FULL, 16, 8, None)
    assert d.dispatch(5, 5, 1).num_reqs == 8
    assert d.num_graph_steps == 4 and d.num_eager_fallbacks == 0
    eager = d.dispatch(40, 2, None)                              # beyond every captured size
    assert eager.mode == CUDAGraphMode.NONE and eager.num_tokens >= 40
    assert d.num_eager_fallbacks == 1
    decode_only = make_dispatcher(CUDAGraphMode.FULL_DECODE_ONLY)
    assert decode_only.dispatch(9, 3, None).mode == CUDAGraphMode.NONE
    assert decode_only.dispatch(3, 3, 1).mode == FULL
    # decode hits are remembered per request count, and forgotten when the captured set changes
    steps = d.num_graph_steps
    assert d.dispatch(3, 3, 1) is d.dispatch(3, 3, 1) and d.num_graph_steps == steps + 2
    d.captured = [c for c in d.captured if c.num_reqs != 4]
    assert d.dispatch(3, 3, 1).mode == CUDAGraphMode.NONE


# ------------------------------------------------------------------ state pairs (seed 001)
class LazyState:
    """An attention state that plans on its first run, like FlashInfer's wrappers."""

    def __init__(self) -> None:
        self.initialized = False
        self.workspace = torch.zeros(4)


def lazy_forward_factory(x: torch.Tensor, share_state: bool):
    shared = LazyState()

    def create_forward_fn(key, warmup):
        state = shared if share_state else LazyState()

        def fn():
            if not state.initialized:            # the "plan": derived from the current inputs
                state.workspace.copy_(x * 2)
                state.initialized = True
            return state.workspace + 1
        return fn, state
    return create_forward_fn


@pytest.mark.parametrize("share_state, correct", [(True, False), (False, True)])
def test_capture_needs_its_own_attention_state(share_state, correct):
    x = torch.arange(4.0)
    manager = CUDAGraphManager(FakeGraphRuntime())
    pairs, report = manager.capture(["k"], lazy_forward_factory(x, share_state), progress=False)
    assert report.num_graphs == 1
    assert (pairs["k"].warmup is pairs["k"].captured) == share_state
    x.copy_(torch.tensor([10.0, 20.0, 30.0, 40.0]))               # new step, same buffers
    out = manager.replay("k")
    assert torch.equal(out, x * 2 + 1) == correct


def test_warmups_run_inside_compile_ahead_and_before_any_capture():
    log: list = []

    @contextlib.contextmanager
    def compile_ahead():
        log.append("enter")
        yield
        log.append("compiles loaded")

    runtime = FakeGraphRuntime()
    original_capture = runtime.capture
    runtime.capture = lambda fn: (log.append("capture"), original_capture(fn))[1]

    def create_forward_fn(key, warmup):
        state = object()

        def fn():
            log.append((key, warmup, id(state)))
            return torch.zeros(1)
        return fn, state

    manager = CUDAGraphManager(runtime, compile_ahead)
    pairs, report = manager.capture(["a", "b"], create_forward_fn, progress=False,
                                    warmup_order=["b", "a"])
    assert report.num_graphs == 2
    assert [e if isinstance(e, str) else e[:2] for e in log] == [
        "enter", ("b", True), ("a", True), "compiles loaded",
        "capture", ("a", False), "capture", ("b", False)]
    warm_ids = {e[0]: e[2] for e in log if isinstance(e, tuple) and e[1]}
    assert all(id(pairs[k].warmup) == warm_ids[k] for k in "ab")
    assert all(pairs[k].captured is not pairs[k].warmup for k in "ab")
    with pytest.raises(ValueError, match="same keys"):
        manager.capture(["a", "b"], create_forward_fn, progress=False, warmup_order=["a"])


def test_garbage_is_collected_before_captures_and_not_during_them():
    """An earlier engine's garbage cycles are freed before the captures (their destructors
    may call what a capture forbids), and the cycle collector stays off while they run."""
    freed: list = []

    class Cycle:
        def __init__(self):
            self.me = self

        def __del__(self):
            freed.append(self)

    seen: list = []

    def create_forward_fn(key, warmup):
        def fn():
            if not warmup:
                seen.append((len(freed), gc.isenabled()))
            return torch.zeros(1)
        return fn, None

    Cycle()
    manager = CUDAGraphManager(FakeGraphRuntime())
    assert gc.isenabled()
    manager.capture(["a", "b"], create_forward_fn, progress=False)
    assert seen == [(1, False), (1, False)]
    assert gc.isenabled()


def test_fake_graph_refuses_host_syncs():
    manager = CUDAGraphManager(FakeGraphRuntime())
    x = torch.ones(3)
    with pytest.raises(RuntimeError, match="host synchronization"):
        manager.capture(["k"], lambda key, warmup: ((lambda: x.sum().item()), None), progress=False)


# ------------------------------------------------------------------ engine parity
@pytest.fixture(scope="module")
def engines():
    common = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=32,
                  num_gpu_blocks_override=128)
    graphs = LLM("tiny-qwen3", cudagraph_runtime="fake", cudagraph_capture_sizes=[1, 2, 4, 8, 16],
                 **common)
    return graphs, LLM("tiny-qwen3", **common)


def test_graph_replay_matches_eager_on_random_batches(engines):
    graphs, eager = engines
    runner = graphs.engine.runner
    # a model graph per descriptor (decode 1, 2, 4, 8; mixed 1..16) + the sampler variants
    # (temperature; + top-k/top-p/min_p; everything) per request count (1, 2, 4, 8)
    assert runner.capture_report.num_graphs == 9 + 3 * 4 and runner.compiles_during_capture == 0
    rng = random.Random(0)
    for trial in range(3):
        prompts = [{"prompt_token_ids": [rng.randrange(1, 700) for _ in range(rng.randrange(1, 40))]}
                   for _ in range(rng.randrange(1, 8))]
        params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), top_k=rng.choice([-1, 20]),
                                 seed=rng.randrange(100), max_tokens=rng.randrange(2, 12),
                                 ignore_eos=True, logprobs=rng.choice([None, 2]))
                  for _ in prompts]
        a = graphs.generate(prompts, params, use_tqdm=False)
        b = eager.generate(prompts, params, use_tqdm=False)
        for x, y in zip(a, b):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids
            if x.outputs[0].logprobs is not None:
                for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
                    assert lx.keys() == ly.keys()
                    assert all(abs(lx[t].logprob - ly[t].logprob) < 1e-4 for t in lx)
    d = runner.dispatcher
    # a sampling step replays its model graph and then a sampler graph
    assert d.num_graph_steps > 0
    assert d.num_graph_steps < runner.graphs.num_replays <= 2 * d.num_graph_steps


def test_graph_inputs_are_never_reallocated(engines):
    graphs, _ = engines
    runner = graphs.engine.runner
    tensors = graph_input_tensors(runner)
    before = [t.data_ptr() for t in tensors]
    steps0, replays0 = runner.dispatcher.num_graph_steps, runner.graphs.num_replays
    graphs.generate(["Hello there", "A"], SamplingParams(temperature=0.0, max_tokens=6),
                    use_tqdm=False)
    assert [t.data_ptr() for t in tensors] == before
    # greedy steps replay the model graph alone
    steps = runner.dispatcher.num_graph_steps - steps0
    assert steps > 0 and runner.graphs.num_replays - replays0 == steps


def random_generation(llms, seed: int, trials: int = 3):
    """Each engine's token ids and logprobs over the same random batches."""
    rng = random.Random(seed)
    outs = [[] for _ in llms]
    for _ in range(trials):
        prompts = [{"prompt_token_ids": [rng.randrange(1, 700)
                                         for _ in range(rng.randrange(1, 40))]}
                   for _ in range(rng.randrange(1, 8))]
        params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(100),
                                 max_tokens=rng.randrange(2, 12), ignore_eos=True, logprobs=2)
                  for _ in prompts]
        for out, llm in zip(outs, llms):
            out.extend((o.outputs[0].token_ids,
                        [{t: lp.logprob for t, lp in s.items()} for s in o.outputs[0].logprobs])
                       for o in llm.generate(prompts, params, use_tqdm=False))
    return outs


@pytest.mark.parametrize("model, kw", [
    ("tiny-qwen3", dict(batch_invariant=True)),      # bit for bit: the invariant kernels
    ("tiny-qwen3", dict(attention_backend="sdpa")),   # cannot be captured in FULL graphs
    ("tiny-qwen3.5", {}),                             # hybrid: GDN layers inside the pieces
    ("tiny-qwen3-vl", {}),                            # MRoPE rows made outside the pieces
])
def test_piecewise_graphs_equal_full_graphs_and_eager(model, kw):
    """--cudagraph-mode piecewise: graphs around everything but attention, which runs
    eagerly between the pieces with each step's metadata. Same tokens as FULL graphs and
    as eager steps (bit for bit in batch-invariant mode, logprobs included)."""
    common = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=32,
                  num_gpu_blocks_override=128, cudagraph_runtime="fake",
                  cudagraph_capture_sizes=[1, 2, 4, 8, 16], **kw)
    modes = ["piecewise", "none"] + (["full"] if kw.get("attention_backend") != "sdpa" else [])
    llms = [LLM(model, cudagraph_mode=m, **common) for m in modes]
    runner = llms[0].engine.runner
    pieced = [g for g, _ in runner.graphs.graphs.values() if isinstance(g, PiecewiseGraph)]
    layers = runner.cache_specs.attention.num_layers
    assert len(pieced) > 1 and all(len(g.pieces) == 2 * layers + 1 for g in pieced)
    outs = random_generation(llms, seed=3)
    exact = kw.get("batch_invariant")
    for other in outs[1:]:
        for (ids, lps), (ids2, lps2) in zip(outs[0], other):
            assert ids == ids2
            for a, b in zip(lps, lps2):
                assert a.keys() == b.keys()
                assert all((a[t] == b[t]) if exact else abs(a[t] - b[t]) < 1e-4 for t in a)
    assert runner.dispatcher.num_graph_steps > 0


def test_lazy_sizes_are_captured_on_first_use():
    sched = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192)
    lazy = lazy_capture_sizes(None, None, sched)
    assert lazy[0] == 768 and 4096 in lazy and 4608 in lazy and lazy[-1] == 8192
    assert all(b - a <= 512 for a, b in zip(lazy, lazy[1:]))
    assert lazy_capture_sizes([1, 2], None, sched) == []       # explicit sizes: no lazy ones
    d = Dispatcher(FULL, (1, 2, 4, 8, 16), 8, 100, pad_eager=False, lazy_sizes=(32, 64, 100))
    d.captured = set(d.descriptors_to_capture())
    first = d.dispatch(40, 3, None)
    assert first.mode == CUDAGraphMode.NONE and d.num_eager_fallbacks == 1
    assert d.pending == {BatchExecutionDescriptor(FULL, 64, 8, None)}
    d.captured = d.captured | d.pending
    d.pending.clear()
    assert d.dispatch(50, 2, None) == BatchExecutionDescriptor(FULL, 64, 8, None)
    assert d.dispatch(70, 2, None).mode == CUDAGraphMode.NONE   # 100: not captured yet
    assert d.num_eager_fallbacks == 2 and d.num_graph_steps == 1


def test_steps_above_the_captured_sizes_replay_lazily_captured_graphs(monkeypatch):
    """Default sizes (captured up to 512 tokens) and a 1,024-token budget: a longer prompt
    step runs eagerly once, its size is captured before the next step, and later steps of
    that size replay it; the tokens are the eager engine's. The lazy capture pauses the
    cycle collector without a full collection first (slow in a served process)."""
    common = dict(max_model_len=2048, max_num_seqs=4, max_num_batched_tokens=1024,
                  num_gpu_blocks_override=512)
    graphs, eager = LLM("tiny-qwen3", cudagraph_runtime="fake", **common), LLM("tiny-qwen3",
                                                                                **common)
    d = graphs.engine.runner.dispatcher
    assert graphs.engine.config.compilation.lazy_capture_sizes == (768, 1024)
    calls = []
    monkeypatch.setattr(manager, "gc", types.SimpleNamespace(
        collect=lambda: calls.append("collect"), disable=lambda: calls.append("disable"),
        isenabled=gc.isenabled, enable=gc.enable))
    rng = random.Random(1)
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for n in (900, 950):
        prompt = [{"prompt_token_ids": [rng.randrange(1, 700) for _ in range(n)]}]
        assert (graphs.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids
                == eager.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids)
    assert BatchExecutionDescriptor(FULL, 1024, 4, None) in d.captured
    assert d.num_eager_fallbacks == 1            # the first 1,024-token step only
    assert calls == ["disable"]


def test_unowned_tensors_alias_memory_without_keeping_it():
    """A PIECEWISE graph's hold on its eager calls' inputs and outputs: the same memory and
    layout, and freed once its owner is gone (else every graph kept every layer's tensors)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    owner = torch.arange(24.0).view(4, 6)[1:, ::2]
    alias = unowned(owner)
    assert (alias.shape, alias.stride(), alias.storage_offset()) == (
        owner.shape, owner.stride(), owner.storage_offset())
    owner.add_(1)
    assert torch.equal(alias, owner)
    ref = StorageWeakRef(owner.untyped_storage())
    del owner
    assert ref.expired()
