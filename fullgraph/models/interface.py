"""What a model declares to the engine: the caches its layers need and what it supports.

The runner, the memory profiler and graph capture work from these declarations alone; they
never ask which architecture they run. Two cache kinds exist:

* paged KV (`PagedAttentionSpec`): full-attention layers. Every such layer has its own K and
  V tensors, but they share one block table: a request's block `i` holds the same token
  positions in every layer, so the block pool and prefix cache are per model, not per layer.
* state slots (`StateSpec`): linear-attention layers (Gated DeltaNet) keep a fixed-size
  state per request (a short-convolution window and a recurrent matrix) instead of a KV
  history. Each such layer has a pool of `max_num_seqs + 1` slots (`max_num_seqs * (k + 1)
  + 1` with k speculative tokens: a request then holds a group of k + 1); a request holds its
  slot index for all layers while it runs, and slot 0 is the null slot that padding lanes use.

A model module exposes a class with `cache_specs(hf_config, policy)`, the `capabilities`
below, `forward(input_ids, positions, ctx)`, `compute_logits(hidden, out)` and
`load_weights`, and optionally `check_config(hf_config, raw_config_dict)` (a ValueError
naming a field it cannot run with, raised when the engine reads the config) and
`enable_aux_hidden_states` (a target an EAGLE-3 drafter can read, below). Adding one is
that module plus a line in registry.py.

A speculative-decoding drafter (`DraftModel`, models/eagle.py) is not in the registry: the
engine picks its class by method (`eagle.drafter_class`), as vLLM's `speculative_config` names it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from fullgraph.layers.policy import KernelPolicy


@dataclass(frozen=True, slots=True)
class PagedAttentionSpec:
    num_layers: int
    num_heads: int            # query heads
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * dtype.itemsize


@dataclass(frozen=True, slots=True)
class StateTensorSpec:
    name: str
    shape: tuple[int, ...]    # per slot
    dtype: torch.dtype | None = None   # None: the model's dtype


@dataclass(frozen=True, slots=True)
class StateSpec:
    num_layers: int
    tensors: tuple[StateTensorSpec, ...]

    def bytes_per_slot(self, model_dtype: torch.dtype) -> int:
        per_layer = sum(torch.Size(t.shape).numel() * (t.dtype or model_dtype).itemsize
                        for t in self.tensors)
        return self.num_layers * per_layer


@dataclass(frozen=True, slots=True)
class CacheSpecs:
    attention: PagedAttentionSpec
    state: StateSpec | None = None


@dataclass(frozen=True, slots=True)
class ModelCapabilities:
    # A prefix-cache hit skips computing the prefix; a model with per-request recurrent state
    # would then start from an empty state, so such models turn prefix caching off.
    prefix_caching: bool = True
    # The device types ("cpu", "cuda") on which every op behind a token's logprobs has a
    # batch-invariant path (layers/policy.py): the engine refuses the mode elsewhere.
    batch_invariant: tuple[str, ...] = ()


class Model(Protocol):
    capabilities: ClassVar[ModelCapabilities]

    @staticmethod
    def cache_specs(hf_config, policy: KernelPolicy) -> CacheSpecs:
        """The caches its layers need under the engine's kernel policy (layers/policy.py)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights, strict: bool = True) -> None:
        """Copy checkpoint tensors (transformers' names) into the parameters in place, so
        captured graphs read them; `strict`: every parameter must be among them (loading),
        else any subset (a weight update)."""

    # Optional (Qwen3ForCausalLM, HybridForCausalLM and the vision-language classes, through
    # their decoder stack `text_model`), for a target a speculative drafter reads:
    #
    # def enable_aux_hidden_states(self, layers: tuple[int, ...], max_tokens: int
    #                              ) -> torch.Tensor:
    #     """Allocate and return a persistent [max_tokens, len(layers) * hidden] buffer (model
    #     dtype and device) that every later forward writes in place: rows [:T], columns
    #     [j H, (j + 1) H) the residual stream entering layer `layers[j]` (the token embedding
    #     for layer 0; ids may repeat). No allocation or host sync per step, so graphs capture
    #     it; call once, before capture. Without it, forward does no extra work."""
    #
    # def drafter_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
    #     """(token embedding, LM head) weights, which a speculative drafter shares."""


class DraftModel(Protocol):
    """A speculative-decoding drafter (models/eagle.py; docs/speculative.md): it reads the
    target's hidden states next to the token embeddings and has its own paged KV, indexed by
    the target's block table."""
    capabilities: ClassVar[ModelCapabilities]

    @staticmethod
    def cache_specs(hf_config, policy: KernelPolicy) -> CacheSpecs:
        """The drafter's own KV layers (its config, not the target's)."""

    def forward(self, input_ids: torch.Tensor, hidden_states: torch.Tensor,
                positions: torch.Tensor, ctx) -> torch.Tensor:
        """hidden_states: the target's ([T, len(aux layers) * Ht], the aux buffer's rows; or
        its final normed state when there are no aux layers) or a previous draft step's
        output [T, H]. Returns [T, H], which `compute_logits` and the next step read."""

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Target-vocabulary logits into `out` [rows, target vocab]."""

    # Optional (EAGLE-3): a draft vocabulary, cheaper to draft from:
    # draft_vocab_size: int; draft_to_target: torch.Tensor ([draft vocab] target ids)
    # def compute_draft_logits(self, hidden, out) -> torch.Tensor: ... [rows, draft vocab]

    def aux_hidden_state_layers(self, target_hf_config) -> tuple[int, ...]:
        """The target layers whose input the drafter reads, in order (the `layers` of the
        target's `enable_aux_hidden_states`); () for the target's final normed state."""

    def check_target(self, target_hf_config) -> None:
        """ValueError naming what does not fit the target (hidden size, vocabulary, layers)."""

    def use_target_weights(self, embed_tokens: torch.Tensor,
                           lm_head: torch.Tensor | None = None) -> None:
        """Share the target's token embedding (where the checkpoint has none) and LM head
        (where the drafter has none)."""

    def load_weights(self, weights) -> None: ...


@runtime_checkable
class GraphEncoder(Protocol):
    """An encoder (a vision tower) that worker/encoder_graphs.py can run in CUDA graphs
    captured per row budget, knowing nothing else about it.

    An *item* is whatever the model describes one input by (an image's (t, h, w) grid); its
    input is `encoder_input_rows(item)` consecutive rows of width `encoder_input_width`.
    Items are packed one after another into a budget's persistent input, the rest of it
    padding. The per-item outputs must be what the model's `encode_images` gives per image,
    since the runner uses them in its place. A multimodal model exposes this on itself or on
    exactly one submodule (`encoder_graphs.graph_encoder_of`)."""

    @property
    def encoder_input_width(self) -> int: ...

    @property
    def encoder_row_alignment(self) -> int:
        """Every item's rows, and so every budget and its padding, are multiples of this."""

    def encoder_input_rows(self, item: Any) -> int: ...

    def allocate_encoder_layout(self, budget: int, device: torch.device) -> Any:
        """Persistent layout buffers for `budget` rows, holding a valid all-padding layout."""

    def write_encoder_layout(self, layout: Any, items: Sequence[Any]) -> None:
        """Host work: the layout of `items` packed from row 0 into `layout`, the rest padding
        that must not affect the items' outputs. Copies to the device, never reads it."""

    def forward_packed(self, inputs: torch.Tensor, layout: Any) -> Any:
        """What a graph captures: ops fixed by the budget, values read from `inputs` and
        `layout` only."""

    def split_encoder_output(self, output: Any, items: Sequence[Any]) -> list[Any]:
        """`forward_packed`'s output -> per item, in packing order (views are fine)."""

    def encode_eager(self, inputs: torch.Tensor, items: Sequence[Any]) -> list[Any]:
        """The items without a graph or padding (those larger than every budget)."""
