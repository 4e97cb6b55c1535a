"""InputBuffers' steady-decode path (`_advance_decode`) writes exactly what the general path
writes: every prepare of a real engine run is repeated on a second InputBuffers that always
takes the general path, and the staged host values must match."""
from __future__ import annotations

import numpy as np
import pytest

from fullgraph import LLM, SamplingParams
from fullgraph.worker.inputs import InputBuffers

TOKEN_FIELDS = ("input_ids", "positions", "slot_mapping")


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_steady_decode_path_matches_the_general_path(hf_dir, async_scheduling):
    llm = LLM(hf_dir, max_model_len=96, max_num_seqs=6, block_size=4,
              num_gpu_blocks_override=200, async_scheduling=async_scheduling, device="cpu")
    runner = llm.engine.runner
    buffers = runner.buffers
    shadow = InputBuffers(buffers.block_table.np.shape[0] - 1, len(buffers.arena.np["positions"]),
                          buffers.block_table.np.shape[1], buffers.block_size,
                          buffers.vocab_size, runner.device)
    fast_steps = 0
    prepare, advance = buffers.prepare, buffers._advance_decode

    def checked_prepare(chunks, desc, prev_rows=None, copy=True):
        shadow._last_decode = None                   # the general path, always
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

    buffers.prepare, buffers._advance_decode = checked_prepare, counted_advance
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(1, 500, int(n)).tolist()}
               for n in rng.integers(1, 30, 10)]
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.8])), seed=i,
                             max_tokens=int(rng.integers(2, 40)), ignore_eos=True)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    assert fast_steps > 20            # the steady path really ran, across block boundaries
