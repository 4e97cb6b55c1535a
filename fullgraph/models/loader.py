"""Load a model from a Hugging Face-format directory of safetensors files."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from fullgraph.config import ModelConfig
from fullgraph.layers.linear import MergedLinear
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy, apply_kernel_policy
from fullgraph.models.registry import get_model_class

INDEX_FILE = "model.safetensors.index.json"
logger = logging.getLogger(__name__)


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"malformed {index}: {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise ValueError(f"{index} names missing weight files: {', '.join(missing)}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in model directory {path}")
    return [os.path.join(path, f) for f in files]


# safetensors' dtype names (a file header's); others read as float32 on the meta device
_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                  "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                  "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def iterate_weights(path: str, progress: bool = True,
                    meta: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in the directory's safetensors files; `meta`: tensors
    on the meta device from the files' headers, shapes and dtypes without reading data."""
    files = safetensors_files(path)
    for file in tqdm(files, desc="Loading weights", unit="file",
                     disable=not progress or len(files) < 2):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if meta:
                        s = f.get_slice(name)
                        yield name, torch.empty(s.get_shape(), device="meta", dtype=(
                            _HEADER_DTYPES.get(s.get_dtype(), torch.float32)))
                    else:
                        yield name, f.get_tensor(name)
        except Exception as e:  # safetensors' own error types for corrupt or truncated files
            raise ValueError(f"cannot read weights from {file}: {e}") from e


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(model_config: ModelConfig, device: torch.device,
               policy: KernelPolicy = DEFAULT_POLICY) -> torch.nn.Module:
    """The model with its weights, `policy` stamped on every module (layers/policy.py)."""
    cls = get_model_class(model_config.architecture)
    with default_dtype(model_config.dtype), torch.device(device):
        model = cls(model_config.hf_config, max_position=model_config.max_model_len)
    with torch.device(device):
        model.load_weights(_cast(iterate_weights(model_config.path), model_config.dtype))
    return apply_kernel_policy(model, policy).eval().requires_grad_(False)


def update_weights(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]] | str,
                   model_config: ModelConfig, device: torch.device) -> None:
    """Copy any subset of a checkpoint's tensors, (name, tensor) pairs from anywhere (a
    trainer's parameters, cast and moved here, outside autograd) or a directory of
    safetensors files, into the loaded model's parameters in place. All or nothing: the
    tensors are loaded first into a copy of the model on the meta device (shapes only, no
    memory), so a name the model has no place for, or a wrong shape, is a ValueError before
    anything is copied."""
    if isinstance(weights, str):
        dry = iterate_weights(weights, progress=False, meta=True)
        real = iterate_weights(weights, progress=False)
    else:
        pairs = [(name, _tensor(name, t)) for name, t in weights]
        dry, real = ((name, t.to("meta")) for name, t in pairs), iter(pairs)
        _warn_tied_head(pairs, model_config)
    with default_dtype(model_config.dtype), torch.device("meta"):
        shadow = type(model)(model_config.hf_config, max_position=model_config.max_model_len)
    with torch.device("meta"), torch.no_grad():
        shadow.load_weights(_cast(dry, model_config.dtype), strict=False)
    with torch.device(device), torch.no_grad():
        model.load_weights(_cast(real, model_config.dtype), strict=False)


def _warn_tied_head(pairs: list[tuple[str, torch.Tensor]], model_config: ModelConfig) -> None:
    """A tied model's LM head is its embedding: an `lm_head.weight` is skipped (as vLLM skips
    it), so an update that names it without the embedding changes nothing there; say so."""
    names = [name for name, _ in pairs]
    if (model_config.hf_config.get_text_config().tie_word_embeddings
            and any(n.endswith("lm_head.weight") for n in names)
            and not any(n.endswith("embed_tokens.weight") for n in names)):
        logger.warning("lm_head.weight is skipped: this model ties it to its embedding, so "
                       "update embed_tokens.weight to change the LM head")


def _tensor(name: str, t) -> torch.Tensor:
    """`t` if it is a tensor with values; ValueError naming `name` otherwise."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"weight {name!r} must be a tensor, got {type(t).__name__}")
    if t.is_meta or t.is_complex():
        raise ValueError(f"weight {name!r} is a {'meta' if t.is_meta else t.dtype} tensor: "
                         f"it has no real values to load")
    return t


def _cast(weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
          ) -> Iterator[tuple[str, torch.Tensor]]:
    """Floating-point tensors in the model's dtype."""
    for name, t in weights:
        yield name, t.to(dtype) if t.is_floating_point() else t


def load_weights_by_name(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]],
                         stacked_params: dict[str, str], skip=lambda name: False,
                         loaded_elsewhere: set[str] = frozenset(), strict: bool = True) -> None:
    """Copy checkpoint tensors into the parameters of the same name. `stacked_params` maps a
    checkpoint module name (the last part, e.g. "q_proj") to the `MergedLinear` sibling that
    holds it as a shard ("qkv_proj"); `skip(name)` drops tensors the model does not use
    (a tied lm_head). A module that keeps such a projection unmerged loads it by name.
    Every parameter must be filled (`strict`; a weight update may name a subset): ValueError
    naming what is missing, unexpected or of the wrong shape. `loaded_elsewhere`: parameters
    the model filled itself while `weights` was consumed (read once the iteration is over)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for name, tensor in weights:
        if skip(name):
            continue
        module_name, _, param = name.rpartition(".")
        parent, _, leaf = module_name.rpartition(".")
        fused = f"{parent}.{stacked_params[leaf]}" if leaf in stacked_params else None
        if fused in modules:
            try:
                modules[fused].load_shard(leaf, param, tensor)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {name!r}: {e}") from None
            loaded.add(f"{fused}.{param}:{leaf}")
            continue
        if name not in params:
            raise ValueError(f"unexpected checkpoint tensor {name!r}")
        if params[name].shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(tensor)
        loaded.add(name)
    loaded |= loaded_elsewhere
    if not strict:
        return
    missing = [n for n in expected_weights(model) if n not in loaded]
    if missing:
        raise ValueError(f"missing weights in checkpoint: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def expected_weights(model: nn.Module) -> list[str]:
    """Every parameter's name, with a merged layer's shards named "<module>.weight:<shard>"."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, MergedLinear):
            for shard in module.offsets:
                names.append(f"{name}.weight:{shard}")
                if module.bias is not None:
                    names.append(f"{name}.bias:{shard}")
    for name, _ in model.named_parameters():
        module_name = name.rpartition(".")[0]
        if not isinstance(model.get_submodule(module_name), MergedLinear):
            names.append(name)
    return names
