"""Qwen3.5 with images: the hybrid Gated DeltaNet text model with multimodal rotary positions
and the vision tower (transformers' `Qwen3_5ForConditionalGeneration`).

Read it next to models/qwen3_vl.py, whose contract it shares, and models/qwen3_next.py, whose
layers it runs unchanged. What differs from the text-only hybrid (`Qwen3_5ForCausalLM`):
- Rotary positions are MRoPE (layers/mrope.py), as in Qwen3-VL: three rows per token,
  computed on the host once per prompt (`rope_positions`) and handed in every step as
  `ctx.multimodal.rope_positions`. Qwen3.5 rotates only the first `partial_rotary_factor` of
  each head's dimensions, so its frequencies are those of the partial rotary dimension
  (transformers computes `inv_freq` over `head_dim * partial_rotary_factor`), and the
  (t, h, w) section counts those frequencies, interleaved. From the positions the model
  computes the step's cos/sin rows, one per token, and gives the gated attention layers
  those tables with `arange(T)` as the positions that index them. The `positions` argument
  stays the KV position: the attention backend and the K/V slots use it through the step's
  metadata, and the Gated DeltaNet layers read only their state metadata.
- Image tokens: the runner encodes a request's images once (`encode_images`, the tower of
  models/qwen3_vl_vision.py, shared with Qwen3-VL) and, in each step that computes some of
  their tokens, gives their rows and embeddings; they replace the token embeddings of those
  rows. Qwen3.5's tower has no deepstack features, so nothing is added after the layers.
- Prefix caching stays off, as for every hybrid: a hit would skip the prefix and leave the
  recurrent state empty.

A step with image rows runs eagerly (its rows are data); every other step, decode included,
is shape-only work on persistent inputs and is captured like the hybrid's.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fullgraph.attention.backend import ForwardContext
from fullgraph.layers.embedding import Embedding
from fullgraph.layers.fused_linear import add_rms_norm
from fullgraph.layers.mrope import MRotaryEmbedding, mrope_section_of
from fullgraph.layers.norm import ZeroCenteredRMSNorm
from fullgraph.layers.rotary import rope_theta_of
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy
from fullgraph.models.interface import CacheSpecs, ModelCapabilities
from fullgraph.models.qwen3 import AuxHiddenStates
from fullgraph.models.qwen3_next import HybridDecoderLayer, HybridForCausalLM, rotary_dim_of
from fullgraph.models.qwen3_next import check_config as check_hybrid_config
from fullgraph.models.qwen3_vl import Qwen3VLForConditionalGeneration, step_inputs
from fullgraph.models.qwen3_vl_vision import Qwen3VLVisionTower, check_vision_config

# transformers' Qwen3_5TextRotaryEmbedding default, for configs that name no mrope_section
DEFAULT_MROPE_SECTION = (11, 11, 10)


def check_config(cfg, raw: dict) -> None:
    """ValueError naming the config field this code cannot run with, at load time."""
    text = cfg.text_config
    check_hybrid_config(text, raw)            # reads raw's text_config
    rope_theta_of(text)                       # rope types other than 'default'
    check_vision_config(cfg.vision_config)
    if getattr(cfg.vision_config, "deepstack_visual_indexes", None):
        raise ValueError("vision_config's deepstack_visual_indexes is not supported for "
                         "Qwen3.5 (its text model has no deepstack inputs)")
    if text.hidden_size != cfg.vision_config.out_hidden_size:
        raise ValueError(f"vision_config's out_hidden_size {cfg.vision_config.out_hidden_size}"
                         f" differs from text_config's hidden_size {text.hidden_size}")


class Qwen3_5VLTextModel(nn.Module):
    """The hybrid's embedding, layers and final norm (models/qwen3_next.py `HybridModel`),
    with MRoPE and image rows."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        # no rotary table of their own: every step hands the attention layers its own rows
        self.layers = nn.ModuleList(HybridDecoderLayer(cfg, i, rotary=None)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = ZeroCenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRotaryEmbedding(rotary_dim_of(cfg), rope_theta_of(cfg),
                                       mrope_section_of(cfg, DEFAULT_MROPE_SECTION))
        self.aux_hidden_states: AuxHiddenStates | None = None   # a drafter's (qwen3.py)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, rope, rows = step_inputs(self, input_ids, ctx)
        residual = None
        aux = self.aux_hidden_states
        kv_caches, states = iter(ctx.kv_caches), iter(ctx.state_caches)
        for i, layer in enumerate(self.layers):
            cache = next(states) if layer.layer_type == "linear_attention" else next(kv_caches)
            if aux is not None:
                aux.store(i, x, residual)
            x, residual = layer(rows, x, residual, ctx, cache, rope)
        return add_rms_norm(x, residual, self.norm)[0]


class Qwen3_5VLModel(nn.Module):
    """The checkpoint's `model.`: the vision tower and the language model."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.visual = Qwen3VLVisionTower(cfg.vision_config)
        self.language_model = Qwen3_5VLTextModel(cfg.text_config)


class Qwen3_5ForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL's class with the hybrid language model: the prompt layout, the tower (no
    deepstack: each image's features are (embeds, None)), the forward and the logits are
    Qwen3-VL's (Qwen3.5's get_rope_index is the same); the caches and the checkpoint's
    language model are the hybrid's."""
    # recurrent state, as the hybrid (whose batch-invariant mode its layers keep)
    capabilities = ModelCapabilities(prefix_caching=False, batch_invariant=("cpu", "cuda"))
    stacked_params = HybridForCausalLM.stacked_params
    check_config = staticmethod(check_config)
    model_cls = Qwen3_5VLModel
    _route = HybridForCausalLM._route     # what HybridForCausalLM.load_weights calls

    @staticmethod
    def cache_specs(cfg, policy: KernelPolicy = DEFAULT_POLICY) -> CacheSpecs:
        return HybridForCausalLM.cache_specs(cfg.text_config, policy)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     strict: bool = True) -> None:
        """Checkpoint names are ours (`model.language_model.*`, `model.visual.*`,
        `lm_head.*`) but for the tower's older `visual.` prefix and its Conv3d patch
        embedding (Qwen3-VL's `_checkpoint_names`); the rest is the hybrid's loading: a tied
        lm_head and multi-token-prediction heads skipped, per-expert tensors fused, the
        (1 + w) norms' float32 scale refreshed once the weights are in."""
        HybridForCausalLM.load_weights(self, self._checkpoint_names(weights), strict)
