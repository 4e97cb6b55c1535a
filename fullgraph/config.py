"""Frozen configuration dataclasses shared by every layer of the engine.

They are built once, by `fullgraph.engine.args.EngineArgs.create_engine_config`, and never
change afterwards: anything that varies per step lives in step objects, not here.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from fullgraph.layers.policy import KernelPolicy


@dataclass(frozen=True, slots=True)
class ModelConfig:
    path: str                    # resolved local directory (presets are materialized first)
    name: str                    # what the user asked for; served as the model id
    hf_config: Any               # transformers PretrainedConfig (read-only by convention)
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    tokenizer: str = ""          # directory of the tokenizer files ("" = `path`)
    chat_template: str | None = None    # overrides the tokenizer's
    # (SamplingParams field, value): the defaults a request that sets nothing gets, from the
    # model's generation_config.json (`--generation-config`)
    sampling_defaults: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 32
    num_blocks: int = 0          # including the reserved null block 0; 0 = from memory
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    # Schedule and launch step N+1 before step N's samples reach the host, so host work
    # (scheduling, input preparation, detokenizing) overlaps the device's.
    async_scheduling: bool = False
    # drafts a decoding request is scheduled with a step (speculative decoding; 0: none)
    num_speculative_tokens: int = 0


class CUDAGraphMode(enum.Enum):
    NONE = "none"                    # always eager
    FULL = "full"                    # decode and mixed batches, mixed ones bucketed by tokens
    FULL_DECODE_ONLY = "full_decode_only"
    # graphs around everything but attention, which runs eagerly between the pieces with
    # metadata built each step (vLLM's name; the baseline FULL is measured against, and the
    # mode for a backend that cannot be captured)
    PIECEWISE = "piecewise"

    @property
    def graph_mode(self) -> CUDAGraphMode:
        """The mode of the steps that replay graphs."""
        return CUDAGraphMode.PIECEWISE if self == CUDAGraphMode.PIECEWISE else CUDAGraphMode.FULL


@dataclass(frozen=True, slots=True)
class CompilationConfig:
    cudagraph_mode: CUDAGraphMode = CUDAGraphMode.FULL
    cudagraph_capture_sizes: tuple[int, ...] = ()
    # mixed-step token sizes above the captured ones, up to max_num_batched_tokens, each
    # captured the first time a step needs it (that step runs eagerly, counted)
    lazy_capture_sizes: tuple[int, ...] = ()
    graph_runtime: str = "cuda"      # "cuda", or "fake": CPU graphs with replay semantics (tests)
    compile_layers: bool = False     # torch.compile the decoder layers (see EngineArgs)
    # torch.compile FlexAttention: on for CUDA always (eager FlexAttention materializes the
    # scores, which is only fit for CPU test models)
    compile_attention: bool = True
    # Compile the Triton kernels capture needs side by side before the warmups (CUDA; see
    # worker/compilers.py's triton_compile_ahead), instead of one by one inside them.
    compile_ahead: bool = True
    # The vision encoder of multimodal models, in graphs per budget of patch rows
    # (worker/encoder_graphs.py): () derives them from the largest image; images per graph.
    encoder_cudagraph_token_budgets: tuple[int, ...] = ()
    encoder_cudagraph_max_images_per_batch: int = 8


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """`speculative_config` (vLLM's keys): an EAGLE drafter proposing
    `num_speculative_tokens` tokens a step for the target to verify (docs/speculative.md)."""
    method: str                       # "eagle3" | "eagle"
    model: str                        # the drafter's directory
    num_speculative_tokens: int
    hf_config: Any = field(repr=False, compare=False, default=None)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    compilation: CompilationConfig = field(default_factory=CompilationConfig)
    device: str = "cpu"
    attention_backend: str = "flex"
    # which kernels may be chosen; batch_invariant pins them (layers/policy.py)
    kernel_policy: KernelPolicy = field(default_factory=KernelPolicy)
    speculative: SpeculativeConfig | None = None
    seed: int = 0
    max_logprobs: int = 20
    log_stats: bool = True       # the server's periodic stats line

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.model.max_model_len // self.cache.block_size)
