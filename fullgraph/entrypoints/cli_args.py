"""Engine flags for every subcommand, named like vLLM's (--max-num-seqs, --enforce-eager, ...)."""
from __future__ import annotations

import argparse

from fullgraph.engine.args import EngineArgs
from fullgraph.entrypoints.vllm_args import VLLM_ARGS, check_vllm_args


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a list of integers, got {text!r}") from None


_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_readable_int(text: str) -> int:
    """A token count as vLLM's CLI takes it: a plain integer, or a number with a suffix,
    lower case decimal (1k = 1,000, 25.6k = 25,600) and upper case binary (1K = 1,024, whole
    numbers only)."""
    value = text.strip()
    number, suffix = value[:-1], value[-1:]
    try:
        if suffix in _DECIMAL:
            return int(float(number) * _DECIMAL[suffix])
        if suffix in _BINARY:
            return int(number) * _BINARY[suffix]
        return int(value)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"expected an integer such as 4096, 32k (32,000) or 32K (32,768), got {text!r}"
            + (f"; a binary suffix takes a whole number (did you mean {number}"
               f"{suffix.lower()}?)" if suffix in _BINARY and "." in number else "")) from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineArgs()
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=d.model,
                   help="a Hugging Face-format directory, a model id in the local Hugging Face "
                        "cache, or a built-in preset with random weights: tiny-qwen3, "
                        "tiny-qwen3.5, tiny-qwen3-vl (CPU-sized), qwen3-0.6b-random and the "
                        "other *-random ones of the README (GPU benchmarks)")
    g.add_argument("--tokenizer", default=None,
                   help="the tokenizer's directory or model id (default: the model's)")
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, or a file holding one (default: the "
                        "tokenizer's)")
    g.add_argument("--generation-config", default=d.generation_config,
                   help="default sampling parameters: 'auto' from the model's "
                        "generation_config.json, 'none' (or 'vllm') for fullgraph's own, or a "
                        "directory holding a generation_config.json")
    g.add_argument("--dtype", default=d.dtype,
                   choices=["auto", "float32", "float", "bfloat16", "float16", "half"])
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    g.add_argument("--max-model-len", type=human_readable_int, default=None,
                   help="the context length (prompt + output), e.g. 4096, 32k or 32K "
                        "(default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=d.enable_prefix_caching,
                   help="reuse the KV blocks of shared prefixes (default: on, off for models "
                        "with recurrent state)")
    g.add_argument("--attention-backend", default=d.attention_backend,
                   choices=["flex", "triton", "sdpa"],
                   help="triton: prompt chunks in one Triton kernel over the paged KV, the rest "
                        "as flex (CUDA); flex: FlexAttention for them; sdpa: the reference")
    g.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs")
    g.add_argument("--cudagraph-mode", default=d.cudagraph_mode,
                   choices=["none", "full", "full_decode_only", "piecewise"],
                   help="full: every step in one graph; piecewise: graphs around everything "
                        "but attention")
    g.add_argument("--cudagraph-capture-sizes", type=_int_list, nargs="+", default=None,
                   help="graph sizes, e.g. 1 2 4 8 16 (or 1,2,4,8,16)")
    g.add_argument("--max-cudagraph-capture-size", type=int, default=None)
    g.add_argument("--compile-layers", action=argparse.BooleanOptionalAction,
                   default=d.compile_layers,
                   help="torch.compile the decoder layers (CUDA); FlexAttention is compiled "
                        "either way")
    g.add_argument("--compile-ahead", action=argparse.BooleanOptionalAction,
                   default=d.compile_ahead,
                   help="compile the Triton kernels graph capture needs in parallel before "
                        "its warmups (CUDA)")
    g.add_argument("--encoder-cudagraph-token-budgets", type=_int_list, nargs="+",
                   default=None, help="vision encoder graph sizes in patch rows, e.g. 1024 "
                   "4096 (default: derived from the largest image the model takes)")
    g.add_argument("--encoder-cudagraph-max-images-per-batch", type=int,
                   default=d.encoder_cudagraph_max_images_per_batch,
                   help="the most images one encoder graph replay packs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next step while the device runs this one (default: on "
                        "for CUDA)")
    g.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="a request's tokens and logprobs are bitwise the same whatever else "
                        "is in the batch (default: FULLGRAPH_BATCH_INVARIANT, else off)")
    g.add_argument("--speculative-config", default=None,
                   help='speculative decoding, as JSON: {"method": "eagle3" or "eagle", '
                        '"model": DIR, "num_speculative_tokens": K}')
    g.add_argument("--limit-mm-per-prompt", default=None,
                   help='the most images a prompt may carry, as JSON: {"image": N} '
                        '(multimodal models; default: any number)')
    g.add_argument("--mm-processor-kwargs", default=None,
                   help='the image processor\'s pixel bounds over the model\'s '
                        'preprocessor_config.json, as JSON: {"min_pixels": .., '
                        '"max_pixels": ..}')
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                   help="the most top logprobs a request may ask for")
    _add_vllm_flags(p.add_argument_group(
        "vLLM flags with a single meaning here (accepted so vLLM command lines run)"))


def _add_vllm_flags(g) -> None:
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="1 only: an engine runs on one GPU")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="1 only")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="1 only: run one engine per GPU behind your own load balancer")
    g.add_argument("--quantization", "-q", default=None,
                   help="not supported: weights run in --dtype")
    g.add_argument("--kv-cache-dtype", default="auto", help="auto only: the model's dtype")
    g.add_argument("--enable-lora", action="store_true", help="not supported")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=None, help="always on: prompts are chunked to the token budget")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="no effect: only the built-in architectures run, no code is loaded "
                        "from a model directory")
    g.add_argument("--disable-log-requests", "--enable-log-requests", action="store_true",
                   dest="log_requests_flag", help="no effect: requests are not logged")


def check_vllm_flags(ns: argparse.Namespace) -> None:
    """ValueError naming a vLLM flag whose value fullgraph cannot honor (the others have the
    one meaning their help says)."""
    check_vllm_args({name: getattr(ns, name) for name in VLLM_ARGS if hasattr(ns, name)},
                    cli=True)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    check_vllm_flags(ns)
    values = {k: v for k, v in vars(ns).items() if k in EngineArgs.field_names()}
    for name in ("cudagraph_capture_sizes", "encoder_cudagraph_token_budgets"):
        if values.get(name):                       # nargs="+" of lists -> one flat list
            values[name] = [s for part in values[name] for s in part]
    return EngineArgs(**values)
