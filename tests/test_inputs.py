"""InputBuffers' steady paths (`_advance_decode`, and `_advance_verify` for speculative
steps) write exactly what the general path writes: every prepare of a real engine run is
repeated on a second InputBuffers that always takes the general path, and the staged host
values must match."""
from __future__ import annotations

import numpy as np
import pytest

from fullgraph import LLM, SamplingParams
from fullgraph.worker.inputs import InputBuffers
from spec_pairs import agreeing_drafter, bigram_target

TOKEN_FIELDS = ("input_ids", "positions", "slot_mapping")


def check_against_general_path(llm: LLM, steady: str, max_tokens: tuple[int, int]) -> int:
    """Generate random prompts with `llm`, checking each prepare against the general path;
    returns how many steps the steady path `steady` (an InputBuffers method) took."""
    runner = llm.engine.runner
    buffers = runner.buffers
    shadow = InputBuffers(buffers.block_table.np.shape[0] - 1, len(buffers.arena.np["positions"]),
                          buffers.block_table.np.shape[1], buffers.block_size,
                          buffers.vocab_size, runner.device)
    fast_steps = 0
    prepare, advance = buffers.prepare, getattr(buffers, steady)

    def checked_prepare(chunks, desc, prev_rows=None, copy=True):
        shadow._last_decode = shadow._last_verify = None      # the general path, always
        expected = shadow.prepare(chunks, desc, prev_rows, copy)
        step = prepare(chunks, desc, prev_rows, copy)
        # the ranges a step writes (on a CPU the device buffers are these host buffers, so
        # the last step's pending-token copy may have landed in input_ids)
        for name, arr in shadow.arena.np.items():
            n = (desc.num_tokens if name in TOKEN_FIELDS
                 else desc.num_reqs + (name == "query_start_loc"))
            got, want = buffers.arena.np[name][:n], arr[:n]
            if name == "input_ids":      # tokens the device fills in from the last step's
                keep = np.ones(n, bool)  # samples are don't-cares on the host
                keep[[i for i in shadow.arena.np["pending_index"][:desc.num_reqs] if i < n]] = False
                got, want = got[keep], want[keep]
            np.testing.assert_array_equal(got, want, err_msg=name)
        np.testing.assert_array_equal(buffers.block_table.np, shadow.block_table.np)
        assert (step.num_reqs, step.num_tokens, step.desc) == \
            (expected.num_reqs, expected.num_tokens, expected.desc)
        assert step.sampling.greedy_only == expected.sampling.greedy_only
        return step

    def counted_advance(*args):
        nonlocal fast_steps
        step = advance(*args)
        fast_steps += step is not None
        return step

    buffers.prepare = checked_prepare
    setattr(buffers, steady, counted_advance)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(1, 500, int(n)).tolist()}
               for n in rng.integers(1, 30, 10)]
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.8])), seed=i,
                             max_tokens=int(rng.integers(*max_tokens)), ignore_eos=True)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    return fast_steps


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_steady_decode_path_matches_the_general_path(hf_dir, async_scheduling):
    llm = LLM(hf_dir, max_model_len=96, max_num_seqs=6, block_size=4,
              num_gpu_blocks_override=200, async_scheduling=async_scheduling, device="cpu")
    # the steady path really ran, across block boundaries
    assert check_against_general_path(llm, "_advance_decode", (2, 40)) > 20


def test_steady_verify_path_matches_the_general_path(tmp_path):
    """Speculative steps in (fake) graphs: requests advance by what they emitted, some
    padded near their end, across block boundaries."""
    target = bigram_target(str(tmp_path / "target"))
    drafter = agreeing_drafter(str(tmp_path / "half"), target, disagree=0.5)
    llm = LLM(target, max_model_len=160, max_num_seqs=8, block_size=4,
              num_gpu_blocks_override=400, cudagraph_runtime="fake",
              cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32], speculative_config={
                  "method": "eagle3", "model": drafter, "num_speculative_tokens": 3})
    assert check_against_general_path(llm, "_advance_verify", (20, 90)) > 10
