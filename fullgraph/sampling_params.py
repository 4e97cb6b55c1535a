"""Per-request sampling parameters, shaped like vLLM's so users can switch.

Every field is checked when the object is made: a wrong type or a value out of range is a
ValueError naming the field, never a TypeError from deep inside a step.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields


def _integer(name: str, value, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} "
                         f"({type(value).__name__})")
    return int(value)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(slots=True)
class SamplingParams:
    n: int = 1                       # samples per prompt (the prompt is prefilled once)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                  # -1 or 0: no top-k restriction
    seed: int | None = None
    max_tokens: int | None = 16      # None: up to max_model_len
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None      # number of top logprobs besides the sampled token's
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's penalties: presence / frequency subtract from the logits of tokens generated so
    # far (once / per occurrence); repetition divides positive (multiplies negative) logits of
    # tokens in the prompt or generated so far
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0               # keep tokens with p >= min_p * p(most likely token)
    min_tokens: int = 0              # no eos, stop_token_ids or stop strings before this many
    logit_bias: dict[int, float] | None = None      # token id -> added to its logit
    bad_words: list[str] | None = None              # never generate these words
    allowed_token_ids: list[int] | None = None      # generate only these tokens
    prompt_logprobs: int | None = None  # logprobs of each prompt token (+ top-N), vLLM's shape
    # False: no output text nor logprob token strings, ids only (no stop strings then)
    detokenize: bool = True
    # the prompt's last k tokens only (-1: as many as max_model_len leaves room for)
    truncate_prompt_tokens: int | None = None
    # vLLM's option for slow tokenizers; fast ones (the only kind here) add no spaces
    spaces_between_special_tokens: bool = True
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())
    # `bad_words` as token sequences (set by the engine, which owns the tokenizer)
    bad_words_token_ids: list[list[int]] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self.n = _integer("n", self.n)
        self.temperature = _number("temperature", self.temperature)
        self.top_p = _number("top_p", self.top_p)
        self.top_k = _integer("top_k", self.top_k)
        self.seed = _integer("seed", self.seed, optional=True)
        self.max_tokens = _integer("max_tokens", self.max_tokens, optional=True)
        self.logprobs = _integer("logprobs", self.logprobs, optional=True)
        self.prompt_logprobs = _integer("prompt_logprobs", self.prompt_logprobs, optional=True)
        self.min_tokens = _integer("min_tokens", self.min_tokens)
        self.truncate_prompt_tokens = _integer("truncate_prompt_tokens",
                                               self.truncate_prompt_tokens, optional=True)
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            setattr(self, name, _number(name, getattr(self, name)))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
                     "detokenize", "spaces_between_special_tokens"):
            _flag(name, getattr(self, name))
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.min_tokens < 0 or (self.max_tokens is not None
                                   and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got "
                             f"{self.min_tokens}")
        self._check_token_lists()
        if self.seed is not None and not -2**63 <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            stop = [self.stop]
        elif self.stop is None or isinstance(self.stop, (list, tuple)):
            stop = list(self.stop or [])
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        self.stop_strings = tuple(stop)
        if stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True (they are matched in the text)")
        k = self.truncate_prompt_tokens
        if k is not None and k < 1 and k != -1:
            raise ValueError(f"truncate_prompt_tokens must be -1 or >= 1, got {k}")
        ids = self.stop_token_ids
        if ids is not None and (not isinstance(ids, (list, tuple)) or any(
                isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0
                for t in ids)):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, "
                             f"got {ids!r}")
        if ids is not None:
            self.stop_token_ids = [int(t) for t in ids]

    def _check_token_lists(self) -> None:
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict):
                raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}")
            # JSON keys are strings: "42" is token 42, as in OpenAI's API
            items = [(_integer("logit_bias token id", int(k) if isinstance(k, str)
                               and k.lstrip("-").isdigit() else k),
                      _number("logit_bias value", v)) for k, v in bias.items()]
            if any(t < 0 for t, _ in items):
                raise ValueError(f"logit_bias token ids must be >= 0, got {bias!r}")
            # vLLM and OpenAI clamp biases to [-100, 100]
            self.logit_bias = {t: max(-100.0, min(100.0, v)) for t, v in items}
        words = self.bad_words
        if words is not None and (not isinstance(words, (list, tuple))
                                  or any(not isinstance(w, str) or not w for w in words)):
            raise ValueError(f"bad_words must be a list of non-empty strings, got {words!r}")
        ids = self.allowed_token_ids
        if ids is not None and (not isinstance(ids, (list, tuple)) or not ids or any(
                isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0
                for t in ids)):
            raise ValueError(f"allowed_token_ids must be a non-empty list of non-negative "
                             f"integers, got {ids!r}")
        if ids is not None:
            self.allowed_token_ids = [int(t) for t in ids]

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls) if f.init}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
