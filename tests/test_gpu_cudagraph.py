"""Full CUDA graphs on the GPU: parity with eager, no recompiles, the state-pair protocol."""
from __future__ import annotations

import gc
import random

import pytest
import torch

from conftest import graph_input_tensors
from fullgraph import LLM, SamplingParams
from fullgraph.layers import pdl
from fullgraph.worker.cudagraph.manager import CUDAGraphManager, CUDAGraphRuntime
from fullgraph.worker.model_runner import SAMPLER_VARIANTS, compile_count

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def engines(hf_dir):
    common = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=16,
                  max_num_batched_tokens=128, num_gpu_blocks_override=512)
    launches = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pdl, "launch_outside_graph",
                   lambda device, f=pdl.launch_outside_graph: launches.append(f(device)))
        # the graph engine also schedules asynchronously: its input tokens come from the device
        graphs = LLM(hf_dir, cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128],
                     async_scheduling=True, **common)
        eager = LLM(hf_dir, enforce_eager=True, **common)
    graphs.pdl_launches_after_capture = launches
    return graphs, eager


def test_capture_report_and_no_compiles_during_capture(engines):
    graphs, _ = engines
    runner = graphs.engine.runner
    report = runner.capture_report
    # model graphs: decode 1..16 + mixed 1..128; sampler graphs: request counts 1..16, each
    # in every sampler variant
    assert report.num_graphs == (5 + 8) + 5 * len(SAMPLER_VARIANTS)
    assert runner.compiles_during_capture == 0
    assert report.memory_bytes < 2**30
    # one eager PDL launch after capture, else replays run slower (layers/pdl.py)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert [m is not None for m in graphs.pdl_launches_after_capture] == [hopper]


def test_graph_replay_matches_eager_and_does_not_recompile(engines):
    graphs, eager = engines
    rng = random.Random(0)
    runner = graphs.engine.runner
    graph_compiles = 0       # the process-wide counter also sees the eager engine's compiles
    for trial in range(4):
        prompts = [{"prompt_token_ids": [rng.randrange(1, 700) for _ in range(rng.randrange(1, 90))]}
                   for _ in range(rng.randrange(1, 16))]
        params = [SamplingParams(temperature=rng.choice([0.0, 0.9]), top_p=rng.choice([1.0, 0.9]),
                                 seed=rng.randrange(1000), max_tokens=rng.randrange(4, 24),
                                 ignore_eos=True) for _ in prompts]
        c0 = compile_count()
        a = graphs.generate(prompts, params, use_tqdm=False)
        graph_compiles += compile_count() - c0
        b = eager.generate(prompts, params, use_tqdm=False)
        for x, y in zip(a, b):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids
    assert runner.dispatcher.num_graph_steps > 20 and runner.dispatcher.num_eager_fallbacks == 0
    assert graph_compiles == 0, "steady-state graph steps compiled something"


def test_graph_inputs_are_not_reallocated(engines):
    graphs, _ = engines
    runner = graphs.engine.runner
    tensors = graph_input_tensors(runner)
    ptrs = [t.data_ptr() for t in tensors]
    graphs.generate(["Hello", "The cat sat"], SamplingParams(temperature=0.0, max_tokens=8),
                    use_tqdm=False)
    assert [t.data_ptr() for t in tensors] == ptrs


def test_graph_step_copies_its_inputs_and_signals_the_host(engines):
    """A graph step of several requests copies its inputs inside its graph, and the event
    the host waits on before rewriting the pinned staging buffers is recorded there, after
    the copy: with a long kernel queued ahead of the replay, the event is still pending when
    `launch` returns, and the outputs are right. (One request copies eagerly.)"""
    graphs, eager = engines
    runner = graphs.engine.runner
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(5, 40))}, {"prompt_token_ids": [7, 8, 9]}]
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    pending_at_launch = []
    replay = runner.graphs.replay

    def replay_behind_a_long_kernel(key):
        torch.cuda._sleep(200_000_000)                       # ~0.1 s
        out = replay(key)
        pending_at_launch.append(not runner._inputs_copied.query())
        return out

    runner.graphs.replay = replay_behind_a_long_kernel
    try:
        steps0 = runner.dispatcher.num_graph_steps
        got = [o.outputs[0].token_ids for o in graphs.generate(prompts, params, use_tqdm=False)]
    finally:
        del runner.graphs.replay
    assert runner.dispatcher.num_graph_steps > steps0
    assert pending_at_launch and all(pending_at_launch)
    assert got == expected
    assert runner._inputs_copied.query()


@pytest.mark.parametrize("share_state, correct", [(True, False), (False, True)])
def test_lazy_backend_needs_separate_capture_state(share_state, correct):
    x = torch.arange(4.0, device="cuda")

    class LazyState:
        def __init__(self):
            self.initialized = False
            self.workspace = torch.zeros(4, device="cuda")

    shared = LazyState()

    def create_forward_fn(key, warmup):
        state = shared if share_state else LazyState()

        def fn():
            if not state.initialized:
                state.workspace.copy_(x * 2)
                state.initialized = True
            return state.workspace + 1
        return fn, state

    manager = CUDAGraphManager(CUDAGraphRuntime(torch.device("cuda")))
    manager.capture(["k"], create_forward_fn, progress=False)
    x.copy_(torch.tensor([10.0, 20.0, 30.0, 40.0], device="cuda"))
    out = manager.replay("k")
    torch.cuda.synchronize()
    assert torch.equal(out, x * 2 + 1) == correct


def _forget_compiled_triton_kernels() -> None:
    """Drop every fullgraph Triton kernel's in-memory compiled variants, as in a new process
    (Triton's on-disk cache is the test's own, empty directory)."""
    import sys
    from triton.runtime.jit import JITFunction
    from fullgraph.layers.launch import Launcher
    for name, module in list(sys.modules.items()):
        if name.startswith("fullgraph.") and module is not None:
            for value in vars(module).values():
                if isinstance(value, JITFunction):
                    value.device_caches.clear()
                elif isinstance(value, Launcher):     # its direct launches skip the JIT
                    value.clear()


def test_cold_start_compiles_ahead_in_workers_and_decodes_as_without(monkeypatch, tmp_path):
    """Compile-ahead skips the warmups' launches of kernels nobody has compiled yet; the
    graphs captured afterwards must compute what an engine that compiled them in its
    warmups computes (bf16, so the one-row GEMV and fused decode kernels run)."""
    from fullgraph.worker import compile_worker
    submitted = []
    original_submit = compile_worker.CompileWorkers.submit

    def submit(self, module, name, specialization):
        submitted.append(f"{module}.{name}")
        return original_submit(self, module, name, specialization)
    monkeypatch.setattr(compile_worker.CompileWorkers, "submit", submit)
    common = dict(device="cuda", dtype="bfloat16", max_model_len=256, max_num_seqs=8,
                  max_num_batched_tokens=64, num_gpu_blocks_override=128,
                  cudagraph_capture_sizes=[1, 2, 4, 8])
    prompts = [{"prompt_token_ids": list(range(3 + 7 * i, 40 + 11 * i))} for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for ahead in (True, False):
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / f"triton-{ahead}"))
        _forget_compiled_triton_kernels()
        llm = LLM("tiny-qwen3", compile_ahead=ahead, **common)
        assert llm.engine.runner.compiles_during_capture == 0
        outputs[ahead] = [o.outputs[0].token_ids for o in
                          llm.generate(prompts, params, use_tqdm=False)]
        del llm
    assert any("paged_decode" in k for k in submitted)
    assert any("gemv" in k for k in submitted)
    assert outputs[True] == outputs[False]


def _random_outputs(llm, seed: int):
    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(1, 600) for _ in range(rng.randrange(1, 90))]}
               for _ in range(10)]
    params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=i, max_tokens=16,
                             ignore_eos=True) for i in range(10)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("backend", ["flex", "triton", "sdpa"])
def test_piecewise_graphs_match_eager_on_gpu(hf_dir, backend):
    """PIECEWISE: the CUDA graph pieces around eager attention (sdpa too, which FULL graphs
    cannot hold) give the eager engine's tokens (float32)."""
    common = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=16,
                  max_num_batched_tokens=128, num_gpu_blocks_override=512,
                  attention_backend=backend, cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32])
    piecewise = LLM(hf_dir, cudagraph_mode="piecewise", **common)
    assert piecewise.engine.runner.capture_report.num_graphs > 0
    got = _random_outputs(piecewise, 5)
    assert piecewise.engine.runner.dispatcher.num_graph_steps > 0
    assert got == _random_outputs(LLM(hf_dir, enforce_eager=True, **common), 5)


def test_piecewise_graphs_take_no_more_memory_than_full_graphs():
    """PIECEWISE graphs share the pool as FULL graphs do: an eager call's input and output
    are not held by the graph (before, every graph kept every layer's qkv and attention
    output: the 0.6B preset's start-up sizes took 3.76 GiB against FULL's 0.28, and a
    server at 0.9 GPU memory utilization ran out of memory on a lazy capture)."""
    common = dict(device="cuda", dtype="bfloat16", max_model_len=2048, max_num_seqs=8,
                  max_num_batched_tokens=2048, num_gpu_blocks_override=256,
                  cudagraph_capture_sizes=[512, 1024, 1536, 2048])
    used = {}
    for mode in ("full", "piecewise"):
        llm = LLM("qwen3-0.6b-random", cudagraph_mode=mode, **common)
        used[mode] = llm.engine.runner.capture_report.memory_bytes
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    # held before: per graph and layer its qkv and output, 1.2 GiB over these sizes
    assert used["piecewise"] <= used["full"] + (32 << 20), used


def test_lazily_captured_prefill_graphs_on_gpu(hf_dir):
    """A step above the start-up sizes runs eagerly once; its size is captured before the
    next step (async scheduling: a step is in flight) and replayed after; tokens as eager."""
    common = dict(device="cuda", dtype="float32", max_model_len=1024, max_num_seqs=4,
                  max_num_batched_tokens=1024, num_gpu_blocks_override=512)
    graphs = LLM(hf_dir, async_scheduling=True, **common)
    eager = LLM(hf_dir, enforce_eager=True, **common)
    rng = random.Random(2)
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for n in (900, 950, 1000):
        prompt = [{"prompt_token_ids": [rng.randrange(1, 600) for _ in range(n)]}]
        assert (graphs.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids
                == eager.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids)
    d = graphs.engine.runner.dispatcher
    assert d.num_eager_fallbacks == 1 and any(x.num_tokens == 1024 for x in d.captured)
