"""Architecture name (config.json `architectures[0]`) -> model class, imported lazily.

Adding an architecture is one new module plus one line here.

Speculative-decoding drafters are not listed: a drafter is no model the engine can serve on
its own (its forward reads a target's hidden states), and EAGLE-1 checkpoints name plain
`LlamaForCausalLM`, so the architecture cannot tell them apart. The engine picks a drafter's
class by `speculative_config["method"]` through `models.eagle.drafter_class` (EAGLE-3
checkpoints, `LlamaForCausalLMEagle3`: "eagle3").
"""
from __future__ import annotations

import importlib

_MODELS: dict[str, tuple[str, str]] = {
    "Qwen3ForCausalLM": ("fullgraph.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen3_5ForCausalLM": ("fullgraph.models.qwen3_next", "HybridForCausalLM"),
    "Qwen3_5ForConditionalGeneration": ("fullgraph.models.qwen3_5_vl",
                                        "Qwen3_5ForConditionalGeneration"),
    "Qwen3_5MoeForConditionalGeneration": ("fullgraph.models.qwen3_5_vl",
                                           "Qwen3_5ForConditionalGeneration"),
    "Qwen3_5MoeForCausalLM": ("fullgraph.models.qwen3_next", "HybridForCausalLM"),
    "Qwen3NextForCausalLM": ("fullgraph.models.qwen3_next", "HybridForCausalLM"),
    "Qwen3VLForConditionalGeneration": ("fullgraph.models.qwen3_vl",
                                        "Qwen3VLForConditionalGeneration"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str):
    if architecture not in _MODELS:
        raise ValueError(f"unknown architecture {architecture!r}; supported: "
                         f"{', '.join(supported_architectures())}")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
