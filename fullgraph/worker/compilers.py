"""Process-wide settings of the compilers behind our kernels (dynamo/inductor and Triton),
made once when a CUDA model runner starts: configuration, not step state."""
from __future__ import annotations

import os


def configure_compilers() -> None:
    # Compiled kernels are specialized per padded shape bucket (dynamic=False): allow one
    # compiled variant per bucket instead of dynamo's default of 8.
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 4096))
    pin_triton_cache_dir()


def pin_triton_cache_dir() -> None:
    """Fix TRITON_CACHE_DIR (where unset) to Triton's default for the whole process.

    Inductor points TRITON_CACHE_DIR at its own directory when it first builds a kernel,
    unless it is set. Our kernels compiled before that were stored in Triton's default
    directory and those compiled after it in inductor's; on the next start inductor's cache
    hit skipped that step, so most of our kernels were looked up in the other directory and
    compiled again: capture took 11-16 s on a second start and 7-9 s only from the third
    (H100, docs/benchmarks.md, sixth session)."""
    if "TRITON_CACHE_DIR" in os.environ:
        return
    try:
        import triton
        directory = triton.knobs.cache.dir
    except (ImportError, AttributeError):    # no Triton, or one without knobs (< 3.4)
        return
    os.environ["TRITON_CACHE_DIR"] = directory
