"""Launching our Triton kernels with less host time than `kernel[grid](...)`.

An eager decode step launches ~175 kernels, and through Triton's JIT each launch costs tens
of microseconds of host time for kernels with our 20-30 arguments (docs/benchmarks.md, issue
27): the JIT binds the arguments and computes their specialization, builds a cache key,
looks up the current device and stream and reads its knobs; then the compiled kernel's
launcher asks the driver about every pointer argument (`cuPointerGetAttribute`). Under CUDA
graphs none of this matters (a replay launches nothing from the host); eagerly it was half
of the step.

`Launcher(kernel)[grid](*args, **kwargs)` launches as the JIT does. The first launch of a
variant goes through the JIT, which compiles or loads it; later launches call the compiled
kernel's launcher directly. A variant's key refines Triton's specialization (so two
launches with one key always select the same compiled kernel): per positional argument its
type, for a tensor its dtype and whether its address is 16-byte aligned, for an int whether
it is 1, divisible by 16 and which of int32 / int64 / uint64 holds it; the keyword
arguments (constexprs and launch options) by value; the device. Pointers go to the launcher
as addresses, which skips the driver's per-pointer query: so a tensor must be on the current
CUDA device, which every call site here guarantees by launching where its inputs live.

Through the JIT always: under Triton's interpreter, on Triton minor versions other than the
one this was checked with, while a launch hook is set (profilers read launch metadata
there), for arguments of other types, constexprs passed by position, runtime arguments
passed by keyword, and kernels that need scratch memory. `cdiv` and `next_power_of_2` are the
grid arithmetic of the call sites, without Triton's host-side constexpr functions.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

try:
    import triton
    from triton.runtime.jit import JITFunction
except ImportError:            # CPU-only installs launch no Triton kernel
    triton = None

_INT32 = range(-2**31, 2**31)
_INT64 = range(-2**63, 2**63)
_ONE = "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), for grids on the host: `triton.cdiv` is a constexpr function in Triton
    3.6, whose host calls cost more than a launch's own arithmetic should (docs/benchmarks.md,
    twenty-fifth session)."""
    return -(a // -b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (`triton.next_power_of_2` on the host,
    without its cost; 2 for n = 0)."""
    return 1 << (n - 1).bit_length()


def direct_launch_checked() -> bool:
    """The compiled kernel's launcher takes Triton-internal arguments: called directly only on
    the Triton minor version this was checked with on the device (3.6), and not with
    `FULLGRAPH_DIRECT_LAUNCH=0` (A/B benchmarks; read when a launcher is made)."""
    return (triton is not None and os.environ.get("FULLGRAPH_DIRECT_LAUNCH", "1") != "0"
            and tuple(int(v) for v in triton.__version__.split(".")[:2]) == (3, 6))


def launch_hooks() -> bool:
    """Whether a launch hook is set (Triton 3.6 keeps them in always-present `HookChain`s;
    asked every launch, so no generator)."""
    runtime = triton.knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool((enter is not None and getattr(enter, "calls", True))
                or (exit_ is not None and getattr(exit_, "calls", True)))


def _int_key(a: int) -> tuple[bool, bool, bool]:
    """An int outside [0, 2**31): divisible by 16, and which of int32 / int64 holds it."""
    return a & 15 == 0, a in _INT32, a in _INT64


def bind(args: tuple) -> tuple[list, list] | None:
    """(key, values) of positional launch arguments: per argument what selects the compiled
    variant, a refinement of Triton's specialization, and what the launcher takes (a tensor's
    address). None: an argument of a type this launcher leaves to the JIT. The key's entries
    are of distinct types per case (bools only for the common ints, 0 <= a < 2**31 but 1:
    divisible by 16 or not; `_ONE` for 1, which Triton makes a constexpr), so no two cases
    compare equal."""
    key, values = [], []
    for a in args:
        kind = a.__class__
        if kind is int:
            if 0 <= a < 2147483648:
                key.append(a & 15 == 0 if a != 1 else _ONE)
            else:
                key.append(_int_key(a))
            values.append(a)
        elif isinstance(a, torch.Tensor):
            address = a.data_ptr()
            key.append(a.dtype if address & 15 == 0 else (a.dtype,))
            values.append(address)
        elif kind is float or kind is bool or a is None:
            key.append(kind)
            values.append(a)
        else:
            return None
    return key, values


class _Variant:
    """One compiled variant's launch: the compiled kernel's C launcher and what it takes
    besides the runtime arguments (`tail`: the constexprs after them, in signature order)."""
    __slots__ = ("launch", "function", "cooperative", "pdl", "metadata", "tail")

    def __init__(self, compiled, tail: tuple) -> None:
        launcher = compiled.run
        self.launch = launcher.launch
        self.function = compiled.function
        self.cooperative, self.pdl = launcher.launch_cooperative_grid, launcher.launch_pdl
        self.metadata = compiled.packed_metadata
        self.tail = tail


class Launcher:
    """A Triton kernel launched as `launcher[grid](*args, **kwargs)`, with the variants it
    has launched kept for direct launches (module docstring). The kernel stays its module's
    attribute under its own name: compile-ahead workers import it from there."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        jit = isinstance(kernel, JITFunction)       # not Triton's interpreter
        self.direct = jit and direct_launch_checked()
        self._variants: dict[tuple, _Variant | None] = {}   # None: through the JIT always
        if jit:
            params = kernel.params
            self._names = [p.name for p in params]
            self._constexpr = [p.is_constexpr for p in params]
            self._defaults = [p.default for p in params]

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        bound = bind(args) if self.direct and not launch_hooks() else None
        variant = None
        if bound is not None:
            device = torch._C._cuda_getDevice()   # torch.cuda.current_device, less checks
            key = (device, *kwargs.items(), *bound[0])
            if key not in self._variants:
                self._first_launch(key, grid, args, kwargs)
                return
            variant = self._variants[key]
        if variant is None:
            self.kernel[grid](*args, **kwargs)
            return
        stream = torch._C._cuda_getCurrentRawStream(device)   # as Triton's driver does
        variant.launch(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                       stream, variant.function, variant.cooperative, variant.pdl, None, None,
                       variant.metadata, None, None, None, *bound[1], *variant.tail)

    def clear(self) -> None:
        """Forget the variants (the next launch of each goes through the JIT again)."""
        self._variants.clear()

    def _first_launch(self, key: tuple, grid: tuple[int, ...], args: tuple,
                      kwargs: dict) -> None:
        """Through the JIT, which compiles or loads the variant (or, compiling ahead, skips
        the launch: then nothing is kept), and keep how to launch it directly."""
        compiled = self.kernel[grid](*args, **kwargs)
        if compiled is None or hasattr(compiled, "result"):
            return
        self._variants[key] = self._variant(compiled, len(args), kwargs)

    def _variant(self, compiled, positional: int, kwargs: dict) -> _Variant | None:
        """How to launch `compiled` directly, or None: through the JIT always (a constexpr
        passed by position, which the key holds by type only; a runtime argument by keyword
        or default; scratch memory the JIT allocates per launch)."""
        launcher = compiled.run
        if (not hasattr(launcher, "launch") or getattr(launcher, "global_scratch_size", 1)
                or getattr(launcher, "profile_scratch_size", 1)
                or any(self._constexpr[:positional])):
            return None
        tail = []
        for name, constexpr, default in zip(self._names[positional:],
                                            self._constexpr[positional:],
                                            self._defaults[positional:]):
            if not constexpr:
                return None
            tail.append(kwargs.get(name, default))
        return _Variant(compiled, tuple(tail))
