"""Qwen3-VL (dense): the Qwen3 decoder with multimodal rotary positions and image inputs
(transformers' `Qwen3VLForConditionalGeneration`).

Read it as a reference next to models/qwen3.py, whose layers it runs unchanged. What differs:
- Rotary positions are MRoPE (layers/mrope.py): three rows per token, computed on the host
  once per prompt (`rope_positions`) and handed in every step as
  `ctx.multimodal.rope_positions`. From them the model computes the step's cos/sin rows, one
  per token, and gives the layers those tables with `arange(T)` as the positions that index
  them. The `positions` argument stays the KV position (the attention backend's causality
  and the K/V slots use it, through the step's metadata) and is not used for rotary.
- Image tokens: the runner encodes a request's images once (`encode_images`, the vision
  tower of models/qwen3_vl_vision.py) and, in each step that computes some of their tokens,
  gives their rows and embeddings; they replace the token embeddings of those rows.
- Deepstack: the tower's features of some of its blocks are added at the image rows after
  the first decoder layers (one tensor per layer, transformers' `_deepstack_process`).

A step with image rows runs eagerly (its rows are data); every other step, decode included,
is shape-only work on persistent inputs and is captured like Qwen3's.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from fullgraph.attention.backend import ForwardContext
from fullgraph.layers.embedding import Embedding
from fullgraph.layers.fused_linear import add_rms_norm
from fullgraph.layers.linear import logits_into
from fullgraph.layers.mrope import MRotaryEmbedding, mrope_positions, mrope_section_of
from fullgraph.layers.norm import RMSNorm
from fullgraph.layers.rotary import rope_theta_of
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy, policy_of
from fullgraph.models.interface import CacheSpecs, ModelCapabilities
from fullgraph.models.loader import load_weights_by_name
from fullgraph.models.qwen3 import (AuxHiddenStates, Qwen3DecoderLayer, Qwen3ForCausalLM,
                                   head_dim_of)
from fullgraph.models.qwen3_vl_vision import (Qwen3VLVisionTower, check_vision_config,
                                              visual_weight_name)

# transformers' Qwen3VLTextRotaryEmbedding default, for configs that name no mrope_section
DEFAULT_MROPE_SECTION = (24, 20, 20)

ImageFeatures = tuple[torch.Tensor, torch.Tensor | None]   # (embeds, deepstack) of one image


def check_config(cfg, raw: dict) -> None:
    """ValueError naming the config field this code cannot run with, at load time."""
    text = cfg.text_config
    if getattr(text, "use_sliding_window", False):
        raise ValueError("text_config's use_sliding_window=true is not supported")
    rope_theta_of(text)                       # rope types other than 'default'
    check_vision_config(cfg.vision_config)
    deepstack = len(getattr(cfg.vision_config, "deepstack_visual_indexes", None) or ())
    if deepstack > text.num_hidden_layers:
        raise ValueError(f"vision_config's deepstack_visual_indexes has {deepstack} entries, "
                         f"more than the text model's {text.num_hidden_layers} layers")
    if text.hidden_size != cfg.vision_config.out_hidden_size:
        raise ValueError(f"vision_config's out_hidden_size {cfg.vision_config.out_hidden_size}"
                         f" differs from text_config's hidden_size {text.hidden_size}")


def token_rows(text_model: nn.Module, t: int, device: torch.device) -> torch.Tensor:
    """`arange(t)`, a view of a tensor the model keeps (grown when a step is longer), so
    its values exist before a graph runs: a PIECEWISE capture runs attention eagerly between
    pieces on what the pieces would compute, and an `arange` computed inside a piece is
    unwritten then (the rotary rows it indexes would be read out of bounds). Captures come
    after warm-ups of the same sizes, so the tensor grows eagerly."""
    rows = getattr(text_model, "_token_rows", None)
    if rows is None or rows.numel() < t or rows.device != device:
        rows = text_model._token_rows = torch.arange(t, device=device)
    return rows[:t]


def step_inputs(text_model: nn.Module, input_ids: torch.Tensor, ctx: ForwardContext):
    """What every layer of a multimodal text model takes from the step: (token embeddings
    with the step's image rows in place, the rotary (cos, sin) rows of its MRoPE positions,
    `arange(T)` as the positions that index them). The rotary rows and their indices are
    made before the embedding: the layers' q/k kernels read both before waiting on the
    kernel just before them (layers/pdl.py), which is safe for what was written two or more
    kernels back."""
    mm = ctx.multimodal
    t = input_ids.shape[0]
    if mm is None or mm.rope_positions.shape != (3, t):
        raise ValueError(f"{type(text_model).__name__} needs ctx.multimodal.rope_positions "
                         f"of shape (3, {t})")
    rope = text_model.rotary(mm.rope_positions, policy_of(text_model).batch_invariant)
    rows = token_rows(text_model, t, input_ids.device)
    x = text_model.embed_tokens(input_ids)
    if mm.embeds is not None:                 # host-known: image steps run eagerly
        x = x.index_copy(0, mm.embed_rows, mm.embeds.to(x.dtype))
    return x, rope, rows


class Qwen3VLTextModel(nn.Module):
    """Qwen3Model's embedding, layers and final norm, with MRoPE and image rows."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        # no rotary table of their own: every step hands them its own rows (forward)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, rotary=None)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRotaryEmbedding(head_dim_of(cfg), rope_theta_of(cfg),
                                       mrope_section_of(cfg, DEFAULT_MROPE_SECTION))
        layers = list(self.layers)          # L2 prefetch targets, as Qwen3Model resolves them
        self._l2_next = [layer.l2_targets(nxt)
                         for layer, nxt in zip(layers, layers[1:] + [None], strict=True)]
        self.aux_hidden_states: AuxHiddenStates | None = None   # a drafter's (qwen3.py)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        mm = ctx.multimodal
        x, rope, rows = step_inputs(self, input_ids, ctx)
        residual = None
        deepstack = mm.deepstack if mm.embeds is not None else None
        aux = self.aux_hidden_states
        for i, (layer, kv_cache, l2_next) in enumerate(zip(self.layers, ctx.kv_caches,
                                                           self._l2_next, strict=True)):
            if aux is not None:             # what enters layer i, deepstack features included
                aux.store(i, x, residual)
            x, residual = layer(rows, x, residual, ctx, kv_cache, l2_next, rope)
            if deepstack is not None and i < deepstack.shape[0]:
                # transformers adds to the hidden state after layer i, residual + x; adding
                # to x (the next norm adds the residual) is the same sum in another order
                x = x.index_add(0, mm.embed_rows, deepstack[i].to(x.dtype))
        x, _ = add_rms_norm(x, residual, self.norm)
        return x


class Qwen3VLModel(nn.Module):
    """The checkpoint's `model.`: the vision tower and the language model."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.visual = Qwen3VLVisionTower(cfg.vision_config)
        self.language_model = Qwen3VLTextModel(cfg.text_config)


class Qwen3VLForConditionalGeneration(nn.Module):
    # prefix caching: the engine hashes the images; batch-invariant (the tower encodes a
    # request's own images, once; the text model is Qwen3's with scalar cos/sin)
    capabilities = ModelCapabilities(batch_invariant=("cpu", "cuda"))
    multimodal = True                      # the runner passes ctx.multimodal every step
    stacked_params = Qwen3ForCausalLM.stacked_params
    check_config = staticmethod(check_config)
    model_cls: type[nn.Module] = Qwen3VLModel      # the checkpoint's `model.`

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        text = cfg.text_config
        self.image_token_id = int(cfg.image_token_id)
        self.merge_size = int(cfg.vision_config.spatial_merge_size)
        self.model = self.model_cls(cfg)
        # transformers ties by the top-level flag (`_tied_weights_keys`)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @staticmethod
    def cache_specs(cfg, policy: KernelPolicy = DEFAULT_POLICY) -> CacheSpecs:
        return Qwen3ForCausalLM.cache_specs(cfg.text_config, policy)

    def rope_positions(self, token_ids: Sequence[int],
                       grids: Sequence[tuple[int, int, int]]) -> tuple[np.ndarray, int]:
        """Host only: the prompt's MRoPE positions [3, len(token_ids)] and rope_delta."""
        return mrope_positions(token_ids, self.image_token_id, grids, self.merge_size)

    def encode_images(self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]
                      ) -> list[ImageFeatures]:
        """All images in one tower call (pixel_values on the model's device, grids host
        ints); per image its embeds [n_i, hidden] and deepstack [num_deepstack, n_i, hidden]
        (None without deepstack layers)."""
        embeds, deepstack = self.model.visual(pixel_values, grids)
        sizes = [t * h * w // self.merge_size ** 2 for t, h, w in grids]
        per_image = embeds.split(sizes)
        if not deepstack:
            return [(e, None) for e in per_image]
        stacked = torch.stack(deepstack).split(sizes, dim=1)
        return list(zip(per_image, stacked, strict=True))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """`positions` (the KV positions) reach attention through the step's metadata;
        rotary uses ctx.multimodal.rope_positions."""
        return self.model.language_model(input_ids, ctx)

    @property
    def text_model(self) -> nn.Module:
        return self.model.language_model

    # a speculative drafter's target states and shared weights, as the text models'
    enable_aux_hidden_states = Qwen3ForCausalLM.enable_aux_hidden_states
    drafter_weights = Qwen3ForCausalLM.drafter_weights

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Into `out` (the runner's persistent [rows, vocab] buffer, read by the sampler)."""
        return logits_into(hidden, self.lm_head.weight, out, policy_of(self))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     strict: bool = True) -> None:
        """Checkpoint names are ours (`model.language_model.*`, `model.visual.*`,
        `lm_head.*`) but for the tower's older `visual.` prefix and its Conv3d patch
        embedding, which loads as a Linear over the flattened patch."""
        load_weights_by_name(self, self._checkpoint_names(weights), self.stacked_params,
                             skip=lambda name: self.tie_word_embeddings
                             and name.startswith("lm_head."), strict=strict)

    @staticmethod
    def _checkpoint_names(weights: Iterable[tuple[str, torch.Tensor]]
                          ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            local = visual_weight_name(name)
            if local is not None:
                name = f"model.visual.{local}"
                if local == "patch_embed.proj.weight" and tensor.dim() == 5:
                    tensor = tensor.reshape(tensor.shape[0], -1)
            yield name, tensor
