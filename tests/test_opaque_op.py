"""layers/opaque.py: a kernel wrapper is a custom op under torch.compile (opaque to the
traced graph) and a direct call otherwise (no dispatcher on the eager path)."""
from __future__ import annotations

import torch

from fullgraph.layers.opaque import opaque_op


@opaque_op("fullgraph_test::scale")
def scale(x: torch.Tensor, k: float) -> torch.Tensor:
    return x * k


@scale.register_fake
def _(x, k):
    return torch.empty_like(x)


def test_eager_calls_the_function_and_compiled_code_the_op():
    # the op's CPU kernel replaced by one that differs: which one ran shows in the result
    scale.op.register_kernel("cpu")(lambda x, k: x * k + 100)
    x = torch.ones(3)
    assert torch.equal(scale(x, 2.0), torch.full((3,), 2.0))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: scale(t, 2.0) + 0.0, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), torch.full((3,), 102.0))
    assert scale.__name__ == "scale" and scale.op is not scale


def test_a_dispatch_mode_sees_one_op():
    """The CPU graph emulator records ops through a dispatch mode; it must get the op, not
    the ops inside it (a replay would freeze their data-dependent control flow)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))
    x = torch.ones(3)
    with Names() as mode:
        scale(x, 2.0)
    assert mode.seen == ["fullgraph_test.scale.default"], mode.seen
