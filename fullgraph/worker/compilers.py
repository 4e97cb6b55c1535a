"""Process-wide settings of the compilers behind our kernels (dynamo/inductor and Triton),
made once when a CUDA model runner starts: configuration, not step state."""
from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from fullgraph.worker.compile_worker import CompileWorkers


def configure_compilers() -> None:
    # Compiled kernels are specialized per padded shape bucket (dynamic=False): allow one
    # compiled variant per bucket instead of dynamo's default of 8.
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 4096))
    pin_triton_cache_dir()
    pin_triton_ptxas()


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


def pin_triton_ptxas() -> None:
    """Set TRITON_PTXAS_PATH (where unset) to the ptxas inductor switches Triton to, before
    anything compiles.

    Inductor sets the variable (to torch's own ptxas) when it first compiles. Triton keys its
    cache on the ptxas version it saw first in the process (cached) but compiles with the
    one set now, so our kernels' cache keys depended on whether inductor had compiled
    before them, and a compile worker (which reads the variable afresh) computed other
    keys than its parent: cold capture with compile-ahead then compiled everything twice
    (H100, docs/benchmarks.md, seventh session)."""
    if "TRITON_PTXAS_PATH" in os.environ:
        return
    try:
        from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path
    except ImportError:      # a torch without it: inductor does not switch ptxas either
        return
    _set_triton_ptxas_path()


class CompileAhead:
    """What `triton_compile_ahead` did so far: the launches it skipped, and the compiles it
    started (kernel and specialization, the worker's future)."""

    def __init__(self) -> None:
        self.launches_skipped = 0
        self.compiles: dict[str, tuple[Any, str, Future]] = {}


class _NotCached(Exception):
    pass


_probing: ContextVar[bool] = ContextVar("fullgraph_cache_probe", default=False)


def _triton_knobs():
    """Triton's knobs, where it has the hooks compile-ahead needs (3.4+); else None."""
    try:
        import triton
        triton.knobs.runtime.jit_cache_hook    # noqa: B018 — the hook must exist
        return triton.knobs
    except (ImportError, AttributeError):
        return None


def start_compile_workers(num_workers: int | None = None) -> CompileWorkers | None:
    """Worker processes for `triton_compile_ahead` (None where it cannot use them). Start
    them well before capture: each imports torch and Triton for ~5 s (H100 host)."""
    if _triton_knobs() is None:
        return None
    return CompileWorkers(num_workers or max(1, min(8, (os.cpu_count() or 2) - 1)))


@contextmanager
def triton_compile_ahead(workers: CompileWorkers | None) -> Iterator[CompileAhead | None]:
    """Inside, a Triton kernel launch whose kernel is neither in memory nor in Triton's cache
    is *skipped*, and the kernel compiled by `workers`. The exit waits for every compile
    (raising the first error), then loads each kernel and its GPU module, as its first launch
    would have. Kernels in the cache load as usual, so a warm start pays nothing.

    Cold capture compiled ~26 kernel variants one after another inside the warmups: 14 of
    its 21 s on an H100 (docs/benchmarks.md, seventh session). Run the warmups in here and
    the variants compile side by side. A warmup that skipped a launch computed garbage, which
    a warmup may: it runs for the compiles and one-time setup, and after the exit nothing is
    left to set up, as long as garbage cannot fault: a kernel whose output later code uses
    as indices must write into memory that holds valid ones already (layers/argmax.py).
    Without workers, or a Triton without the hooks this needs, this yields None and changes
    nothing. Not for kernels under `triton.autotune`: it would time skipped launches and
    keep a meaningless best config (ours have fixed configs)."""
    knobs = _triton_knobs()
    if workers is None or knobs is None:
        yield None
        return
    from triton.runtime.cache import FileCacheManager
    runtime, cache = knobs.runtime, knobs.cache

    class ProbingCacheManager(cache.manager_class or FileCacheManager):
        """Raises `_NotCached` on a miss while probing, before anything is compiled."""

        def get_group(self, filename):
            group = super().get_group(filename)
            if _probing.get() and (group is None or filename not in group):
                raise _NotCached
            return group

    state = CompileAhead()

    def in_cache(kernel, specialization: str) -> bool:
        """Loads the kernel if Triton's cache has it."""
        token = _probing.set(True)
        try:
            kernel.preload(specialization)
            return True
        except _NotCached:
            return False
        finally:
            _probing.reset(token)

    def hook(*, key, fn, compile, is_manual_warmup, **_) -> bool:
        """True: skip this launch (Triton's `jit_cache_hook` contract)."""
        if is_manual_warmup:          # our own probe's preload
            return False
        kernel, spec = fn.jit_function, compile["specialization_data"]
        token = f"{fn.module}.{fn.name}:{key}"
        if token not in state.compiles:
            importable = getattr(importlib.import_module(fn.module), fn.name, None) is kernel
            if not importable or in_cache(kernel, spec):
                return False          # compile here (a worker could not import it) / load
            state.compiles[token] = (kernel, spec, workers.submit(fn.module, fn.name, spec))
        state.launches_skipped += 1
        return True

    saved_hook, saved_class = runtime.jit_cache_hook, vars(cache).get("manager_class")
    runtime.jit_cache_hook, cache.manager_class = hook, ProbingCacheManager
    try:
        yield state
        for _, _, future in state.compiles.values():
            future.result()
    finally:
        runtime.jit_cache_hook = saved_hook
        if saved_class is None:
            del cache.manager_class           # back to TRITON_CACHE_MANAGER or the default
        else:
            cache.manager_class = saved_class
    for kernel, spec, _ in state.compiles.values():
        compiled = kernel.preload(spec)       # from the cache the worker filled
        # The GPU module too, as a first launch would (CompiledKernel's lazy loader; a
        # Triton without it loads at the first launch).
        getattr(compiled, "_init_handles", lambda: None)()
