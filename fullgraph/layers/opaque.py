"""Our kernels as ops that torch.compile treats as opaque, called directly everywhere else.

`--compile-layers` traces the decoder layers with dynamo, dynamic in the row count; our
kernels pick their launch from the row count at run time, so under tracing they must be
custom ops (torch.library) that the traced graph calls as they are. Outside tracing (eager
steps, warmups, CUDA graph captures) the same function runs without the dispatcher, whose
schema checks cost ~10-20 µs of host time a call (docs/benchmarks.md, twenty-first session).
An eager decode step makes ~5 such calls a layer.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch


def opaque_op(name: str, mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator: `fn` registered as the custom op `name` (its `.op`, whose `register_fake`
    the returned function forwards); calls go to the op only while torch.compile traces."""
    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(name, mutates_args=tuple(mutates_args))(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            return fn(*args, **kwargs)
        call.op = op
        call.register_fake = op.register_fake
        return call
    return wrap
