"""The offline API: `LLM(model=...).generate(prompts, sampling_params)`, shaped like vLLM's."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm

from fullgraph.engine.args import EngineArgs
from fullgraph.engine.engine import LLMEngine
from fullgraph.engine.request import Request
from fullgraph.entrypoints.vllm_args import split_vllm_args
from fullgraph.outputs import RequestOutput
from fullgraph.sampling_params import SamplingParams

PromptType = str | dict[str, Any]


class LLM:
    def __init__(self, model: str = "tiny-qwen3", **kwargs: Any) -> None:
        """`kwargs`: EngineArgs' fields, and vLLM's arguments with one meaning here
        (`tensor_parallel_size=1`, `trust_remote_code`, ...: entrypoints/vllm_args.py)."""
        kwargs = split_vllm_args(kwargs)
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise TypeError(f"LLM() got unexpected arguments: {', '.join(sorted(unknown))}")
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` samples with when given no SamplingParams: fullgraph's defaults,
        overridden by the model's generation_config.json (`generation_config`)."""
        return SamplingParams(**dict(self.engine.config.model.sampling_defaults))

    def generate(self, prompts: PromptType | Sequence[PromptType] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, *,
                 prompt_token_ids: list[int] | list[list[int]] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order. `prompt_token_ids`
        (one list of ids, or one per prompt) is vLLM's older way to pass token prompts.

        All prompts are validated before any runs: a bad one raises ValueError naming its
        index and problem, nothing is enqueued, and the engine stays usable.
        """
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("pass either prompts or prompt_token_ids, not both")
            prompts = _token_prompts(prompt_token_ids)
        if prompts is None:
            raise ValueError("generate() needs prompts (or prompt_token_ids)")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, Iterable):
            raise ValueError(f"prompts must be a string, a prompt dict or a list of them, got "
                             f"{type(prompts).__name__}")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = (list(sampling_params) if isinstance(sampling_params, Sequence)
                  else [sampling_params] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        groups = []        # per prompt: its request id, and one engine request per sample
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            request_id = f"offline-{next(self._ids)}"
            try:
                groups.append((request_id, self.engine.make_requests(
                    request_id, _prompt_input(prompt), sp, _images(prompt))))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        for req in (r for _, group in groups for r in group):
            self.engine.add(req)
        return self._run(groups, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, *, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Generate for one conversation or a list of them, rendered by the chat template
        (the model's, or `chat_template`) with `chat_template_kwargs` (for example
        `{"enable_thinking": False}`); `continue_final_message` continues the last
        (assistant) message instead of opening a new one (needs add_generation_prompt
        False). Each output's `prompt` is the rendered text."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        kwargs = dict(chat_template_kwargs or {})
        own = {"chat_template", "add_generation_prompt", "continue_final_message"} & set(kwargs)
        if own:
            raise ValueError(f"pass {', '.join(sorted(own))} as LLM.chat's own argument, not in "
                             f"chat_template_kwargs")
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message=True needs add_generation_prompt="
                                 "False")
            kwargs["continue_final_message"] = True
        prompts, texts = [], []
        for i, c in enumerate(conversations):
            try:
                text, ids, images = self.engine.rendered_chat_prompt(
                    c, add_generation_prompt, chat_template=chat_template, **kwargs)
            except ValueError as e:
                raise ValueError(f"conversation {i}: {e}") from None
            texts.append(text)
            prompts.append({"prompt_token_ids": ids} if images is None else
                           {"prompt_token_ids": ids, "multi_modal_data": {"image": images}})
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        return [dataclasses.replace(out, prompt=text) for out, text in zip(outputs, texts)]

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]
                       | Mapping[str, torch.Tensor] | str) -> None:
        """Load new weights into the running engine, for reinforcement learning between
        rollouts: (name, tensor) pairs or a state dict with transformers' names (a
        transformers model's `state_dict()` or `named_parameters()`, whole or any part), or
        a directory of safetensors files in those names, copied in place, so CUDA graphs
        stay captured; the prefix cache is reset, since its KV came from the old weights.
        All or nothing: a bad name or shape is a ValueError and the weights stay as they
        were. Nothing may be generating (`generate` returns finished). A speculative drafter
        keeps its weights."""
        self.engine.update_weights(weights.items() if isinstance(weights, Mapping)
                                   else weights)

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache (vLLM's `LLM.reset_prefix_cache`): False while requests
        are unfinished."""
        return self.engine.reset_prefix_cache()

    def _run(self, groups: list[tuple[str, list[Request]]],
             use_tqdm: bool) -> list[RequestOutput]:
        """Step until every request finished; one output per prompt, its samples' completions
        in index order (vLLM's n completions)."""
        where = {r.request_id: (g, r.index) for g, (_, group) in enumerate(groups)
                 for r in group}
        done: list[dict[int, RequestOutput]] = [{} for _ in groups]
        results: list[RequestOutput | None] = [None] * len(groups)
        bar = _ProgressBar(len(groups), use_tqdm)
        try:
            while any(r is None for r in results):
                for out in self.engine.step():
                    if not out.finished or out.request_id not in where:
                        continue
                    g, index = where[out.request_id]
                    done[g][index] = out
                    request_id, group = groups[g]
                    if len(done[g]) == len(group):
                        results[g] = dataclasses.replace(
                            done[g][0], request_id=request_id,
                            outputs=[done[g][i].outputs[0] for i in range(len(group))])
                        bar.finished(results[g])
        except BaseException:
            for r in where:      # leave the engine clean for the next call
                if r in self.engine.requests:
                    self.engine.abort_request(r)
            raise
        finally:
            bar.close()
        return results


class _ProgressBar:
    """vLLM's progress bar: prompts done, with input and output tokens/s so far."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True,
                        disable=not enabled, postfix=self._speeds(0.0, 0.0))
        self.input_tokens = self.output_tokens = 0

    @staticmethod
    def _speeds(input_speed: float, output_speed: float) -> str:
        return f"est. speed input: {input_speed:.2f} toks/s, output: {output_speed:.2f} toks/s"

    def finished(self, out: RequestOutput) -> None:
        if self.bar.disable:
            return
        self.input_tokens += len(out.prompt_token_ids) * len(out.outputs)
        self.output_tokens += sum(len(c.token_ids) for c in out.outputs)
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.postfix = self._speeds(self.input_tokens / elapsed, self.output_tokens / elapsed)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _token_prompts(ids) -> list[dict[str, Any]]:
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ValueError("prompt_token_ids must be a non-empty list of token ids, or a list "
                         "of such lists")
    if all(isinstance(x, (list, tuple)) for x in ids):
        return [{"prompt_token_ids": list(x)} for x in ids]
    return [{"prompt_token_ids": list(ids)}]


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


def _images(prompt: PromptType):
    """vLLM's `{"multi_modal_data": {"image": image or [images]}}`, or None."""
    if not isinstance(prompt, dict) or prompt.get("multi_modal_data") is None:
        return None
    data = prompt["multi_modal_data"]
    if not isinstance(data, dict) or set(data) - {"image"}:
        raise ValueError("multi_modal_data takes {'image': an image or a list of images}")
    return data.get("image")
