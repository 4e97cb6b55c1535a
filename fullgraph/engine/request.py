"""A request as the engine tracks it."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from fullgraph.multimodal.inputs import MultiModalInputs
from fullgraph.outputs import Logprob
from fullgraph.sampling_params import SamplingParams
from fullgraph.worker.sampler import multi_token_bad_words, needs_state


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int                               # per-request sampling seed (given or drawn)
    max_tokens: int                         # resolved against max_model_len
    prompt: str | None = None
    index: int = 0                          # which of its prompt's `n` samples this is
    # the first sample of the same prompt: this one waits until the leader's prompt is in the
    # prefix cache, or until the leader forks it (a model with recurrent state: below), so
    # the prompt is prefilled once (None: no wait)
    leader: "Request | None" = None
    mm_inputs: MultiModalInputs | None = None   # its images (multimodal models)
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0            # tokens whose KV is in the cache (or being written
                                            # by a launched step)
    num_pending: int = 0                    # tokens launched steps sample, not yet known here
    spec_token_ids: list[int] = field(default_factory=list)   # drafts for its next step
    # a leader's samples still to fork: the leader stops before its last prompt token until
    # they take its blocks and state there (engine/scheduler.py)
    followers: list["Request"] = field(default_factory=list)
    num_draft_tokens: int = 0               # drafts verified so far, and of them accepted
    num_accepted_tokens: int = 0
    num_cached_tokens: int = 0              # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    block_ids: list[int] = field(default_factory=list)
    state_slot: int = 0                     # linear-attention state slot while running (0: none)
    sampling_slot: int = -1                 # the sampler's state slot while running (-1: none)
    block_hashes: list[int] = field(default_factory=list)   # of full blocks, in order
    num_registered_blocks: int = 0          # leading blocks already in the prefix cache
    logprobs: list[dict[int, Logprob]] | None = None
    # vLLM's shape: None for the first prompt token, then one dict per prompt token
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None  # time.monotonic(), as arrival_time
    first_token_time: float | None = None
    last_token_time: float | None = None
    needs_sampling_state: bool = field(init=False, default=False)   # penalties, bias ...
    # its next token's bans depend on its last one (multi-token bad words): never scheduled
    # while a sampled token is still on its way to the host
    waits_for_output: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.needs_sampling_state = needs_state(self.sampling_params)
        self.waits_for_output = bool(multi_token_bad_words(self.sampling_params))
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def waits_for_leader(self) -> bool:
        lead = self.leader
        if lead is None or lead.is_finished:
            return False
        return self in lead.followers or lead.num_computed_tokens < lead.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
