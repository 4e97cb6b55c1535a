"""Full CUDA graphs on the GPU: parity with eager, no recompiles, the state-pair protocol."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import graph_input_tensors
from fullgraph import LLM, SamplingParams
from fullgraph.worker.cudagraph.manager import CUDAGraphManager, CUDAGraphRuntime
from fullgraph.worker.model_runner import compile_count

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def engines(hf_dir):
    common = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=16,
                  max_num_batched_tokens=128, num_gpu_blocks_override=512)
    # the graph engine also schedules asynchronously: its input tokens come from the device
    graphs = LLM(hf_dir, cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128],
                 async_scheduling=True, **common)
    eager = LLM(hf_dir, enforce_eager=True, **common)
    return graphs, eager


def test_capture_report_and_no_compiles_during_capture(engines):
    graphs, _ = engines
    runner = graphs.engine.runner
    report = runner.capture_report
    # model graphs: decode 1..16 + mixed 1..128; sampler graphs: request counts 1..16
    assert report.num_graphs == (5 + 8) + 5
    assert runner.compiles_during_capture == 0
    assert report.memory_bytes < 2**30


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
