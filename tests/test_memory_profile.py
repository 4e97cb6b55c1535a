"""The memory profile's step, on every kind of model the presets cover.

On a GPU without num_gpu_blocks_override the runner sizes its KV cache by running one
max-size step, the general sampler and (with speculation) a sampled verification before the
rest of its construction (`ModelRunner._profile_num_blocks`). GPU tests pass the override,
so this CPU test runs that step at the same point of the construction, on a probe cache,
then lets the CPU default follow: the step must find everything it reads, and the engine
must then generate what an engine built without it does. (A hybrid once raised
AttributeError there, on the GPU only.)"""
from __future__ import annotations

import pytest

from fullgraph import LLM, SamplingParams
from fullgraph.worker.model_runner import ModelRunner

CASES = {
    "dense": dict(model="tiny-qwen3"),
    "hybrid": dict(model="tiny-qwen3.5"),
    "vision-language": dict(model="tiny-qwen3-vl"),
    "dense-eagle3": dict(model="tiny-qwen3", speculative_config={
        "method": "eagle3", "model": "tiny-qwen3-eagle3", "num_speculative_tokens": 2}),
    "hybrid-eagle3": dict(model="tiny-qwen3.5", speculative_config={
        "method": "eagle3", "model": "tiny-qwen3.5-eagle3", "num_speculative_tokens": 2}),
    "vision-language-eagle3": dict(model="tiny-qwen3-vl", speculative_config={
        "method": "eagle3", "model": "tiny-qwen3-vl-eagle3", "num_speculative_tokens": 2}),
    "hybrid-batch-invariant": dict(model="tiny-qwen3.5", batch_invariant=True),
    "vision-language-batch-invariant": dict(model="tiny-qwen3-vl", batch_invariant=True),
}


def run(kw: dict) -> list[list[int]]:
    llm = LLM(max_model_len=128, max_num_batched_tokens=64, max_num_seqs=8, **kw)
    sp = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 40, 70)],
                        sp, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("case", list(CASES))
def test_the_profile_step_runs_on_a_runner_being_built(case, monkeypatch):
    want = run(CASES[case])
    default = ModelRunner._default_num_blocks
    profiled = []

    def profile_then_default(self):
        self._allocate_kv_cache(-(-self.max_num_tokens // self.block_size) + 1)
        self._profile_run()
        profiled.append(True)
        return default(self)

    monkeypatch.setattr(ModelRunner, "_default_num_blocks", profile_then_default)
    assert run(CASES[case]) == want
    assert profiled == [True]
