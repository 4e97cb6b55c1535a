"""User-facing engine arguments (named like vLLM's) -> the frozen `EngineConfig`."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from fullgraph.attention.backend import get_backend_class
from fullgraph.config import (CacheConfig, CompilationConfig, CUDAGraphMode, EngineConfig,
                              ModelConfig, SchedulerConfig, SpeculativeConfig)
from fullgraph.layers.policy import KernelPolicy
from fullgraph.models.hub import resolve_model_dir
from fullgraph.models.registry import get_model_class
from fullgraph.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


@dataclass(slots=True)
class EngineArgs:
    model: str = "tiny-qwen3"
    served_model_name: str | None = None
    tokenizer: str | None = None      # a directory or model id; None: the model's own
    # a Jinja template, or a file holding one; None: the tokenizer's own
    chat_template: str | None = None
    # default sampling parameters: "auto" from the model's generation_config.json, "none"
    # (or vLLM's "vllm") fullgraph's own, or a directory holding a generation_config.json
    generation_config: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 32          # measured fastest when decode tiled by the block (docs)
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    # None: on where the model supports it (off, with a log line, for models with
    # per-request recurrent state); True asks for it, an error where it cannot work
    enable_prefix_caching: bool | None = None
    # triton: prompt chunks in one Triton kernel, decode as flex (attention/triton_attn.py;
    # docs/benchmarks.md compares the two)
    attention_backend: str = "triton"
    enforce_eager: bool = False
    cudagraph_mode: str = "full"
    cudagraph_capture_sizes: list[int] | None = None
    max_cudagraph_capture_size: int | None = None
    cudagraph_runtime: str = "auto"   # "fake" runs graph capture/replay semantics on a CPU
    # torch.compile the decoder layers (CUDA). Off: every op of a Qwen3 layer is one of our
    # kernels already, and on an H100 eager layers decode as fast while capture skips four
    # layer compiles (docs/benchmarks.md, fifth session).
    compile_layers: bool = False
    # Compile the Triton kernels capture needs in parallel before the warmups (CUDA).
    compile_ahead: bool = True
    # Vision encoder graphs (multimodal models): budgets in patch rows (None: derived from
    # the largest image the preprocessor lets through), and the most images one graph packs.
    encoder_cudagraph_token_budgets: list[int] | None = None
    encoder_cudagraph_max_images_per_batch: int = 8
    # Overlap host work with the device (one step in flight); None = on for CUDA devices,
    # where it pays (docs/benchmarks.md), off on a CPU.
    async_scheduling: bool | None = None
    # Batch-invariant mode: a request's tokens and logprobs are the same bits whatever else
    # is in the step (docs/batch_invariance.md). None: FULLGRAPH_BATCH_INVARIANT, else off.
    batch_invariant: bool | None = None
    # Speculative decoding (vLLM's spelling): {"method": "eagle3" | "eagle", "model": DIR,
    # "num_speculative_tokens": k}, or that as a JSON string (--speculative-config).
    speculative_config: dict | str | None = None
    # vLLM's multimodal arguments (or their JSON): {"image": N}, the most images a prompt may
    # carry (other modalities 0 only); {"min_pixels": .., "max_pixels": ..} over the model's
    # preprocessor_config.json
    limit_mm_per_prompt: dict | str | None = None
    mm_processor_kwargs: dict | str | None = None
    seed: int = 0
    max_logprobs: int = 20
    disable_log_stats: bool = False   # the server's periodic throughput / KV usage log line

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def create_engine_config(self) -> EngineConfig:
        device = resolve_device(self.device)
        model = create_model_config(self.model, self.dtype, self.max_model_len, device,
                                    self.served_model_name, self.tokenizer, self.chat_template,
                                    self.generation_config)
        model = replace(model, **multimodal_options(self.limit_mm_per_prompt,
                                                    self.mm_processor_kwargs))
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        batched = self.max_num_batched_tokens or max(8192, self.max_num_seqs)
        if batched < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({batched}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running request needs a token a step")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise ValueError("num_gpu_blocks_override must be >= 2 (block 0 is reserved)")
        budgets = self.encoder_cudagraph_token_budgets or []
        if any(b < 1 for b in budgets) or self.encoder_cudagraph_max_images_per_batch < 1:
            raise ValueError(f"encoder_cudagraph_token_budgets and "
                             f"encoder_cudagraph_max_images_per_batch must be positive, got "
                             f"{budgets} and {self.encoder_cudagraph_max_images_per_batch}")
        try:
            mode = CUDAGraphMode(self.cudagraph_mode.lower())
        except ValueError:
            raise ValueError(f"cudagraph_mode must be one of "
                             f"{[m.value for m in CUDAGraphMode]}, got {self.cudagraph_mode!r}") from None
        runtime = "cuda" if self.cudagraph_runtime == "auto" else self.cudagraph_runtime
        if runtime not in ("cuda", "fake"):
            raise ValueError(f"cudagraph_runtime must be auto, cuda or fake, got {runtime!r}")
        speculative = speculative_config(self.speculative_config, model)
        # asked for, even where no graphs run (a CPU): the command line is refused on a GPU
        if speculative is not None and mode == CUDAGraphMode.PIECEWISE and not self.enforce_eager:
            raise ValueError("speculative decoding runs with cudagraph_mode full, "
                             "full_decode_only or none, not piecewise")
        if self.enforce_eager or (device.type != "cuda" and runtime == "cuda"):
            mode = CUDAGraphMode.NONE
        # Async scheduling by default on CUDA, speculative decoding included (measured
        # faster with it: docs/speculative.md, "Async scheduling").
        scheduler = SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=batched,
                                    max_model_len=model.max_model_len,
                                    async_scheduling=(device.type == "cuda"
                                                      if self.async_scheduling is None
                                                      else self.async_scheduling),
                                    num_speculative_tokens=(speculative.num_speculative_tokens
                                                            if speculative else 0))
        compilation = CompilationConfig(
            cudagraph_mode=mode,
            cudagraph_capture_sizes=tuple(capture_sizes(self.cudagraph_capture_sizes,
                                                        self.max_cudagraph_capture_size, scheduler)),
            lazy_capture_sizes=tuple(lazy_capture_sizes(self.cudagraph_capture_sizes,
                                                        self.max_cudagraph_capture_size, scheduler)),
            graph_runtime=runtime, compile_layers=self.compile_layers and device.type == "cuda",
            compile_attention=device.type == "cuda", compile_ahead=self.compile_ahead,
            encoder_cudagraph_token_budgets=tuple(self.encoder_cudagraph_token_budgets or ()),
            encoder_cudagraph_max_images_per_batch=self.encoder_cudagraph_max_images_per_batch)
        # num_blocks is decided by the worker once it knows the memory left (0 = not yet).
        cache = CacheConfig(block_size=self.block_size,
                            num_blocks=self.num_gpu_blocks_override or 0,
                            enable_prefix_caching=prefix_caching(self.enable_prefix_caching,
                                                                 model.architecture),
                            gpu_memory_utilization=self.gpu_memory_utilization)
        policy = KernelPolicy.from_args(self.batch_invariant)
        check_kernel_policy(policy, device, model, self.attention_backend,
                            compilation.compile_layers)
        return EngineConfig(model=model, cache=cache, scheduler=scheduler, compilation=compilation,
                            device=str(device), attention_backend=self.attention_backend,
                            kernel_policy=policy, speculative=speculative, seed=self.seed, max_logprobs=self.max_logprobs,
                            log_stats=not self.disable_log_stats)


SPECULATIVE_KEYS = {"model", "num_speculative_tokens"}
# vLLM's optional keys we take: the method (else the drafter's config names it) and the
# drafter's tensor-parallel size, which can only be 1 here
SPECULATIVE_OPTIONAL = {"method", "draft_tensor_parallel_size"}


def speculative_config(value: dict | str | None, target: ModelConfig) -> SpeculativeConfig | None:
    """`speculative_config` checked against the target: every problem a ValueError naming
    it, at start (an unknown key or method, k < 1, a drafter that does not fit the target's
    hidden size, vocabulary or layers, a target kind speculation does not run on yet)."""
    if value is None:
        return None
    value = _json_dict(value, "speculative_config")
    from fullgraph.models.eagle import DRAFTERS, drafter_class, method_of_config
    # the method first (unsupported: ValueError), since another method's keys are not ours
    if "method" in value:
        drafter_class(str(value["method"]))
    unknown = set(value) - SPECULATIVE_KEYS - SPECULATIVE_OPTIONAL
    missing = SPECULATIVE_KEYS - set(value)
    if unknown or missing:
        raise ValueError(f"speculative_config takes the keys {sorted(SPECULATIVE_KEYS)} and "
                         f"optionally {sorted(SPECULATIVE_OPTIONAL)}: "
                         + (f"unknown {sorted(unknown)}" if unknown else f"missing {sorted(missing)}"))
    tp = value.get("draft_tensor_parallel_size", 1)
    if tp != 1:
        raise ValueError(f"draft_tensor_parallel_size must be 1 (fullgraph runs on one GPU), "
                         f"got {tp!r}")
    k = value["num_speculative_tokens"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {k!r}")
    path = resolve_model_dir(str(value["model"]), "speculative model")
    from transformers import AutoConfig
    try:
        hf = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises several types for bad configs
        raise ValueError(f"cannot read the drafter's config.json in {path}: {e}") from e
    method = str(value["method"]) if "method" in value else method_of_config(hf)
    if method is None:
        raise ValueError(f"speculative_config has no method and the drafter's config in {path} "
                         f"does not name one (architectures {list(hf.architectures or [])}): "
                         f"set \"method\" to one of {', '.join(map(repr, DRAFTERS))}")
    cls = drafter_class(method)
    _check_drafter_method(method, hf, path)
    cls.check_config(hf)
    with torch.device("meta"):                 # shapes only: check it against the target
        cls(hf, max_position=target.max_model_len).check_target(target.hf_config)
    _check_drafter_tokenizer(path, target.tokenizer)
    return SpeculativeConfig(method, path, k, hf)


_EAGLE_NAMES = {"eagle3": "EAGLE-3", "eagle": "EAGLE-1"}


def _check_drafter_method(method: str, hf, path: str) -> None:
    """A checkpoint of the other EAGLE kind is named before its weights load (where its
    config's architectures tell), rather than as a tensor shape that does not fit."""
    from fullgraph.models.eagle import method_of_config
    named = method_of_config(hf)
    if named is not None and named != method:
        raise ValueError(f"the drafter in {path} is an {_EAGLE_NAMES[named]} checkpoint "
                         f"(architectures {list(hf.architectures)}) but method is {method!r} "
                         f"({_EAGLE_NAMES.get(method, method)}): set \"method\": \"{named}\"")


def _check_drafter_tokenizer(drafter: str, target: str) -> None:
    """A drafter that ships a tokenizer must share the target's vocabulary: its token ids are
    the target's (most published drafters ship none and use the target's)."""
    if not any(os.path.exists(os.path.join(drafter, f))
               for f in ("tokenizer.json", "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer
    try:
        ours, theirs = (AutoTokenizer.from_pretrained(d, local_files_only=True).get_vocab()
                        for d in (drafter, target))
    except Exception as e:  # transformers raises several types for bad tokenizer files
        raise ValueError(f"cannot read the drafter's tokenizer in {drafter}: {e}") from e
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise ValueError(f"the drafter's tokenizer in {drafter} does not match the target's "
                         f"({len(ours)} vs {len(theirs)} tokens; e.g. {differ})")


def check_kernel_policy(policy: KernelPolicy, device: torch.device, model: ModelConfig,
                        attention_backend: str, compile_layers: bool = False) -> None:
    """The batch-invariant mode's ValueErrors, at configuration time: every part that
    cannot keep the mode is named before anything loads (docs/batch_invariance.md,
    section 8)."""
    if not policy.batch_invariant:
        return
    devices = get_model_class(model.architecture).capabilities.batch_invariant
    policy.require(f"model architecture {model.architecture} on {device.type}",
                   device.type in devices)
    get_backend_class(attention_backend, policy)      # a backend without it: ValueError
    # inductor would generate its own kernels (and reductions) for the layers' torch ops
    policy.require("--compile-layers", not compile_layers)


def prefix_caching(asked: bool | None, architecture: str) -> bool:
    if asked is False:
        return False
    if get_model_class(architecture).capabilities.prefix_caching:
        return True
    # the one kind of model without it (models/interface.py, ModelCapabilities)
    reason = ("it keeps a recurrent state per request, which a prefix-cache hit would skip "
              "computing")
    if asked:
        raise ValueError(f"prefix caching is not supported for {architecture}: {reason}; run "
                         f"without enable_prefix_caching (--no-enable-prefix-caching)")
    logger.info("prefix caching is off for %s: %s", architecture, reason)
    return False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def capture_sizes(user: list[int] | None, max_size: int | None,
                  scheduler: SchedulerConfig) -> list[int]:
    """Graph sizes in tokens, ascending. Default: 1, 2, 4, 8..248 by 8, 256.. by 16."""
    limit = min(max_size or 512, scheduler.max_num_batched_tokens)
    if user:
        if any(s < 1 for s in user):
            raise ValueError(f"cudagraph_capture_sizes must be positive, got {user}")
        return sorted({s for s in user if s <= scheduler.max_num_batched_tokens})
    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, limit + 1, 16))
    return sorted({s for s in sizes if s <= limit})


def lazy_capture_sizes(user: list[int] | None, max_size: int | None,
                       scheduler: SchedulerConfig) -> list[int]:
    """Mixed-step graph sizes above the default captured ones (512 tokens) up to the token
    budget, captured on first use: by 256 to 4096, by 512 above, and the budget itself
    (padding under 12.5% of a step); none when the capture sizes were set explicitly."""
    budget = scheduler.max_num_batched_tokens
    if user or max_size is not None or budget <= 512:
        return []
    sizes = list(range(768, min(budget, 4096) + 1, 256)) + list(range(4608, budget + 1, 512))
    return sorted({s for s in sizes if s <= budget} | {budget})


def create_model_config(model: str, dtype: str, max_model_len: int | None,
                        device: torch.device, served_name: str | None = None,
                        tokenizer: str | None = None, chat_template: str | None = None,
                        generation_config: str = "auto") -> ModelConfig:
    path = resolve_model_dir(model)
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise ValueError(f"model directory {path} has no config.json")
    try:
        with open(config_file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed config.json in {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"malformed config.json in {path}: not a JSON object")
    archs = raw.get("architectures") or []
    if not archs:
        raise ValueError(f"config.json in {path} names no architectures")
    model_cls = get_model_class(archs[0])   # unknown -> ValueError naming the supported ones
    from transformers import AutoConfig
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises several types for bad configs
        raise ValueError(f"cannot read config.json in {path}: {e}") from e
    if hasattr(model_cls, "check_config"):
        model_cls.check_config(hf_config, raw)   # fields it cannot run with, named now

    torch_dtype = _resolve_dtype(dtype, raw, device)
    # a multimodal model's text fields live in its text_config
    text_config = hf_config.get_text_config()
    max_pos = getattr(text_config, "max_position_embeddings", None) or 4096
    if max_model_len is None:
        max_model_len = max_pos
    elif (not isinstance(max_model_len, int) or isinstance(max_model_len, bool)
          or max_model_len < 2 or max_model_len > max_pos):
        raise ValueError(f"max_model_len must be in [2, {max_pos}] (the model's "
                         f"max_position_embeddings), an integer, got {max_model_len!r}")
    return ModelConfig(path=path, name=served_name or model, hf_config=hf_config,
                       architecture=archs[0], dtype=torch_dtype, max_model_len=max_model_len,
                       vocab_size=text_config.vocab_size, eos_token_ids=_eos_ids(path, raw),
                       tokenizer=resolve_model_dir(tokenizer, "tokenizer") if tokenizer else path,
                       chat_template=_read_chat_template(chat_template),
                       sampling_defaults=_sampling_defaults(generation_config, path))


MM_PROCESSOR_KWARGS = ("min_pixels", "max_pixels")


def _json_dict(value: dict | str | None, name: str) -> dict:
    """A dict argument given as a dict or its JSON (the CLI's form), ValueError naming it
    otherwise; {} for None."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}")
    return value


def multimodal_options(limit_mm_per_prompt: dict | str | None,
                       mm_processor_kwargs: dict | str | None) -> dict[str, Any]:
    """ModelConfig's `max_images_per_prompt` and `mm_processor_kwargs` from vLLM's two
    arguments, each problem a ValueError naming it (a text-only model ignores both, as in
    vLLM)."""
    limits = _json_dict(limit_mm_per_prompt, "limit_mm_per_prompt")
    for modality, n in limits.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"limit_mm_per_prompt[{modality!r}] must be an integer >= 0, "
                             f"got {n!r}")
        if modality != "image" and n:
            raise ValueError(f"limit_mm_per_prompt[{modality!r}] = {n}: fullgraph's models "
                             f"take images only (other modalities: 0)")
    kwargs = _json_dict(mm_processor_kwargs, "mm_processor_kwargs")
    unknown = sorted(set(kwargs) - set(MM_PROCESSOR_KWARGS))
    if unknown:
        raise ValueError(f"mm_processor_kwargs takes {', '.join(MM_PROCESSOR_KWARGS)}; "
                         f"unknown {unknown}")
    for name, v in kwargs.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"mm_processor_kwargs[{name!r}] must be an integer >= 1, got {v!r}")
    return {"max_images_per_prompt": limits.get("image"),
            "mm_processor_kwargs": tuple(sorted(kwargs.items()))}


def _read_chat_template(template: str | None) -> str | None:
    """`--chat-template`: a file's contents, or the template itself (as vLLM takes it)."""
    if template is None:
        return None
    if os.path.isfile(template):
        with open(template) as f:
            return f.read()
    if "{{" in template or "{%" in template:
        return template
    raise ValueError(f"chat_template {template!r} is neither a file nor a Jinja template")


# generation_config.json key -> SamplingParams field (vLLM reads the same ones)
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                        "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                        "max_new_tokens": "max_tokens"}


def _sampling_defaults(source: str, model_path: str) -> tuple[tuple[str, object], ...]:
    """The model creator's recommended sampling parameters (`--generation-config`), as
    (SamplingParams field, value) pairs; fields SamplingParams lacks are left out."""
    if source in ("none", "vllm"):
        return ()
    folder = model_path if source == "auto" else source
    file = os.path.join(folder, "generation_config.json")
    if source != "auto" and not os.path.isfile(file):
        raise ValueError(f"generation_config {source!r} is not a directory holding a "
                         f"generation_config.json")
    if not os.path.isfile(file):
        return ()
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed {file}: {e}") from e
    fields_ = SamplingParams.field_names()
    return tuple((ours, raw[theirs]) for theirs, ours in _GENERATION_DEFAULTS.items()
                 if ours in fields_ and raw.get(theirs) is not None)


def _resolve_dtype(dtype: str, raw: dict, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        text = raw.get("text_config") or {}
        name = str(raw.get("torch_dtype") or raw.get("dtype") or text.get("torch_dtype")
                   or text.get("dtype") or "float32")
        resolved = _DTYPES.get(name.replace("torch.", ""), torch.float32)
        # Half precision matmuls are slow on most CPUs: auto means float32 there.
        return torch.float32 if device.type == "cpu" else resolved
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return _DTYPES[dtype]


def _eos_ids(path: str, raw: dict) -> tuple[int, ...]:
    ids: list[int] = []
    gen_file = os.path.join(path, "generation_config.json")
    sources = [raw.get("eos_token_id"), (raw.get("text_config") or {}).get("eos_token_id")]
    if os.path.exists(gen_file):
        try:
            with open(gen_file) as f:
                sources.insert(0, json.load(f).get("eos_token_id"))
        except (json.JSONDecodeError, AttributeError):
            pass
    for src in sources:
        for i in (src if isinstance(src, list) else [src]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)
