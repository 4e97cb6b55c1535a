"""The fused GDN decode and verify kernels (layers/gdn/fused_decode.py, fused_verify.py)
against the torch ops they replace, float32. Run as a script under Triton's CPU interpreter
(TRITON_INTERPRET=1, by tests/test_gdn_verify_interpret.py), it checks a decode step and
uniform speculative steps of 1, 3 and 4 rows a lane (groups of 4 slots) at small head dims
and prints "FAILURES n"; tests/test_gpu_hybrid_kernels.py runs `verify_case` on the GPU at
the real ones. Lane 1 starts fresh on a slot holding NaN; the last lane is padding on the
null slot. Also a batch-1 step's layout: the split rule, the GEMV's gated-norm and
output-gate prologues (layers/gemv.py) and in_proj with the conv in one kernel."""
from __future__ import annotations

import torch

from fullgraph.layers.gemv import GATED_NORM, SIGMOID_GATE, gemv
from fullgraph.layers.gdn import (causal_conv1d, causal_conv1d_decode, fused_decode,
                                  fused_verify, gdn_gating, recurrent_gated_delta_rule_ref,
                                  rms_norm_gated, slot_groups, speculative_gated_delta_rule)

KSIZE, M, R = 4, 4, 5
SMALL = (2, 4, 32, 32)            # key heads, value heads, key and value head dims


def _setup(rows: int, device: str, dims: tuple[int, ...], num_slots: int):
    h, hv, dk, dv = dims
    conv_dim, value_dim = 2 * h * dk + hv * dv, hv * dv
    gen = torch.Generator(device=device).manual_seed(rows)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen)
    proj = rnd(R * rows, conv_dim + value_dim + 2 * hv)
    weight = rnd(conv_dim, KSIZE) * 0.5
    conv_pool, rec_pool = rnd(num_slots, KSIZE - 1, conv_dim), rnd(num_slots, hv, dk, dv) * 0.3
    for pool in (conv_pool, rec_pool):
        pool[5] = float("nan")                       # lane 1's slot, never written
    init = torch.tensor([True, False, True, True, False], device=device)
    params = (torch.rand(hv, device=device, generator=gen) * 3 - 1, rnd(hv),
              1 + 0.1 * rnd(dv))                     # A_log, dt_bias, the norm's weight
    return proj.split((conv_dim, value_dim, hv, hv), dim=-1), weight, conv_pool, rec_pool, \
        init, params


def _report(name: str, checks: dict[str, bool]) -> list[str]:
    for what, ok in checks.items():
        print(f"{name}: {what} {'ok' if ok else 'FAILED'}")
    return [f"{name}: {what}" for what, ok in checks.items() if not ok]


def verify_case(rows: int, device: str = "cpu", dims: tuple[int, ...] = SMALL) -> list[str]:
    """A uniform speculative step of `rows` rows a lane; the names of the failed checks."""
    h, hv, dk, dv = dims
    num_slots, t = 1 + R * M, R * rows
    (qkv, z, b, a), weight, conv_pool, rec_pool, init, (A_log, dt_bias, norm_w) = _setup(
        rows, device, dims, num_slots)
    slots = torch.tensor([1 + 2, 5 + 0, 9 + 3, 13 + 1, 0], device=device)
    groups = slot_groups(slots, M)
    want_pools = (conv_pool.clone(), rec_pool.clone())
    qsl = torch.arange(0, t + 1, rows, device=device)
    y = causal_conv1d(qkv, weight, None, want_pools[0], slots, qsl, init, write_slots=groups)
    q, k, v = y.split((h * dk, h * dk, hv * dv), dim=-1)
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    o = speculative_gated_delta_rule(q.reshape(t, h, dk), k.reshape(t, h, dk),
                                     v.reshape(t, hv, dv), g, beta, want_pools[1], slots,
                                     groups, qsl, init, None, rows, use_fla=False)
    want = rms_norm_gated(o, z.reshape(t, hv, dv), norm_w, 1e-6).reshape(t, hv * dv)

    got_y = fused_verify.conv_verify(qkv, weight, conv_pool, slots, init, groups, rows)
    got = fused_verify.gated_delta_verify(got_y, z, b, a, A_log, dt_bias, norm_w, 1e-6,
                                          rec_pool, slots, init, groups, rows, h)
    real = slice(0, (R - 1) * rows)
    written = groups[:R - 1, :rows].reshape(-1)
    kept = [s for s in range(1, num_slots) if s not in written.tolist()]
    return _report(f"verify, {rows} rows, {dims[-1]}-column heads", {
        "conv output": torch.allclose(got_y[real], y[real], rtol=1e-5, atol=1e-5),
        "output": torch.allclose(got[real], want[real], rtol=1e-4, atol=1e-4),
        "conv states": torch.equal(conv_pool[written], want_pools[0][written]),
        "recurrent states": torch.allclose(rec_pool[written], want_pools[1][written],
                                           rtol=1e-5, atol=1e-5),
        "other slots untouched": torch.equal(rec_pool[kept].nan_to_num(),
                                             want_pools[1][kept].nan_to_num()),
    })


def decode_case(device: str = "cpu", dims: tuple[int, ...] = SMALL,
                v_block: int = fused_decode.V_BLOCK) -> list[str]:
    """A decode step (one row a lane, in place on the lanes' slots), the rule's kernel taking
    `v_block` of the state's value columns a pass."""
    h, hv, dk, dv = dims
    (qkv, z, b, a), weight, conv_pool, rec_pool, init, (A_log, dt_bias, norm_w) = _setup(
        1, device, dims, 16)
    slots = torch.tensor([3, 5, 12, 1, 0], device=device)
    want_pools = (conv_pool.clone(), rec_pool.clone())
    y = causal_conv1d_decode(qkv, weight, None, want_pools[0], slots, init)
    q, k, v = y.split((h * dk, h * dk, hv * dv), dim=-1)
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    o = recurrent_gated_delta_rule_ref(q.reshape(R, h, dk), k.reshape(R, h, dk),
                                       v.reshape(R, hv, dv), g, beta, want_pools[1], slots,
                                       None, init)
    want = rms_norm_gated(o, z.reshape(R, hv, dv), norm_w, 1e-6).reshape(R, hv * dv)
    got_y = fused_decode.conv_decode(qkv, weight, conv_pool, slots, init)
    got = fused_decode.gated_delta_decode(got_y, z, b, a, A_log, dt_bias, norm_w, 1e-6,
                                          rec_pool, slots, init, h, v_block=v_block)
    used = slots[:R - 1]
    return _report(f"decode ({v_block} columns a pass)", {
        "conv output": torch.allclose(got_y[:R - 1], y[:R - 1], rtol=1e-5, atol=1e-5),
        "output": torch.allclose(got[:R - 1], want[:R - 1], rtol=1e-4, atol=1e-4),
        "conv states": torch.equal(conv_pool[used], want_pools[0][used]),
        "recurrent states": torch.allclose(rec_pool[used], want_pools[1][used],
                                           rtol=1e-5, atol=1e-5),
    })


def split_decode_case(device: str = "cpu", dims: tuple[int, ...] = SMALL,
                      v_block: int = 16) -> list[str]:
    """A decode step whose rule spreads each head's value columns over programs and leaves
    the gated norm to out_proj's one-row prologue (layers/gemv.py GATED_NORM), against the
    torch ops and a float32 matmul."""
    h, hv, dk, dv = dims
    (qkv, z, b, a), weight, conv_pool, rec_pool, init, (A_log, dt_bias, norm_w) = _setup(
        1, device, dims, 16)
    slots = torch.tensor([3, 5, 12, 1, 0], device=device)
    want_pool = rec_pool.clone()
    y = fused_decode.conv_decode(qkv, weight, conv_pool.clone(), slots, init)
    q, k, v = y.split((h * dk, h * dk, hv * dv), dim=-1)
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    o = recurrent_gated_delta_rule_ref(q.reshape(R, h, dk), k.reshape(R, h, dk),
                                       v.reshape(R, hv, dv), g, beta, want_pool, slots,
                                       None, init).reshape(R, hv * dv)
    got = fused_decode.gated_delta_decode(y, z, b, a, A_log, dt_bias, norm_w, 1e-6,
                                          rec_pool, slots, init, h, v_block=v_block,
                                          norm=False)
    w_out = torch.randn(24, hv * dv, device=device, generator=torch.Generator(
        device=device).manual_seed(7)) * 0.1
    normed = rms_norm_gated(o.reshape(R, hv, dv), z.reshape(R, hv, dv), norm_w,
                            1e-6).reshape(R, hv * dv)
    want_y = normed @ w_out.T
    got_y = torch.cat([gemv(o[i:i + 1], w_out, prologue=GATED_NORM, residual=z[i:i + 1],
                            norm_weight=norm_w, eps=1e-6, group=dv) for i in range(R - 1)])
    used = slots[:R - 1]
    return _report(f"split decode ({v_block} columns a program)", {
        "rule output": torch.allclose(got[:R - 1], o[:R - 1], rtol=1e-4, atol=1e-4),
        "recurrent states": torch.allclose(rec_pool[used], want_pool[used], rtol=1e-5,
                                           atol=1e-5),
        "gated norm in out_proj": torch.allclose(got_y, want_y[:R - 1], rtol=1e-4,
                                                 atol=1e-4),
    })


def in_proj_conv_case(device: str = "cpu", dims: tuple[int, ...] = SMALL, hidden: int = 48,
                      fresh: bool = False) -> list[str]:
    """A batch-1 decode's in_proj with its input RMSNorm and the conv in one kernel
    (fused_decode.in_proj_conv) against the torch ops: RMSNorm, a float32 matmul, the
    decode conv. `fresh`: the lane starts now on a slot holding NaN."""
    h_, hv, dk, dv = dims
    conv_dim = 2 * h_ * dk + hv * dv
    n = conv_dim + hv * dv + 2 * hv
    gen = torch.Generator(device=device).manual_seed(11)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen)
    x, residual, norm_w = rnd(1, hidden), rnd(1, hidden), 1 + 0.1 * rnd(hidden)
    w_in, conv_w = rnd(n, hidden) * 0.2, rnd(conv_dim, KSIZE) * 0.5
    pool = rnd(6, KSIZE - 1, conv_dim)
    slots = torch.tensor([4], device=device)
    init = torch.tensor([not fresh], device=device)
    if fresh:
        pool[4] = float("nan")
    want_pool = pool.clone()
    h = x + residual
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w
    p = normed @ w_in.T
    want_conv = causal_conv1d_decode(p[:, :conv_dim], conv_w, None, want_pool, slots, init)
    y, got_h = fused_decode.in_proj_conv(x, residual, norm_w, 1e-6, w_in, conv_w, pool, slots,
                                         init)
    written = want_pool[4].nan_to_num() if fresh else want_pool[4]
    return _report(f"in_proj + conv ({'fresh lane' if fresh else 'continued'})", {
        "residual": torch.allclose(got_h, h),
        "conv columns": torch.allclose(y[:, :conv_dim], want_conv, rtol=1e-4, atol=1e-4),
        "other columns": torch.allclose(y[:, conv_dim:], p[:, conv_dim:], rtol=1e-4,
                                        atol=1e-4),
        "conv state": torch.allclose(pool[4], written, rtol=1e-4, atol=1e-4),
        "other slots untouched": torch.equal(pool[:4], want_pool[:4]),
    })


def sigmoid_gate_case(device: str = "cpu", heads: int = 4, head_dim: int = 32) -> list[str]:
    """A gated attention layer's o_proj with the output gate in its one-row prologue
    (layers/gemv.py SIGMOID_GATE) against sigmoid's torch op and a float32 matmul."""
    gen = torch.Generator(device=device).manual_seed(5)
    o = torch.randn(1, heads, head_dim, device=device, generator=gen)
    qkv = torch.randn(1, 2 * heads * head_dim + 64, device=device, generator=gen)
    w = torch.randn(40, heads * head_dim, device=device, generator=gen) * 0.1
    gate = qkv[:, :2 * heads * head_dim].view(1, heads, 2, head_dim)[:, :, 1]
    want = (o * torch.sigmoid(gate)).reshape(1, -1) @ w.T
    got = gemv(o.reshape(1, -1), w, prologue=SIGMOID_GATE, residual=qkv, group=head_dim)
    return _report("o_proj with the output gate", {
        "output": torch.allclose(got, want, rtol=1e-4, atol=1e-4)})


if __name__ == "__main__":
    # the default takes all 32 value columns at once here; 16 makes two passes, as a
    # 128-column head takes four on the GPU
    failures = (decode_case() + decode_case(v_block=16) + split_decode_case()
                + split_decode_case(v_block=32) + in_proj_conv_case()
                + in_proj_conv_case(fresh=True) + sigmoid_gate_case()
                + [f for rows in (1, 3, 4) for f in verify_case(rows)]
                + verify_case(3, dims=SMALL[:3] + (64,)))    # 64-column heads: two passes
    print("FAILURES", len(failures))
