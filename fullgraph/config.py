"""Frozen configuration dataclasses shared by every layer of the engine.

They are built once, by `fullgraph.engine.args.EngineArgs.create_engine_config`, and never
change afterwards: anything that varies per step lives in step objects, not here.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any

import torch


ENV_FLAG = "FULLGRAPH_BATCH_INVARIANT"


@dataclass(frozen=True, slots=True)
class KernelPolicy:
    """`batch_invariant=False` is the normal mode: kernels are picked from the row count.
    The other fields are the mode's pinned shapes; they are part of the numerics (two
    engines agree bit for bit only with equal values), so they are constants, never derived
    from the batch."""
    batch_invariant: bool = False
    # rows of every invariant matmul call (a GPU kernel's BLOCK_M)
    matmul_block_rows: int = 64
    # KV tokens per online-softmax step, and per split (a multiple of the tile): a token's
    # attention is the split partials of its logical KV, merged in split order. The tile is
    # capped at `attention_tile_elements` / head dim (`attention_tile_for`): the GPU kernel
    # holds a tile's K and V in registers, and 64 x 256 spills (docs/benchmarks.md)
    attention_tile: int = 64
    attention_tile_elements: int = 8192
    attention_split: int = 256
    # the gated delta rule's chunk; in the mode the state is committed at multiples of it
    gdn_chunk: int = 64

    def __post_init__(self) -> None:
        for name in ("matmul_block_rows", "attention_tile", "attention_tile_elements",
                     "attention_split", "gdn_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"KernelPolicy.{name} must be positive, "
                                 f"got {getattr(self, name)}")
        if self.attention_split % self.attention_tile:
            raise ValueError(f"KernelPolicy.attention_split ({self.attention_split}) must be "
                             f"a multiple of attention_tile ({self.attention_tile})")

    def attention_tile_for(self, head_dim: int) -> int:
        """The KV tile of a layer with this head dim (a power of two dividing the split)."""
        cap = max(1, self.attention_tile_elements // head_dim)
        tile = min(self.attention_tile, 1 << (cap.bit_length() - 1))
        while self.attention_split % tile:
            tile //= 2
        return tile

    @classmethod
    def from_args(cls, batch_invariant: bool | None = None,
                  environ: dict[str, str] | None = None, **shapes: int) -> KernelPolicy:
        """`batch_invariant` (the LLM argument, --batch-invariant / --no-batch-invariant)
        wins; None reads FULLGRAPH_BATCH_INVARIANT, once, here ("1"/"true" on,
        "0"/"false"/unset off, anything else a ValueError)."""
        if batch_invariant is None:
            raw = (os.environ if environ is None else environ).get(ENV_FLAG, "0")
            raw = raw.strip().lower()
            if raw not in ("0", "1", "true", "false", ""):
                raise ValueError(f"{ENV_FLAG} must be 0 or 1, got {raw!r}")
            batch_invariant = raw in ("1", "true")
        return cls(batch_invariant=batch_invariant, **shapes)

    def require(self, component: str, supported: bool) -> None:
        """ValueError when the mode is on and `component` cannot keep it: asked-for
        invariance is never dropped silently."""
        if self.batch_invariant and not supported:
            raise ValueError(f"{component} does not support batch-invariant mode "
                             f"(--batch-invariant / {ENV_FLAG}=1)")

    def matmul_calls(self, rows: int) -> list[tuple[int, int]]:
        """(first row, rows) of each matmul call for `rows` rows: one call normally; in the
        mode, blocks of `matmul_block_rows` (the last one zero-padded)."""
        if not self.batch_invariant:
            return [(0, rows)] if rows else []
        b = self.matmul_block_rows
        return [(i, min(b, rows - i)) for i in range(0, rows, b)]


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
    # multimodal models (vLLM's limit_mm_per_prompt / mm_processor_kwargs): the most images a
    # prompt may carry (None: any number), and the image processor's min_pixels / max_pixels
    # over preprocessor_config.json's
    max_images_per_prompt: int | None = None
    mm_processor_kwargs: tuple[tuple[str, int], ...] = ()


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
    attention_backend: str = "triton"
    # which kernels may be chosen; batch_invariant pins them (layers/policy.py)
    kernel_policy: KernelPolicy = field(default_factory=KernelPolicy)
    speculative: SpeculativeConfig | None = None
    seed: int = 0
    max_logprobs: int = 20
    log_stats: bool = True       # the server's periodic stats line

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.model.max_model_len // self.cache.block_size)
