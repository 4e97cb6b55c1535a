"""Hybrid Gated DeltaNet models: Qwen3-Next and Qwen3.5 (dense and mixture-of-experts).

Read it as a reference. Most layers mix tokens with a Gated DeltaNet (linear attention: a
short causal conv, then the gated delta rule over a recurrent state per request); every few
layers (the config's `layer_types`) use gated full attention over the paged KV cache. The
MLP is a SwiGLU, or a sparse mixture of experts with a shared expert. Tensors are
[tokens, ...] with every request's tokens packed together; the runner hands each layer its
own cache through `ForwardContext` (attention layers a KV pair, GDN layers their state pools).

Conventions that differ from Qwen3 (models/qwen3.py), all from transformers' modeling files:
- RMSNorms scale by (1 + w), computed in float32 (the checkpoint stores w around 0), except the
  GDN output norm, which scales by w;
- the q projection yields a query and an output gate per head; attention's output is
  multiplied by sigmoid(gate) before o_proj;
- rotary embedding covers the first `partial_rotary_factor` of each head's dimensions.
Qwen3-Next checkpoints interleave q/k/v/z (and b/a) per key-head group in one projection;
`_split_qwen3_next_projections` reorders them into Qwen3.5's separate projections at load,
so one layer serves both.

Each RMSNorm, with the residual add before it, runs inside the projection it feeds (as in
models/qwen3.py), and a decode step's GDN work between in_proj and out_proj is two kernels on
the state pools (layers/gdn/fused_decode.py; a speculative verify step's, fused_verify.py),
and the gated attention's q/k norm, partial rotary, K/V store and output gate are two kernels
around attention (layers/gated_attention.py), on CUDA. The torch ops below stay the
reference and the path everywhere else (CPU; prefill GDN through fla).

The batch-invariant mode (`kernel_policy`, layers/policy.py; on the GPU through
layers/gdn/fused_aligned.py's kernels) keeps every token's bits
independent of the rest of the step (docs/batch_invariance.md, 6.7): the GDN layers run
every step, decode included, through one conv formula and the gated delta rule
with chunks at absolute positions (layers/gdn/aligned.py, whose per-slot tails of inputs are
extra state tensors that only the mode's `cache_specs` asks for); elementwise
transcendentals go through `activation.scalar_path`, projections and experts through
`linear.invariant_matmul`, attention through the invariant backend.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from fullgraph.attention.backend import ForwardContext, KVCache
from fullgraph.attention.gdn import GDNMetadata
from fullgraph.layers.embedding import Embedding
from fullgraph.layers import gated_attention
from fullgraph.layers.fused_linear import (add_rms_norm, gated_norm_linear, norm_linear,
                                          one_row_prologue, sigmoid_gate_linear,
                                          silu_mul_linear)
from fullgraph.layers.activation import elementwise
from fullgraph.layers.gdn import (TAIL_INPUTS, aligned_chunk_gated_delta_rule, causal_conv1d,
                                  causal_conv1d_decode, chunk_gated_delta_rule,
                                  decode_gated_delta_rule, fused_aligned, fused_decode,
                                  fused_verify, gdn_gating, rms_norm_gated,
                                  speculative_gated_delta_rule)
from fullgraph.layers.linear import Linear, MergedLinear, logits_into
from fullgraph.layers.norm import RMSNorm, ZeroCenteredRMSNorm
from fullgraph.layers.rotary import RotaryEmbedding, apply_rotary, rope_theta_of
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy, policy_of
from fullgraph.models.interface import (CacheSpecs, ModelCapabilities, PagedAttentionSpec,
                                        StateSpec, StateTensorSpec)
from fullgraph.models.loader import load_weights_by_name
from fullgraph.models.qwen3 import AuxHiddenStates, Qwen3ForCausalLM, RopeTables

LAYER_TYPES = ("linear_attention", "full_attention")
# Shapes that must come from config.json itself: transformers would fill in its own defaults
# (a 9B model's), and the checkpoint would then fail to load with a less helpful message.
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "linear_conv_kernel_dim", "linear_key_head_dim",
             "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads")


def check_config(cfg, raw: dict) -> None:
    """ValueError naming the field of config.json (`raw`, as read) this code cannot run with,
    at load time."""
    raw = raw.get("text_config", raw)
    for name in _REQUIRED:
        if raw.get(name) is None:
            raise ValueError(f"config.json lacks {name!r}, which hybrid models need")
    if raw.get("layer_types") is None and raw.get("full_attention_interval") is None:
        raise ValueError("config.json has neither 'layer_types' nor 'full_attention_interval'")
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        raise ValueError(f"config.json's layer_types has {len(cfg.layer_types)} entries for "
                         f"{cfg.num_hidden_layers} num_hidden_layers")
    unknown = sorted(set(cfg.layer_types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"config.json's layer_types has unknown types {unknown}; supported: "
                         f"{list(LAYER_TYPES)}")
    if cfg.linear_num_value_heads % cfg.linear_num_key_heads:
        raise ValueError("config.json's linear_num_value_heads must be a multiple of "
                         "linear_num_key_heads")
    if getattr(cfg, "num_experts", 0) and getattr(cfg, "moe_intermediate_size", None) is None:
        raise ValueError("config.json lacks 'moe_intermediate_size', which its experts need")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"config.json's hidden_act {cfg.hidden_act!r} is not supported "
                         f"(silu only)")


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def rotary_dim_of(cfg) -> int:
    params = getattr(cfg, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    return int(head_dim_of(cfg) * factor)


def uses_experts(cfg, layer: int) -> bool:
    """Qwen3-Next's rule (Qwen3.5-MoE has experts in every layer: step 1, no exceptions)."""
    if not getattr(cfg, "num_experts", 0):
        return False
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return layer not in (getattr(cfg, "mlp_only_layers", None) or []) and (layer + 1) % step == 0


class GatedRMSNorm(nn.Module):
    """The GDN output norm: RMSNorm scaled by w (not 1 + w), times silu(gate)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        invariant = policy_of(self).batch_invariant
        if invariant and x.is_cuda and fused_aligned.triton is not None:
            # torch's reductions choose their launch shape from the row count: a row kernel
            return fused_aligned.gated_norm_rows(x, gate, self.weight, self.eps)
        return rms_norm_gated(x, gate, self.weight, self.eps, invariant)


class GatedAttention(nn.Module):
    def __init__(self, cfg, rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        self.head_dim = d = head_dim_of(cfg)
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        bias = getattr(cfg, "attention_bias", False)
        self.qkv_proj = MergedLinear(cfg.hidden_size, {
            "q_proj": 2 * self.num_heads * d,        # query and output gate, per head
            "k_proj": self.num_kv_heads * d, "v_proj": self.num_kv_heads * d}, bias=bias)
        self.o_proj = Linear(self.num_heads * d, cfg.hidden_size, bias=bias)
        self.q_norm = ZeroCenteredRMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(d, cfg.rms_norm_eps)
        self.rotary = rotary
        self.rotary_dim = rotary_dim_of(cfg)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                norm: RMSNorm, ctx: ForwardContext, kv_cache: KVCache,
                rope: RopeTables | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope`: this step's (cos, sin) tables, `rotary_dim` wide, which `positions`
        index, instead of the model's own (a model with MRoPE builds per-token tables each
        step, models/qwen3_5_vl.py; then `rotary` may be None)."""
        t, d, hq, hkv = x.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        cos, sin = rope if rope is not None else (self.rotary.cos, self.rotary.sin)
        qkv, residual = norm_linear(x, residual, norm, self.qkv_proj)
        if gated_attention.supported(qkv, kv_cache[0], d):
            # the same ops as below, in two kernels (layers/gated_attention.py)
            q = gated_attention.qk_norm_rope_store_kv(
                qkv, positions, cos, sin, self.q_norm.kernel_weight,
                self.k_norm.kernel_weight, self.q_norm.eps, hq, hkv, self.rotary_dim,
                kv_cache[0], kv_cache[1], ctx.slot_mapping)
            o = ctx.attention(q, kv_cache)
            return sigmoid_gate_linear(o, qkv, self.o_proj), residual
        qg, k, v = qkv.split((2 * hq * d, hkv * d, hkv * d), dim=-1)
        q, gate = qg.view(t, hq, 2 * d).chunk(2, dim=-1)
        q = self.q_norm(q)
        k = self.k_norm(k.view(t, hkv, d))
        rd = self.rotary_dim
        q_rot, k_rot = apply_rotary(positions, cos, sin, q[..., :rd], k[..., :rd])
        q = torch.cat((q_rot, q[..., rd:]), dim=-1)
        k = torch.cat((k_rot, k[..., rd:]), dim=-1)
        ctx.store_kv(k, v.view(t, hkv, d), kv_cache)
        o = ctx.attention(q, kv_cache).reshape(t, hq * d)
        gate = gate.reshape(t, hq * d)
        # the mode: which elements take sigmoid's vectorized formula depends on the row count
        gate = elementwise(torch.sigmoid, gate, policy_of(self).batch_invariant)
        return self.o_proj(o * gate), residual


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.num_k_heads, self.num_v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj = MergedLinear(cfg.hidden_size, {
            "in_proj_qkv": self.conv_dim, "in_proj_z": self.value_dim,
            "in_proj_b": self.num_v_heads, "in_proj_a": self.num_v_heads})
        k = cfg.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, k, groups=self.conv_dim,
                                bias=False, padding=k - 1)      # holds the weight only
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                ctx: ForwardContext, state: tuple[torch.Tensor, ...]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`state`: the layer's pools (conv, recurrent; in the batch-invariant mode then the
        tails of TAIL_INPUTS), as `HybridForCausalLM.cache_specs` lists them."""
        md, (conv_pool, recurrent_pool) = ctx.state_metadata, state[:2]
        t = x.shape[0]
        weight = self.conv1d.weight.squeeze(1)                  # [conv_dim, kernel]
        spec = md.write_slots is not None     # speculative decoding: a state per position
        fused = (md.decode and not spec and not policy_of(self).batch_invariant
                 and fused_decode.supported(x, self.head_k_dim, self.head_v_dim))
        if fused and one_row_prologue(x, self.in_proj):
            return self._one_row_decode(x, residual, norm, weight, md, conv_pool,
                                        recurrent_pool)
        proj, residual = norm_linear(x, residual, norm, self.in_proj)
        qkv, z, b, a = proj.split(
            (self.conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads), dim=-1)
        if policy_of(self).batch_invariant:
            return self.out_proj(self._aligned(qkv, z, b, a, weight, md, state)), residual
        if fused:
            # the same ops as below, in two kernels on the pools (layers/gdn/fused_decode.py)
            qkv = fused_decode.conv_decode(qkv, weight, conv_pool, md.state_slots,
                                           md.has_initial_state)
            o = fused_decode.gated_delta_decode(
                qkv, z, b, a, self.A_log, self.dt_bias, self.norm.weight, self.norm.eps,
                recurrent_pool, md.state_slots, md.has_initial_state, self.num_k_heads)
            return self.out_proj(o), residual
        if (spec and fused_decode.supported(x, self.head_k_dim, self.head_v_dim)
                and fused_verify.uniform_rows(qkv, md.state_slots, md.short_query_len)):
            # a verify step: the same, a state per row to the lane's slot group
            # (layers/gdn/fused_verify.py)
            n = md.short_query_len
            qkv = fused_verify.conv_verify(qkv, weight, conv_pool, md.state_slots,
                                           md.has_initial_state, md.write_slots, n)
            o = fused_verify.gated_delta_verify(
                qkv, z, b, a, self.A_log, self.dt_bias, self.norm.weight, self.norm.eps,
                recurrent_pool, md.state_slots, md.has_initial_state, md.write_slots, n,
                self.num_k_heads)
            return self.out_proj(o), residual
        if md.decode and not spec:
            qkv = causal_conv1d_decode(qkv, weight, None, conv_pool, md.state_slots,
                                       md.has_initial_state)
        else:
            qkv = causal_conv1d(qkv, weight, None, conv_pool, md.state_slots,
                                md.query_start_loc, md.has_initial_state,
                                write_slots=md.write_slots)
        q, k, v = qkv.split((self.key_dim, self.key_dim, self.value_dim), dim=-1)
        q = q.reshape(t, self.num_k_heads, self.head_k_dim)
        k = k.reshape(t, self.num_k_heads, self.head_k_dim)
        v = v.reshape(t, self.num_v_heads, self.head_v_dim)
        g, beta = gdn_gating(a, b, self.A_log, self.dt_bias)
        if spec:
            o = speculative_gated_delta_rule(q, k, v, g, beta, recurrent_pool, md.state_slots,
                                             md.write_slots, md.query_start_loc,
                                             md.has_initial_state, md.chunk_indices,
                                             md.short_query_len)
        elif md.decode:
            o = decode_gated_delta_rule(q, k, v, g, beta, recurrent_pool, md.state_slots,
                                        md.has_initial_state)
        else:
            o = chunk_gated_delta_rule(q, k, v, g, beta, recurrent_pool, md.state_slots,
                                       md.query_start_loc, md.has_initial_state,
                                       md.chunk_indices)
        o = self.norm(o, z.reshape(t, self.num_v_heads, self.head_v_dim))
        return self.out_proj(o.reshape(t, self.value_dim)), residual

    def _one_row_decode(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                        weight: torch.Tensor, md: GDNMetadata, conv_pool: torch.Tensor,
                        recurrent_pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch-1 decode step, the fused path's ops in three kernels
        (layers/gdn/fused_decode.py): in_proj with its input norm and the conv in its
        epilogue; the rule with a head's value columns spread over programs (one program a
        head would leave most SMs idle); out_proj with the gated norm in its prologue."""
        proj, residual = fused_decode.in_proj_conv(
            x, residual, norm.kernel_weight, norm.eps, self.in_proj.weight, weight, conv_pool,
            md.state_slots, md.has_initial_state)
        qkv, z, b, a = proj.split(
            (self.conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads), dim=-1)
        o = fused_decode.gated_delta_decode(
            qkv, z, b, a, self.A_log, self.dt_bias, self.norm.weight, self.norm.eps,
            recurrent_pool, md.state_slots, md.has_initial_state, self.num_k_heads, norm=False)
        return gated_norm_linear(o, z, self.norm, self.out_proj), residual

    def _aligned(self, qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                 weight: torch.Tensor, md: GDNMetadata, state: tuple[torch.Tensor, ...]
                 ) -> torch.Tensor:
        """The batch-invariant mode, from the projection to out_proj's input `[T,
        value_dim]`: prefill, mixed and decode steps alike through the prefill conv (its taps
        in order, float32) and the rule with chunks at absolute positions from each slot's
        committed state and tail (layers/gdn/aligned.py). A lane that starts now (a new or
        preempted request: has_initial_state False) reads neither its slot's state nor its
        tail, as in the normal mode."""
        conv_pool, recurrent_pool, *tails = state
        t = qkv.shape[0]
        qkv = causal_conv1d(qkv, weight, None, conv_pool, md.state_slots, md.query_start_loc,
                            md.has_initial_state, batch_invariant=True,
                            write_slots=md.write_slots)
        q, k, v = qkv.split((self.key_dim, self.key_dim, self.value_dim), dim=-1)
        g, beta = gdn_gating(a, b, self.A_log, self.dt_bias, batch_invariant=True)
        o = aligned_chunk_gated_delta_rule(
            q.reshape(t, self.num_k_heads, self.head_k_dim),
            k.reshape(t, self.num_k_heads, self.head_k_dim),
            v.reshape(t, self.num_v_heads, self.head_v_dim), g, beta, recurrent_pool, tails,
            md.state_slots, md.query_start_loc, md.seq_lens, md.has_initial_state,
            policy_of(self), max_query_len=1 if md.decode else None,
            write_slots=md.write_slots)
        o = self.norm(o, z.reshape(t, self.num_v_heads, self.head_v_dim))
        return o.reshape(t, self.value_dim)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {"gate_proj": intermediate_size,
                                                       "up_proj": intermediate_size})
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
                ) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, residual = norm_linear(x, residual, norm, self.gate_up_proj)
        return silu_mul_linear(gate_up, self.down_proj), residual


class HybridDecoderLayer(nn.Module):
    def __init__(self, cfg, layer: int, rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        self.layer_type = cfg.layer_types[layer]
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = GatedAttention(cfg, rotary)
        if uses_experts(cfg, layer):
            from fullgraph.layers.moe import SparseMoeBlock
            self.mlp = SparseMoeBlock.from_config(cfg)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = ZeroCenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext, cache, rope: RopeTables | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it is added): each RMSNorm, with
        the residual add before it, runs inside the projection it feeds (as in qwen3.py).
        `positions` and `rope` only reach the attention layers' rotary (GatedAttention)."""
        if self.layer_type == "linear_attention":
            x, residual = self.linear_attn(x, residual, self.input_layernorm, ctx, cache)
        else:
            x, residual = self.self_attn(positions, x, residual, self.input_layernorm, ctx,
                                         cache, rope)
        if isinstance(self.mlp, SwiGLU):
            return self.mlp(x, residual, self.post_attention_layernorm)
        x, residual = add_rms_norm(x, residual, self.post_attention_layernorm)
        return self.mlp(x), residual


class HybridModel(nn.Module):
    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        rotary = RotaryEmbedding(rotary_dim_of(cfg), max_position, rope_theta_of(cfg))
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(HybridDecoderLayer(cfg, i, rotary)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = ZeroCenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.aux_hidden_states: AuxHiddenStates | None = None   # HybridForCausalLM enables

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        aux = self.aux_hidden_states
        kv_caches, states = iter(ctx.kv_caches), iter(ctx.state_caches)
        for i, layer in enumerate(self.layers):
            cache = next(states) if layer.layer_type == "linear_attention" else next(kv_caches)
            if aux is not None:
                aux.store(i, x, residual)
            x, residual = layer(positions, x, residual, ctx, cache)
        return add_rms_norm(x, residual, self.norm)[0]


class HybridForCausalLM(nn.Module):
    """`Qwen3NextForCausalLM`, `Qwen3_5ForCausalLM` and `Qwen3_5MoeForCausalLM`."""

    # batch-invariant (docs/batch_invariance.md, 6.7 / 6.8); the vision-language classes
    # built on these layers (models/qwen3_5_vl.py) declare their own capabilities
    capabilities = ModelCapabilities(prefix_caching=False, batch_invariant=("cpu", "cuda"))
    # checkpoint name -> the merged projection that holds it
    stacked_params = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                      "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                      "in_proj_qkv": "in_proj", "in_proj_z": "in_proj", "in_proj_b": "in_proj",
                      "in_proj_a": "in_proj"}

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = HybridModel(cfg, max_position)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    check_config = staticmethod(check_config)

    @staticmethod
    def cache_specs(cfg, policy: KernelPolicy = DEFAULT_POLICY) -> CacheSpecs:
        num_full = sum(t == "full_attention" for t in cfg.layer_types)
        hk, dk = cfg.linear_num_key_heads, cfg.linear_key_head_dim
        hv, dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
        tensors = (StateTensorSpec("conv", (cfg.linear_conv_kernel_dim - 1, 2 * hk * dk + hv * dv)),
                   StateTensorSpec("recurrent", (hv, dk, dv), torch.float32))
        if policy.batch_invariant:
            # per slot, the rule's inputs since the last committed chunk boundary
            # (layers/gdn/aligned.py): the mode only
            width = policy.gdn_chunk - 1
            shapes = {"q": ((hk, dk), None), "k": ((hk, dk), None), "v": ((hv, dv), None),
                      "g": ((hv,), torch.float32), "beta": ((hv,), None)}
            tensors += tuple(StateTensorSpec(f"tail_{name}", (width, *shapes[name][0]),
                                             shapes[name][1]) for name in TAIL_INPUTS)
        state = StateSpec(len(cfg.layer_types) - num_full, tensors)
        return CacheSpecs(PagedAttentionSpec(num_full, cfg.num_attention_heads,
                                             cfg.num_key_value_heads, head_dim_of(cfg)), state)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    # Qwen3's: the residual stream entering the listed layers (Gated DeltaNet or attention
    # alike) into a persistent buffer every forward, which HybridModel.forward writes; and
    # the embedding and LM head a speculative drafter shares
    text_model = Qwen3ForCausalLM.text_model
    enable_aux_hidden_states = Qwen3ForCausalLM.enable_aux_hidden_states
    drafter_weights = Qwen3ForCausalLM.drafter_weights

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return logits_into(hidden, self.lm_head.weight, out, policy_of(self))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     strict: bool = True) -> None:
        def skip(name: str) -> bool:
            # multi-token-prediction heads are a drafter, not part of this model
            return (name.startswith("mtp.")
                    or (self.tie_word_embeddings and name.startswith("lm_head.")))
        per_expert: set[str] = set()
        try:
            load_weights_by_name(self, self._route(weights, per_expert), self.stacked_params,
                                 skip, loaded_elsewhere=per_expert, strict=strict)
        finally:                   # the norms follow what was copied, even if not all was
            for module in self.modules():
                if isinstance(module, ZeroCenteredRMSNorm):
                    module.refresh()

    def _route(self, weights: Iterable[tuple[str, torch.Tensor]], per_expert: set[str]
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors in the names and layouts of our parameters: Qwen3-Next's
        interleaved projections split; one expert's tensors (the published checkpoints'
        layout) copied into the experts' fused parameters, which go into `per_expert` once
        every expert has filled them."""
        modules = dict(self.named_modules())
        filled: dict[str, int] = {}
        for name, tensor in weights:
            if ".in_proj_qkvz." in name or ".in_proj_ba." in name:
                yield from _split_qwen3_next_projections(self.config, name, tensor)
                continue
            block, sep, rest = name.partition(".mlp.experts.")
            mlp = modules.get(f"{block}.mlp")
            if sep and rest[:1].isdigit() and hasattr(mlp, "load_expert_weight"):
                mlp.load_expert_weight(f"experts.{rest}", tensor)
                fused = "down_proj" if rest.endswith("down_proj.weight") else "gate_up_proj"
                key = f"{block}.mlp.experts.{fused}"
                filled[key] = filled.get(key, 0) + 1
                if filled[key] == mlp.num_experts * (1 if fused == "down_proj" else 2):
                    per_expert.add(key)
                continue
            yield name, tensor


def _split_qwen3_next_projections(cfg, name: str, w: torch.Tensor
                                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Qwen3-Next's in_proj_qkvz rows are grouped per key head as [q, k, v..., z...] (and
    in_proj_ba as [b..., a...]): regroup them into Qwen3.5's in_proj_qkv = [all q; all k; all
    v], in_proj_z, in_proj_b, in_proj_a (transformers' fix_query_key_value_ordering)."""
    hk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // hk             # value heads per key head
    prefix = name.rsplit(".", 2)[0]
    grouped = w.reshape(hk, -1, *w.shape[1:])
    if ".in_proj_qkvz." in name:
        q, k, v, z = grouped.split((dk, dk, r * dv, r * dv), dim=1)
        flat = [p.reshape(-1, *w.shape[1:]) for p in (q, k, v, z)]
        yield f"{prefix}.in_proj_qkv.weight", torch.cat(flat[:3])
        yield f"{prefix}.in_proj_z.weight", flat[3]
    else:
        b, a = grouped.split((r, r), dim=1)
        yield f"{prefix}.in_proj_b.weight", b.reshape(-1, *w.shape[1:])
        yield f"{prefix}.in_proj_a.weight", a.reshape(-1, *w.shape[1:])
