"""vLLM's engine arguments that fullgraph takes so vLLM command lines and scripts run: each
has the values it runs with here (any value, for an argument with no effect), and any other
value is a ValueError naming the argument and why, before the model loads. The CLI's flags
(`cli_args.py`) and `LLM(**kwargs)` (`llm.py`) check through this one table."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ANY = object()          # an argument with no effect here: every value runs

ONE_GPU = "a fullgraph engine runs on one GPU (run one engine per GPU)"

# name -> (the values fullgraph runs with, or ANY; why)
VLLM_ARGS: dict[str, tuple[Any, str]] = {
    "tensor_parallel_size": ((1,), ONE_GPU),
    "pipeline_parallel_size": ((1,), ONE_GPU),
    "data_parallel_size": ((1,), ONE_GPU),
    "quantization": ((None,), "weights run unquantized, in the model's dtype"),
    "kv_cache_dtype": (("auto",), "the KV cache is in the model's dtype"),
    "enable_lora": ((False,), "no LoRA adapters"),
    "enable_chunked_prefill": ((None, True), "prompts are always chunked to the token budget"),
    "trust_remote_code": (ANY, "only the built-in architectures run; no code is loaded from a "
                               "model directory"),
    "disable_log_requests": (ANY, "requests are not logged"),
    "enable_log_requests": (ANY, "requests are not logged"),
    # offline scripts' usual arguments
    "tokenizer_mode": (("auto", "hf"), "the model directory's fast tokenizer"),
    "load_format": (("auto", "safetensors"), "weights load from safetensors files"),
    "revision": ((None,), "models load from a local directory, never downloaded"),
    "swap_space": (ANY, "preempted requests recompute; nothing is swapped to the CPU"),
    "disable_custom_all_reduce": (ANY, "one GPU: no all-reduce"),
}


def check_vllm_args(values: Mapping[str, Any], cli: bool = False) -> None:
    """ValueError naming the first of `values` (vLLM argument names) fullgraph cannot honor,
    as a CLI flag when `cli` (`--kv-cache-dtype fp8`) else as a keyword (`kv_cache_dtype=
    'fp8'`)."""
    for name, value in values.items():
        allowed, why = VLLM_ARGS[name]
        if allowed is ANY or value in allowed:
            continue
        if not cli:
            shown = f"{name}={value!r}"
        elif isinstance(value, bool):
            shown = f"--{'' if value else 'no-'}{name.replace('_', '-')}"
        else:
            shown = f"--{name.replace('_', '-')} {value}"
        raise ValueError(f"{shown} is not supported by fullgraph: {why}")


def split_vllm_args(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` less the vLLM arguments in it, which are checked (`check_vllm_args`)."""
    check_vllm_args({k: v for k, v in kwargs.items() if k in VLLM_ARGS})
    return {k: v for k, v in kwargs.items() if k not in VLLM_ARGS}
