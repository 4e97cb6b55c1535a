"""Our kernels as ops that torch.compile treats as opaque, called directly everywhere else.

`--compile-layers` traces the decoder layers with dynamo, dynamic in the row count; our
kernels pick their launch from the row count at run time, so under tracing they must be
custom ops (torch.library) that the traced graph calls as they are. A dispatch mode that
records ops (the CPU graph emulator, worker/cudagraph/fake.py) must see them as one op too:
on the CPU some run data-dependent torch code (the MoE reference) that a replay of its
inner ops would freeze. Elsewhere (eager steps, warmups, CUDA graph captures) the same
function runs without the dispatcher, whose per-call checks are host time an eager decode
step pays ~5 times a layer (measured in docs/benchmarks.md, twenty-first session).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def opaque_op(name: str, mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator: `fn` registered as the custom op `name` (its `.op`, whose `register_fake`
    the returned function forwards); calls go to the op only while torch.compile traces or a
    dispatch mode is on."""
    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(name, mutates_args=tuple(mutates_args))(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
                return op(*args, **kwargs)
            return fn(*args, **kwargs)
        call.op = op
        call.register_fake = op.register_fake
        return call
    return wrap
