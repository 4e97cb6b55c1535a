"""Direct Triton launches (layers/launch.py): a variant's key must select one compiled kernel,
so it must refine Triton's own specialization of every argument; on the GPU a direct launch
computes what the JIT's launch computes, aligned or not."""
from __future__ import annotations

import pytest
import torch

from fullgraph.layers import launch
from fullgraph.layers.launch import bind

triton = pytest.importorskip("triton")

_TENSORS = [torch.zeros(64, dtype=dtype)[offset:]
            for dtype in (torch.bfloat16, torch.float32, torch.int64, torch.int32)
            for offset in (0, 1, 2, 4, 8)]
_SCALARS = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16,
            -2**31, -2**31 - 1, -2**31 - 16, 2**63 - 16, 2**63 - 1, 2**63, 2**64 - 16, 2**64 - 1,
            0.0, -0.0, 1.5, 1e300, True, False, None]


def _triton_specialization(a):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    return native_specialize_impl(BaseBackend, a, False, True, True)


def test_a_variant_key_refines_tritons_specialization():
    """Arguments with one key have one specialization (Triton's native specializer, with
    specialization and alignment on: the finest it makes)."""
    by_key: dict = {}
    for a in _TENSORS + _SCALARS:
        (key,), _ = bind((a,))
        by_key.setdefault(key, set()).add(_triton_specialization(a))
    mixed = {key: specs for key, specs in by_key.items() if len(specs) > 1}
    assert not mixed
    # and it tells apart what Triton tells apart
    assert len(by_key) >= len({_triton_specialization(a) for a in _TENSORS + _SCALARS})


def test_bind_passes_addresses_and_leaves_other_types_to_the_jit():
    t = torch.arange(8, dtype=torch.float32)[3:]
    key, values = bind((t, 7, 0.5, None))
    assert values == [t.data_ptr(), 7, 0.5, None] and len(key) == 4
    assert bind((t, (1, 2))) is None
    assert bind((torch.float32,)) is None


@pytest.mark.gpu
def test_direct_launches_compute_what_the_jit_computes():
    """The GEMV with its RMSNorm prologue launched through the JIT, then directly (the same
    variant), then on inputs at an address 2 bytes off 16-byte alignment, which Triton
    specializes differently: a direct launch that reused the aligned variant would load
    misaligned vectors."""
    from fullgraph.layers import gemv as g
    launcher = g._gemv_launcher
    assert launcher.direct
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    w = torch.randn(512, 1024, device=dev, dtype=dt) / 32
    norm_w = torch.rand(1024, device=dev, dtype=dt) + 0.5
    storage = torch.randn(2, 1024 + 8, device=dev, dtype=dt)
    aligned = (storage[0:1, :1024], storage[1:2, :1024])
    unaligned = (storage[0:1, 1:1025], storage[1:2, 1:1025])

    def run(x, r):
        h = torch.empty_like(x)
        y = g.gemv(x, w, prologue=g.RMS_NORM, residual=r, norm_weight=norm_w, eps=1e-6,
                   residual_out=h)
        return y, h

    def reference(x, r):
        h = x.float() + r.float()
        normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt) * norm_w
        return normed.float() @ w.float().T, h

    launcher.clear()
    through_jit = run(*aligned)
    assert len(launcher._variants) == 1
    (variant,) = launcher._variants.values()
    assert variant is not None                     # kept for direct launches
    direct = run(*aligned)
    assert all(torch.equal(a, b) for a, b in zip(through_jit, direct))
    y, h = run(*unaligned)
    assert len(launcher._variants) == 2            # a second variant for the unaligned input
    y_direct, h_direct = run(*unaligned)
    ref_y, ref_h = reference(*unaligned)
    for out, out_direct in ((y, y_direct), (h, h_direct)):
        assert torch.equal(out, out_direct)
    torch.testing.assert_close(h.float(), ref_h, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(y.float(), ref_y, atol=5e-2, rtol=5e-2)


def test_a_variant_is_launched_directly_only_where_its_key_holds_every_choice():
    """The compiled kernel's launcher takes every argument in signature order: the
    positional runtime ones, then the constexprs from the keywords or their defaults. A
    constexpr passed by position (the key holds its type, not its value), a runtime argument
    by keyword, or scratch memory sends every launch of the variant through the JIT."""
    import triton.language as tl

    from fullgraph.layers.launch import Launcher

    @triton.jit
    def kernel(x_ptr, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = 3):
        pass

    class Run:
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid, launch_pdl = 0, 1

        def launch(self, *args):
            pass

    class Compiled:
        run, function, packed_metadata = Run(), 7, (4, 1, 0)

    launcher = Launcher(kernel)
    variant = launcher._variant(Compiled(), 3, {"BLOCK": 64, "num_warps": 4})
    assert variant.tail == (64, 3) and variant.function == 7 and variant.pdl == 1
    assert launcher._variant(Compiled(), 4, {"num_warps": 4}) is None      # BLOCK by position
    assert launcher._variant(Compiled(), 2, {"scale": 1.0, "BLOCK": 64}) is None
    Compiled.run.global_scratch_size = 64
    assert launcher._variant(Compiled(), 3, {"BLOCK": 64}) is None


def test_grid_arithmetic_matches_tritons():
    from fullgraph.layers.launch import cdiv, next_power_of_2
    for a in list(range(0, 300)) + [4095, 4096, 4097, 151936, 2**31 + 5]:
        for b in (1, 2, 3, 16, 128, 1024):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
        if a:
            assert next_power_of_2(a) == triton.next_power_of_2(a), a


def test_launch_hooks_sees_a_hook_added_to_either_chain():
    """A profiler's launch hook sends every launch through Triton's JIT (it reads launch
    metadata there): `launch_hooks` must see one on the enter or the exit chain."""
    runtime = triton.knobs.runtime
    assert not launch.launch_hooks()
    for chain in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        def hook(*args):
            return None
        chain.add(hook)
        try:
            assert launch.launch_hooks()
        finally:
            chain.remove(hook)
        assert not launch.launch_hooks()
