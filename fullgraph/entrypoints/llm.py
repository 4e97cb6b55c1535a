"""The offline API: `LLM(model=...).generate(prompts, sampling_params)`, shaped like vLLM's."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from fullgraph.engine.args import EngineArgs
from fullgraph.engine.engine import LLMEngine
from fullgraph.outputs import RequestOutput
from fullgraph.sampling_params import SamplingParams

PromptType = str | dict[str, Any]


class LLM:
    def __init__(self, model: str = "tiny-qwen3", **kwargs: Any) -> None:
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise TypeError(f"LLM() got unexpected arguments: {', '.join(sorted(unknown))}")
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        All prompts are validated before any runs: a bad one raises ValueError naming its
        index and problem, nothing is enqueued, and the engine stays usable.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (list(sampling_params) if isinstance(sampling_params, Sequence)
                  else [sampling_params] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        requests = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            try:
                requests.append(self.engine.make_request(f"offline-{next(self._ids)}",
                                                         _prompt_input(prompt), sp))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        for req in requests:
            self.engine.add(req)
        return self._run(requests, use_tqdm)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True):
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [{"prompt_token_ids": self.engine.apply_chat_template(c)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, requests, use_tqdm: bool) -> list[RequestOutput]:
        order = {r.request_id: i for i, r in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="Generating", unit="req",
                   disable=not use_tqdm or len(requests) < 2)
        try:
            while any(r is None for r in results):
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
        except BaseException:
            for r in requests:      # leave the engine clean for the next call
                if r.request_id in self.engine.requests:
                    self.engine.abort_request(r.request_id)
            raise
        finally:
            bar.close()
        return results


def _prompt_input(prompt: PromptType) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)):
                raise ValueError("prompt_token_ids must be a list of integers")
            return list(ids)
        if "prompt" in prompt and isinstance(prompt["prompt"], str):
            return prompt["prompt"]
    raise ValueError(f"a prompt must be a string or {{'prompt_token_ids': [...]}}, "
                     f"got {type(prompt).__name__}")
