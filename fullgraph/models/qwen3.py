"""Qwen3 (dense): q/k RMSNorm per head, GQA, RoPE, SwiGLU MLP, tied or untied LM head.

Read it as a reference: one class per block, tensors are [tokens, ...] with every request's
tokens packed together; attention goes through `ForwardContext` to the paged-KV backend.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fullgraph.attention.backend import ForwardContext, KVCache, QKNormRope
from fullgraph.layers.embedding import Embedding
from fullgraph.layers.fused_linear import add_rms_norm, norm_linear, silu_mul_linear
from fullgraph.layers.linear import Linear, MergedLinear, logits_into
from fullgraph.layers.norm import RMSNorm
from fullgraph.layers.pdl import inductor_options
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy, policy_of
from fullgraph.layers.rotary import RotaryEmbedding, rope_theta_of
from fullgraph.models.interface import CacheSpecs, ModelCapabilities, PagedAttentionSpec
from fullgraph.models.loader import load_weights_by_name


L2Targets = dict[str, tuple[torch.Tensor, ...]]   # projection -> weights to prefetch
RopeTables = tuple[torch.Tensor, torch.Tensor]     # (cos, sin), [positions, head_dim] float32


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class Qwen3Attention(nn.Module):
    def __init__(self, cfg, rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        self.head_dim = head_dim_of(cfg)
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q_proj": q_size, "k_proj": kv_size,
                                                       "v_proj": kv_size}, bias=cfg.attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                norm: RMSNorm, ctx: ForwardContext, kv_cache: KVCache,
                l2_next: L2Targets, rope: RopeTables | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope`: this step's (cos, sin) tables, which `positions` index, instead of the
        model's own (a model with MRoPE builds per-token tables each step, models/qwen3_vl.py;
        then `rotary` may be None)."""
        qkv, residual = norm_linear(x, residual, norm, self.qkv_proj, l2_next.get("qkv_proj", ()))
        # q/k norm, rotary and the K/V store (reference: layers/qk_norm_rope.py), then
        # attention; decode steps on CUDA do all of it in the attention kernel
        cos, sin = rope if rope is not None else (self.rotary.cos, self.rotary.sin)
        prologue = QKNormRope(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                              cos, sin, self.num_heads, self.num_kv_heads)
        o = ctx.attention_qkv(qkv, positions, kv_cache, prologue)
        return self.o_proj(o.reshape(x.shape[0], -1), l2_next.get("o_proj", ())), residual


class Qwen3MLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate_proj": cfg.intermediate_size,
                                                           "up_proj": cfg.intermediate_size})
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm,
                l2_next: L2Targets) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, residual = norm_linear(x, residual, norm, self.gate_up_proj,
                                        l2_next.get("gate_up_proj", ()))
        return silu_mul_linear(gate_up, self.down_proj, l2_next.get("down_proj", ())), residual


class Qwen3DecoderLayer(nn.Module):
    # projection -> (weight, share of its rows) it asks L2 for, for the kernels after it
    # (layers/l2_prefetch.py); "next." names the next layer's projections. The share is
    # counted from the last row: a GEMV's programs start in order, so its last rows are read
    # last, and prefetching less queues less ahead of decode attention's own loads (the
    # share's sweep: docs/benchmarks.md, thirteenth session).
    l2_prefetch_plan: dict[str, tuple[tuple[str, float], ...]] = {
        "o_proj": (("gate_up_proj", 2 / 3),)}

    def __init__(self, cfg, rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(cfg, rotary)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def projections(self) -> dict[str, nn.Module]:
        return {"qkv_proj": self.self_attn.qkv_proj, "o_proj": self.self_attn.o_proj,
                "gate_up_proj": self.mlp.gate_up_proj, "down_proj": self.mlp.down_proj}

    def l2_targets(self, next_layer: Qwen3DecoderLayer | None) -> L2Targets:
        """`l2_prefetch_plan` resolved to weights (the last layer has no next one)."""
        mine = self.projections()
        theirs = next_layer.projections() if next_layer is not None else {}

        def rows(name: str, share: float) -> torch.Tensor | None:
            own = name.removeprefix("next.")
            module = mine[name] if own == name else theirs.get(own)
            if module is None:
                return None
            w = module.weight.detach()        # a leaf sharing the storage the loader fills
            return w[w.shape[0] - round(w.shape[0] * share):]   # a view: the last rows
        return {proj: tuple(w for w in (rows(*hint) for hint in hints) if w is not None)
                for proj, hints in self.l2_prefetch_plan.items()}

    def forward(self, positions, x, residual, ctx, kv_cache, l2_next: L2Targets,
                rope: RopeTables | None = None):
        # Each RMSNorm (with the residual add before it) runs inside the projection it feeds:
        # input_layernorm in qkv_proj, post_attention_layernorm in gate_up_proj.
        x, residual = self.self_attn(positions, x, residual, self.input_layernorm, ctx, kv_cache,
                                     l2_next, rope)
        return self.mlp(x, residual, self.post_attention_layernorm, l2_next)


class AuxHiddenStates:
    """The residual stream entering some layers, copied each step into a persistent buffer
    (an EAGLE-3 drafter reads it; docs/speculative.md). Slot j of the buffer, columns
    [j H, (j + 1) H), takes the input of `layers[j]`: `x + residual` before that layer runs,
    the token embedding for layer 0 (transformers' `hidden_states[i]`). A step writes rows
    [:T] in place and allocates nothing, so graphs capture it; rows past T keep older steps'
    values."""

    def __init__(self, layers: tuple[int, ...], num_layers: int, max_tokens: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        if not layers or not all(0 <= i < num_layers for i in layers):
            raise ValueError(f"aux hidden states of layers {layers}: a model of {num_layers} "
                             f"layers has inputs to layers 0..{num_layers - 1}")
        if max_tokens < 1:
            raise ValueError(f"aux hidden states for max_tokens={max_tokens}")
        self.layers = tuple(layers)
        self.buffer = torch.zeros(max_tokens, len(layers) * hidden_size, dtype=dtype,
                                  device=device)
        # per layer, the buffer's column slices its input goes to (a layer may be listed
        # more than once: vLLM's (0, 1, 1) for a 2-layer target)
        self._columns = [tuple(slice(j * hidden_size, (j + 1) * hidden_size)
                               for j, layer in enumerate(layers) if layer == i)
                         for i in range(num_layers)]

    def store(self, layer: int, x: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Before `layer` runs on (x, residual); the sum is what its fused norm adds."""
        t = x.shape[0]
        for columns in self._columns[layer]:
            out = self.buffer[:t, columns]
            if residual is None:
                out.copy_(x)
            else:
                torch.add(x, residual, out=out)


class Qwen3Model(nn.Module):
    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("Qwen3 with use_sliding_window=true is not supported")
        rotary = RotaryEmbedding(head_dim_of(cfg), max_position, rope_theta_of(cfg))
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, rotary)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # each layer's L2 prefetch targets, resolved once rather than every eager step: views
        # of the parameters, which the loader fills in place on the model's device (a later
        # `.to()` would leave the views behind)
        layers = list(self.layers)
        self._l2_next = [layer.l2_targets(nxt)
                         for layer, nxt in zip(layers, layers[1:] + [None], strict=True)]
        self.aux_hidden_states: AuxHiddenStates | None = None   # Qwen3ForCausalLM enables

    def forward(self, input_ids, positions, ctx):
        x, residual = self.embed_tokens(input_ids), None
        aux = self.aux_hidden_states
        # Each layer gets its own KV tensors as arguments, so one compiled graph serves all.
        for i, (layer, kv_cache, l2_next) in enumerate(zip(self.layers, ctx.kv_caches,
                                                           self._l2_next, strict=True)):
            if aux is not None:
                aux.store(i, x, residual)
            x, residual = layer(positions, x, residual, ctx, kv_cache, l2_next)
        x, _ = add_rms_norm(x, residual, self.norm)
        return x


class Qwen3ForCausalLM(nn.Module):
    # checkpoint name -> (our parameter's module, shard) for projections we fuse
    stacked_params = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                      "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg, max_position)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    capabilities = ModelCapabilities(batch_invariant=("cpu", "cuda"))

    @staticmethod
    def cache_specs(cfg, policy: KernelPolicy = DEFAULT_POLICY) -> CacheSpecs:
        return CacheSpecs(PagedAttentionSpec(cfg.num_hidden_layers, cfg.num_attention_heads,
                                             cfg.num_key_value_heads, head_dim_of(cfg)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    @property
    def text_model(self) -> nn.Module:
        """The decoder stack (embedding, layers, final norm): a multimodal model's language
        model. Its forward stores `aux_hidden_states` when they are enabled."""
        return self.model

    def enable_aux_hidden_states(self, layers: tuple[int, ...], max_tokens: int
                                 ) -> torch.Tensor:
        """From now on every forward also writes the residual stream entering `layers` into
        rows [:T] of the returned persistent [max_tokens, len(layers) * hidden] buffer
        (`AuxHiddenStates`); call it once, before graphs are captured."""
        text, weight = self.text_model, self.lm_head.weight
        text.aux_hidden_states = AuxHiddenStates(layers, len(text.layers), max_tokens,
                                                 weight.shape[1], weight.dtype, weight.device)
        return text.aux_hidden_states.buffer

    def compile_layers(self) -> None:
        """torch.compile each layer (`--compile-layers`, off by default): one compiled graph,
        dynamic in the token count, serves every layer and batch size; the attention call is
        left out (ForwardContext.attention_qkv). The layers' elementwise work lives in our fused
        ops, so inductor has nothing left to fuse: on an H100 eager layers decode as fast
        (docs/benchmarks.md, fifth session) and capture skips the layer compiles."""
        options = inductor_options(self.lm_head.weight.device)
        for layer in self.model.layers:
            layer.compile(dynamic=True, options=options)
        self.model.norm.compile(dynamic=True, options=options)

    def drafter_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embedding, LM head) weights, which a speculative drafter shares."""
        return self.text_model.embed_tokens.weight, self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Into `out` (the runner's persistent [rows, vocab] buffer, read by the sampler)."""
        return logits_into(hidden, self.lm_head.weight, out, policy_of(self))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     strict: bool = True) -> None:
        load_weights_by_name(self, weights, self.stacked_params,
                             skip=lambda name: self.tie_word_embeddings
                             and name.startswith("lm_head."), strict=strict)
