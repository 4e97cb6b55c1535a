"""EAGLE drafters for speculative decoding: EAGLE-3 (`LlamaForCausalLMEagle3`) and EAGLE-1.

A drafter is one (EAGLE-1: a few) Llama decoder layer that reads the target model's hidden
states next to the token embeddings and predicts the token after next; docs/speculative.md
has the checkpoint layouts, the sources they were read from and the math. Row i of a drafter
step holds token i + 1 with the target's hidden state at position i, at rotary position i.

* EAGLE-3: `fc` fuses three target hidden states ([T, 3 Ht] -> [T, H]); the layer's qkv
  projection reads [input_layernorm(embedding); hidden_norm(h)] ([T, 2 H]); the drafter has
  its own final norm and an LM head over a draft vocabulary, which `d2t` maps into the
  target's (target id = draft id + d2t[draft id]).
* EAGLE-1: `fc` maps [embedding; target hidden] to H; the first layer has no input norm;
  there is no final norm and no LM head: the logits are the target's LM head on the output.

`forward` returns the hidden state a next draft step reads (EAGLE-3: before the final norm,
which `compute_logits` applies), so one tensor serves both the logits and the next step.
The layers are Llama's: no q/k norm, so the attention prologue (`QKNormRope` without
weights) is rotary and the K/V store, one kernel on CUDA, then the backend's attention.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from fullgraph.attention.backend import ForwardContext, KVCache, QKNormRope
from fullgraph.layers.embedding import Embedding
from fullgraph.layers.fused_linear import norm_linear
from fullgraph.layers.linear import Linear, MergedLinear, logits_into
from fullgraph.layers.norm import RMSNorm
from fullgraph.layers.rotary import RotaryEmbedding, rope_theta_of
from fullgraph.models.interface import CacheSpecs, ModelCapabilities, PagedAttentionSpec
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy, apply_kernel_policy
from fullgraph.models.loader import default_dtype, iterate_weights, load_weights_by_name
from fullgraph.models.qwen3 import Qwen3MLP, head_dim_of

STACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
           "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
EMBEDDING = "embed_tokens.weight"


def _text_config(cfg):
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


class LlamaAttention(nn.Module):
    """Llama attention from a qkv projection of any input width (EAGLE-3's is 2 H)."""

    def __init__(self, cfg, rotary: RotaryEmbedding, in_features: int) -> None:
        super().__init__()
        self.head_dim = head_dim_of(cfg)
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = MergedLinear(in_features, {"q_proj": q, "k_proj": kv, "v_proj": kv},
                                     bias=bias)
        self.o_proj = Linear(q, cfg.hidden_size, bias=bias)
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, ctx: ForwardContext,
                kv_cache: KVCache) -> torch.Tensor:
        # rotary and the K/V store in one kernel on CUDA (no q/k norm), then attention
        prologue = QKNormRope(None, None, 0.0, self.rotary.cos, self.rotary.sin,
                              self.num_heads, self.num_kv_heads)
        o = ctx.attention_qkv(qkv, positions, kv_cache, prologue)
        return self.o_proj(o.reshape(qkv.shape[0], -1))


class EagleDecoderLayer(nn.Module):
    """A Llama decoder layer whose qkv input the drafter builds (see the models' forward)."""

    def __init__(self, cfg, rotary: RotaryEmbedding, in_features: int, *,
                 input_norm: bool = True, hidden_norm: bool = False) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = LlamaAttention(cfg, rotary, in_features)
        self.mlp = Qwen3MLP(cfg)               # SwiGLU, the post-attention norm folded in
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps) if input_norm else None
        self.hidden_norm = RMSNorm(cfg.hidden_size, eps) if hidden_norm else None
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, residual: torch.Tensor,
                ctx: ForwardContext, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual): the caller adds them, or feeds them to a next layer."""
        x = self.self_attn(positions, qkv, ctx, kv_cache)
        return self.mlp(x, residual, self.post_attention_layernorm, {})


class _EagleDrafter(nn.Module):
    """What both drafters share: config checks, the cache spec, loading, target weights."""
    capabilities = ModelCapabilities()
    # checkpoint tensors that may be absent: loaded_elsewhere for load_weights_by_name
    optional_weights: frozenset[str] = frozenset({EMBEDDING})

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.check_config(cfg)
        self.config = cfg
        self.rotary = RotaryEmbedding(head_dim_of(cfg), max_position, rope_theta_of(cfg))
        # Allocated when loaded: published checkpoints mostly leave the embedding out (it is
        # the target's, frozen in training), and the target's is then shared.
        with torch.device("meta"):
            self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embedding_from_target = False     # load_weights: the checkpoint had none
        self._needs_embedding = True

    @staticmethod
    def cache_specs(cfg, policy: KernelPolicy = DEFAULT_POLICY) -> CacheSpecs:
        """The drafter's own paged KV: one attention layer per decoder layer."""
        return CacheSpecs(PagedAttentionSpec(cfg.num_hidden_layers, cfg.num_attention_heads,
                                             cfg.num_key_value_heads, head_dim_of(cfg)))

    @staticmethod
    def check_config(cfg, raw: dict | None = None) -> None:
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"drafter hidden_act {cfg.hidden_act!r}: only 'silu' is supported")
        if getattr(cfg, "mlp_bias", False):
            raise ValueError("drafter with mlp_bias=true is not supported")
        rope_theta_of(cfg)                     # ValueError on RoPE scaling we lack

    def target_hidden_size(self) -> int:
        return self.config.hidden_size

    def aux_hidden_state_layers(self, target_hf_config) -> tuple[int, ...]:
        """Target layers whose input (the residual stream entering them) the drafter reads;
        () means the target's final, normed hidden state."""
        return ()

    def check_target(self, target_hf_config) -> None:
        """ValueError naming what does not fit the target (hidden size, vocabulary, layers)."""
        target = _text_config(target_hf_config)
        if self.target_hidden_size() != target.hidden_size:
            raise ValueError(f"drafter expects target hidden size {self.target_hidden_size()}, "
                             f"the target's hidden_size is {target.hidden_size}")
        if self.config.vocab_size != target.vocab_size:
            raise ValueError(f"drafter vocab_size {self.config.vocab_size} does not match the "
                             f"target's vocab_size {target.vocab_size}")
        self.aux_hidden_state_layers(target_hf_config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._needs_embedding:
            raise RuntimeError("the drafter's checkpoint has no token embedding: call "
                               "use_target_weights with the target's first")
        return self.embed_tokens(input_ids)

    def checkpoint_name(self, name: str) -> str:
        """A checkpoint tensor's name in this module (exports differ in prefixes)."""
        return name.removeprefix("model.")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        maps: dict[str, torch.Tensor] = {}      # d2t / t2d: buffers, not parameters
        self.embedding_from_target = True

        def renamed() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = self.checkpoint_name(name)
                if name in ("d2t", "t2d"):
                    maps[name] = tensor
                elif name == EMBEDDING:
                    like = self.fc.weight
                    self._set_embedding(tensor.to(like.device, like.dtype))
                    self.embedding_from_target = False
                else:
                    yield name, tensor
        load_weights_by_name(self, renamed(), STACKED, loaded_elsewhere=self.optional_weights)
        self.loaded(maps)

    def loaded(self, maps: dict[str, torch.Tensor]) -> None:
        if maps:
            raise ValueError(f"unexpected checkpoint tensors {sorted(maps)} for an EAGLE-1 "
                             f"drafter")

    def use_target_weights(self, embed_tokens: torch.Tensor,
                           lm_head: torch.Tensor | None = None) -> None:
        """Share the target's token embedding where the checkpoint had none (and, EAGLE-1,
        its LM head)."""
        if self.embedding_from_target:
            self._set_embedding(embed_tokens)

    def _set_embedding(self, weight: torch.Tensor) -> None:
        shape = (self.config.vocab_size, self.config.hidden_size)
        if tuple(weight.shape) != shape:
            raise ValueError(f"token embedding of shape {tuple(weight.shape)} does not fit the "
                             f"drafter's {shape}")
        self.embed_tokens.weight = (weight if isinstance(weight, nn.Parameter)
                                    else nn.Parameter(weight, requires_grad=False))
        self._needs_embedding = False


class Eagle3LlamaForCausalLM(_EagleDrafter):
    """`LlamaForCausalLMEagle3` (SpecForge, the EAGLE authors; vLLM's Eagle3LlamaForCausalLM):
    checkpoint names fc.*, midlayer.*, norm.*, lm_head.*, d2t, t2d, maybe embed_tokens.*."""

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__(cfg, max_position)
        h = cfg.hidden_size
        self.draft_vocab_size = getattr(cfg, "draft_vocab_size", None) or cfg.vocab_size
        self.fc = Linear(3 * self.target_hidden_size(), h, bias=bool(getattr(cfg, "bias", False)))
        self.midlayer = EagleDecoderLayer(cfg, self.rotary, 2 * h, hidden_norm=True)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = Linear(h, self.draft_vocab_size, bias=False)
        # speculators' variant: the residual is the normed hidden state (vLLM's flag)
        self.norm_before_residual = bool(getattr(cfg, "norm_before_residual", False))
        # each draft id's target id (d2t applied); identity while the vocabularies agree
        self.register_buffer("draft_to_target", torch.arange(self.draft_vocab_size),
                             persistent=False)
        self.maps_vocab = self.draft_vocab_size != cfg.vocab_size

    @staticmethod
    def check_config(cfg, raw: dict | None = None) -> None:
        _EagleDrafter.check_config(cfg, raw)
        if cfg.num_hidden_layers != 1:
            raise ValueError(f"EAGLE-3 drafter with num_hidden_layers={cfg.num_hidden_layers}: "
                             f"only one decoder layer is supported")
        if (getattr(cfg, "eagle_config", None) or {}).get("use_aux_hidden_state", True) is False:
            raise ValueError("EAGLE-3 drafter with eagle_config.use_aux_hidden_state=false is "
                             "not supported")

    def target_hidden_size(self) -> int:
        return getattr(self.config, "target_hidden_size", None) or self.config.hidden_size

    def aux_hidden_state_layers(self, target_hf_config) -> tuple[int, ...]:
        """vLLM's rule: the config's eagle_aux_hidden_state_layer_ids (top level or in
        eagle_config), else (2, L // 2, L - 3), read in this order and concatenated."""
        n = _text_config(target_hf_config).num_hidden_layers
        eagle = getattr(self.config, "eagle_config", None) or {}
        ids = (getattr(self.config, "eagle_aux_hidden_state_layer_ids", None)
               or eagle.get("eagle_aux_hidden_state_layer_ids"))
        default = ids is None
        ids = tuple(int(i) for i in (ids or (2, n // 2, n - 3)))
        if len(ids) * self.target_hidden_size() != self.fc.in_features:
            raise ValueError(f"EAGLE-3 drafter's fc takes {self.fc.in_features} features, not "
                             f"the {len(ids)} x {self.target_hidden_size()} of target layers "
                             f"{ids}: a drafter made for another target?")
        if not all(0 <= i < n for i in ids):
            which = ("the default for the target's depth (2, L // 2, L - 3); set "
                     "eagle_aux_hidden_state_layer_ids if the drafter names others"
                     if default else "the drafter config's eagle_aux_hidden_state_layer_ids")
            raise ValueError(f"EAGLE-3 drafter reads target layers {ids} ({which}), but the "
                             f"target has {n} layers: a drafter made for another target?")
        return ids

    def checkpoint_name(self, name: str) -> str:
        name = super().checkpoint_name(name)     # vLLM's own name for the layer: layers.0
        return "midlayer." + name[len("layers.0."):] if name.startswith("layers.0.") else name

    def loaded(self, maps: dict[str, torch.Tensor]) -> None:
        vd, v = self.draft_vocab_size, self.config.vocab_size
        d2t, t2d = maps.get("d2t"), maps.get("t2d")
        if d2t is None:
            if vd != v:
                raise ValueError(f"draft_vocab_size {vd} differs from vocab_size {v}, but the "
                                 f"checkpoint has no d2t map")
            return
        if tuple(d2t.shape) != (vd,):
            raise ValueError(f"d2t has shape {tuple(d2t.shape)}, expected ({vd},)")
        targets = torch.arange(vd, device="cpu") + d2t.long().cpu()  # (loads run on the device)
        if targets.min() < 0 or targets.max() >= v or targets.unique().numel() != vd:
            raise ValueError(f"d2t maps draft ids outside [0, {v}) or two onto one target id")
        if t2d is not None and (tuple(t2d.shape) != (v,) or int(t2d.bool().sum()) != vd
                                or not bool(t2d.bool().cpu()[targets].all())):
            raise ValueError("t2d does not mark exactly the target ids that d2t maps to")
        self.draft_to_target.copy_(targets)
        self.maps_vocab = vd != v or not torch.equal(targets, torch.arange(vd, device="cpu"))

    def forward(self, input_ids: torch.Tensor, hidden_states: torch.Tensor,
                positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """hidden_states: [T, 3 Ht] from the target (fused here by fc) or [T, H] from a
        previous draft step. Returns [T, H] before the final norm (the next step's input)."""
        if hidden_states.shape[-1] == self.fc.in_features:
            h = self.fc(hidden_states)
        elif hidden_states.shape[-1] == self.config.hidden_size:
            h = hidden_states
        else:
            raise ValueError(f"drafter hidden states of width {hidden_states.shape[-1]}: "
                             f"expected {self.fc.in_features} or {self.config.hidden_size}")
        layer = self.midlayer
        normed = layer.hidden_norm(h)
        residual = normed if self.norm_before_residual else h
        x = torch.cat([layer.input_layernorm(self.embed(input_ids)), normed], dim=-1)
        x, residual = layer(positions, layer.self_attn.qkv_proj(x), residual, ctx,
                            ctx.kv_caches[0])
        return x + residual

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Target-vocabulary logits into `out` [rows, vocab]: each draft id's logit at its
        target id, -inf at ids the draft vocabulary lacks (the drafter never proposes them)."""
        h = self.norm(hidden)
        if not self.maps_vocab:
            return logits_into(h, self.lm_head.weight, out)
        out.fill_(float("-inf"))
        return out.index_copy_(1, self.draft_to_target, self.lm_head(h).to(out.dtype))

    def compute_draft_logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits into `out` [rows, draft vocab] (cheaper to sample from;
        `draft_to_target[id]` is a drawn id's target id)."""
        return logits_into(self.norm(hidden), self.lm_head.weight, out)


class EagleLlamaForCausalLM(_EagleDrafter):
    """EAGLE-1 (vLLM's EagleLlamaForCausalLM): checkpoint names fc.*, layers.N.*, maybe
    embed_tokens.*; the logits are the target's LM head on the output, with no norm."""
    # the EAGLE authors' fc has a bias, vLLM's has none: a zero bias serves both
    optional_weights = frozenset({EMBEDDING, "fc.bias"})

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__(cfg, max_position)
        h = cfg.hidden_size
        self.fc = Linear(2 * h, h, bias=True)
        with torch.no_grad():
            self.fc.bias.zero_()
        self.layers = nn.ModuleList(EagleDecoderLayer(cfg, self.rotary, h, input_norm=i > 0)
                                    for i in range(cfg.num_hidden_layers))
        self.lm_head_weight: torch.Tensor | None = None     # the target's, use_target_weights

    @staticmethod
    def check_config(cfg, raw: dict | None = None) -> None:
        _EagleDrafter.check_config(cfg, raw)
        if getattr(cfg, "add_para_norm", False):
            raise ValueError("EAGLE-1 drafter with add_para_norm (HASS) is not supported")

    def forward(self, input_ids: torch.Tensor, hidden_states: torch.Tensor,
                positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """hidden_states: [T, H], the target's final normed hidden state or a previous draft
        step's output. Returns [T, H], which the target's LM head turns into logits."""
        x = self.fc(torch.cat([self.embed(input_ids), hidden_states], dim=-1))
        residual = None
        for layer, kv_cache in zip(self.layers, ctx.kv_caches, strict=True):
            if residual is None:               # the first layer has no input norm
                qkv, residual = layer.self_attn.qkv_proj(x), x
            else:
                qkv, residual = norm_linear(x, residual, layer.input_layernorm,
                                            layer.self_attn.qkv_proj)
            x, residual = layer(positions, qkv, residual, ctx, kv_cache)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.lm_head_weight is None:
            raise RuntimeError("an EAGLE-1 drafter uses the target's LM head: call "
                               "use_target_weights first")
        return logits_into(hidden, self.lm_head_weight, out)

    def use_target_weights(self, embed_tokens: torch.Tensor,
                           lm_head: torch.Tensor | None = None) -> None:
        super().use_target_weights(embed_tokens)
        shape = (self.config.vocab_size, self.config.hidden_size)
        if lm_head is None or tuple(lm_head.shape) != shape:
            raise ValueError(f"an EAGLE-1 drafter needs the target's LM head weight {shape}, "
                             f"got {None if lm_head is None else tuple(lm_head.shape)}")
        self.lm_head_weight = lm_head


def load_drafter(method: str, path: str, hf_config, dtype: torch.dtype, max_model_len: int,
                 device: torch.device, policy: KernelPolicy = DEFAULT_POLICY) -> _EagleDrafter:
    """The drafter of `method` with its checkpoint's weights, in the target's dtype, on
    `device`, the kernel policy stamped (as the loader does for targets). The caller shares
    the target's weights (`use_target_weights`) before it runs."""
    cls = drafter_class(method)
    with default_dtype(dtype), torch.device(device):
        drafter = cls(hf_config, max_position=max_model_len)
        drafter.load_weights((name, t.to(dtype) if t.is_floating_point() else t)
                             for name, t in iterate_weights(path))
    return apply_kernel_policy(drafter, policy).eval().requires_grad_(False)


DRAFTERS: dict[str, type[_EagleDrafter]] = {"eagle3": Eagle3LlamaForCausalLM,
                                            "eagle": EagleLlamaForCausalLM}


def drafter_class(method: str) -> type[_EagleDrafter]:
    """`speculative_config["method"]` (vLLM's spelling) -> the drafter class."""
    if method not in DRAFTERS:
        raise ValueError(f"speculative method {method!r} is not supported; supported: "
                         f"{', '.join(DRAFTERS)}")
    return DRAFTERS[method]


def method_of_config(cfg) -> str | None:
    """The method a drafter config's `architectures` name, where they tell: an EAGLE-3 class
    (LlamaForCausalLMEagle3, Eagle3LlamaForCausalLM) or another EAGLE one (EAGLE-1:
    EagleLlamaForCausalLM, EAGLEModel). None for a plain LlamaForCausalLM, which EAGLE-1
    checkpoints name and some EAGLE-3 ones too."""
    names = [str(a).lower() for a in getattr(cfg, "architectures", None) or ()]
    if any("eagle3" in a for a in names):
        return "eagle3"
    return "eagle" if any("eagle" in a for a in names) else None
