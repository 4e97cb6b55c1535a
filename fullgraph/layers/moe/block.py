"""`SparseMoeBlock`: the MLP of a mixture-of-experts layer (Qwen3-Next, Qwen3.5-MoE).

Parameters carry transformers' names (Qwen3NextSparseMoeBlock / Qwen3_5MoeSparseMoeBlock),
so a state dict in transformers' in-memory layout loads by name:
  gate.weight `[E, H]`                      router
  experts.gate_up_proj `[E, 2I, H]`         gate rows first, then up rows
  experts.down_proj `[E, H, I]`
  shared_expert.{gate,up}_proj.weight `[S, H]`, shared_expert.down_proj.weight `[H, S]`
  shared_expert_gate.weight `[1, H]`
Checkpoints store the experts either fused like that (Qwen3.5-MoE's) or one expert per
tensor, `experts.{e}.{gate,up,down}_proj.weight` (Qwen3-Next's, and what transformers'
save_pretrained writes for both): `load_expert_weight` takes either.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from fullgraph.layers.fused_linear import silu_mul_linear
from fullgraph.layers.linear import Linear
from fullgraph.layers.moe.experts import moe_experts
from fullgraph.layers.moe.routing import route
from fullgraph.layers.policy import policy_of

_PER_EXPERT = re.compile(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
# fused: all experts in one 3-D tensor (gate/up also seen as separate 3-D tensors)
_FUSED = re.compile(r"experts\.(gate_up_proj|gate_proj|up_proj|down_proj)")


class SharedExpert(nn.Module):
    """transformers' Qwen3NextMLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [gate | up] feeds silu_mul_linear, which folds the activation into down at one row
        gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        return silu_mul_linear(gate_up, self.down_proj)


class Experts(nn.Module):
    """The routed experts' weights, fused over experts (transformers' Qwen3NextExperts)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size,
                                                     hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))


class SparseMoeBlock(nn.Module):
    """forward(x `[T, H]` or `[..., H]`) -> same shape: shared expert (gated) plus the top-k
    routed experts, weighted by the router's probabilities (renormalized over the top-k
    when `norm_topk_prob`). `shared_expert_intermediate_size=0`: no shared expert."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int,
                 moe_intermediate_size: int, shared_expert_intermediate_size: int = 0,
                 norm_topk_prob: bool = True, hidden_act: str = "silu") -> None:
        super().__init__()
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported expert activation {hidden_act!r}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.moe_intermediate_size = moe_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.gate = Linear(hidden_size, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden_size, moe_intermediate_size)
        self.shared_expert = self.shared_expert_gate = None
        if shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(hidden_size, shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(hidden_size, 1, bias=False)

    @classmethod
    def from_config(cls, cfg) -> SparseMoeBlock:
        """From a transformers Qwen3NextConfig / Qwen3_5MoeTextConfig (the latter has no
        `norm_topk_prob`: it always renormalizes)."""
        return cls(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
                   cfg.moe_intermediate_size,
                   getattr(cfg, "shared_expert_intermediate_size", 0) or 0,
                   getattr(cfg, "norm_topk_prob", True), getattr(cfg, "hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)
        topk_weights, topk_ids = route(self.gate(x), self.top_k, self.norm_topk_prob)
        shared = shared_gate = None
        if self.shared_expert is not None:
            shared, shared_gate = self.shared_expert(x), self.shared_expert_gate(x)
        out = moe_experts(x, topk_weights, topk_ids, self.experts.gate_up_proj,
                          self.experts.down_proj, shared, shared_gate, policy_of(self))
        return out.reshape(shape)

    def _expert_target(self, proj: str) -> torch.Tensor:
        """The slice of a fused parameter holding `proj` of every expert, `[E, rows, cols]`."""
        i = self.moe_intermediate_size
        gate_up = self.experts.gate_up_proj
        return {"gate_up_proj": gate_up, "gate_proj": gate_up[:, :i], "up_proj": gate_up[:, i:],
                "down_proj": self.experts.down_proj}[proj]

    def load_expert_weight(self, name: str, tensor: torch.Tensor) -> bool:
        """Copy one checkpoint tensor of the routed experts into the fused parameters.

        `name` is relative to the block: `experts.{e}.{gate,up,down}_proj.weight` (one
        expert, 2-D) or `experts.{gate_up,gate,up,down}_proj` (all experts, 3-D). Returns
        False for any other name (load those by name); raises ValueError on a shape that
        does not fit.
        """
        if m := _PER_EXPERT.fullmatch(name):
            e = int(m[1])
            if e >= self.num_experts:
                raise ValueError(f"{name}: expert {e} of {self.num_experts}")
            dst = self._expert_target(m[2])[e]
        elif m := _FUSED.fullmatch(name):
            dst = self._expert_target(m[1])
        else:
            return False
        _copy_checked(name, dst, tensor)
        return True

    def load_weight(self, name: str, tensor: torch.Tensor) -> bool:
        """Any checkpoint tensor of the block (name relative to it): the experts in either
        layout, the rest by parameter name. False for a name the block does not have."""
        if self.load_expert_weight(name, tensor):
            return True
        param = dict(self.named_parameters()).get(name)
        if param is None:
            return False
        _copy_checked(name, param, tensor)
        return True


def _copy_checked(name: str, dst: torch.Tensor, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(dst.shape):
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                         f"expected {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(tensor)
