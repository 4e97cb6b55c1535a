"""The batch-invariant mode's GDN kernel (layers/gdn/fused_aligned.py) against aligned.py's
torch path, run as a script under Triton's CPU interpreter (tests/triton_interpret.py, by
tests/test_gdn_aligned_interpret.py): one lane prefilled whole, cut anywhere and decoded
token by token (outputs and committed state close to the torch path's, and, the kernel's
point, equal to its own whole-prompt bits), a step of three lanes with tails, a fresh lane
on a slot holding NaN and a padding lane, and the gated output norm's row kernel against
gating.py's formula. Prints "FAILURES n"."""
from __future__ import annotations

import itertools

import torch

import test_batch_invariant as bi
from fullgraph.layers.gdn import fused_aligned
from fullgraph.layers.gdn.aligned import TAIL_INPUTS, aligned_chunk_gated_delta_rule
from fullgraph.layers.gdn.gating import rms_norm_gated
from fullgraph.layers.gdn.state import slot_groups
from fullgraph.layers.policy import KernelPolicy


def with_kernel(on: bool) -> None:
    """aligned.py takes the kernel where `supported` says so: the CPU tensors here too."""
    fused_aligned.supported = (lambda q, dk, dv: True) if on else (lambda q, dk, dv: False)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def one_lane() -> dict[str, bool]:
    x = bi.gdn_inputs(150)
    with_kernel(False)
    want = bi.gdn_steps(x, [])
    with_kernel(True)
    whole = bi.gdn_steps(x, [])
    checks = {"whole prompt vs torch": close(whole[0], want[0]) and close(whole[1], want[1])}
    # the last: decode steps across the chunk boundary at 128, then the rest as one chunk
    for cuts in ([37], [1, 2, 100], list(range(124, 133))):
        out, state = bi.gdn_steps(x, cuts)
        checks[f"cuts {cuts[:3]}: the whole prompt's bits"] = (
            torch.equal(out, whole[0]) and torch.equal(state, whole[1]))
    return checks


def three_lanes(speculative: bool = False) -> dict[str, bool]:
    """Lanes: 5 new rows after a 20-row tail, 70 new rows after 63 (two boundaries), a fresh
    lane of 9 rows on a slot holding NaN; then a padding lane on the null slot. With
    `speculative`, slot groups of 4 (state.py's `write_slots`): 3 rows after a 62-row tail
    (its second row crosses the boundary) instead of the 70."""
    gen = torch.Generator().manual_seed(1)
    lens, starts = [5, 3 if speculative else 70, 9, 0], [20 + 64, 62 if speculative else 63, 0, 0]
    t, hk, hv, d = sum(lens) + 3, 2, 4, 16
    q, k = torch.randn(t, hk, d, generator=gen), torch.randn(t, hk, d, generator=gen)
    v = torch.randn(t, hv, d, generator=gen)
    g, beta = -torch.rand(t, hv, generator=gen) * 0.5, torch.rand(t, hv, generator=gen)
    m = 4 if speculative else 1
    slots = torch.tensor([1 + 2 * m, 1 + 3 * m, 1 + m, 0])
    num_slots = 1 + 4 * m
    state = torch.randn(num_slots, hv, d, d, generator=gen) * 0.1
    state[1 + m] = float("nan")
    shapes = {"q": (hk, d), "k": (hk, d), "v": (hv, d), "g": (hv,), "beta": (hv,)}
    tails = [torch.randn(num_slots, 63, *shapes[name], generator=gen) for name in TAIL_INPUTS]
    tails[3] = -tails[3].abs() * 0.25                 # g: log-decays, <= 0
    tails[4] = tails[4].sigmoid()                     # beta: in (0, 1)
    qsl = torch.tensor([0, *itertools.accumulate(lens)])
    groups = slot_groups(slots, m) if speculative else None
    seq_lens = torch.tensor([s + n for s, n in zip(starts, lens)])
    init = torch.tensor([True, True, False, False])
    policy = KernelPolicy(batch_invariant=True)
    results = []
    for on in (False, True):
        with_kernel(on)
        pools = (state.clone(), [p.clone() for p in tails])
        out = aligned_chunk_gated_delta_rule(q, k, v, g, beta, pools[0], pools[1], slots, qsl,
                                             seq_lens, init, policy, write_slots=groups)
        results.append((out, pools))
    (want, (ws, wt)), (got, (gs, gt)) = results
    rows = int(qsl[3])
    used = (groups[:3] if speculative else slots[:3]).reshape(-1)
    name = "speculative lanes" if speculative else "three lanes"
    return {f"{name}: outputs": close(got[:rows], want[:rows]) and not got[:rows].isnan().any(),
            f"{name}: states": close(gs[used], ws[used]),
            f"{name}: tails": all(torch.equal(a[used], b[used]) for a, b in zip(gt, wt))}


def gated_norm(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, bool]:
    """The row kernel against gating.py's torch formula (a strided gate, as the layer's
    projection gives it). The interpreter's bfloat16 casts are not the GPU's, so the CPU
    suite checks float32 and the GPU tests bfloat16."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 4, 32, generator=gen).to(device, dtype)
    gate = torch.randn(7, 200, generator=gen).to(device, dtype)[:, 10:138].view(7, 4, 32)
    w = (1 + 0.1 * torch.randn(32, generator=gen)).to(device, dtype)
    want = rms_norm_gated(x, gate, w, 1e-6)
    got = fused_aligned.gated_norm_rows(x, gate, w, 1e-6)
    tol = dict(rtol=2 ** -7, atol=1e-3) if dtype == torch.bfloat16 else {}   # one rounding
    return {f"gated norm, {dtype}": torch.allclose(got.float(), want.float(), **tol)}


if __name__ == "__main__":
    calls, rule = [], fused_aligned.aligned_rule
    fused_aligned.aligned_rule = lambda *args: (calls.append(1), rule(*args))[1]
    checks = {**one_lane(), **three_lanes(), **three_lanes(speculative=True), **gated_norm()}
    checks["the kernel ran"] = len(calls) > 0
    for name, ok in checks.items():
        print(f"{name}: {'ok' if ok else 'FAILED'}")
    print("FAILURES", sum(not ok for ok in checks.values()))
