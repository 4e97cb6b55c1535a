"""Run under Triton's CPU interpreter (TRITON_INTERPRET=1, by tests/test_gdn_verify_interpret.py):
the fused GDN verify kernels (layers/gdn/fused_verify.py) against the torch ops they replace,
float32, a uniform speculative step of 1, 3 and 4 rows a lane with groups of 4 slots. Lane 1
starts fresh on a slot holding NaN; the last lane is padding on the null slot. Prints one
line per case and "FAILURES n"."""
from __future__ import annotations

import torch

from fullgraph.layers.gdn import (causal_conv1d, fused_verify, gdn_gating, rms_norm_gated,
                                  slot_groups, speculative_gated_delta_rule)

H, HV, DK, DV, KSIZE, M, R = 2, 4, 32, 32, 4, 4, 5
KEY_DIM, VALUE_DIM = H * DK, HV * DV
CONV_DIM = 2 * KEY_DIM + VALUE_DIM


def case(rows: int) -> list[str]:
    gen = torch.Generator().manual_seed(rows)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)
    t, num_slots = R * rows, 1 + R * M
    proj = rnd(t, CONV_DIM + VALUE_DIM + 2 * HV)
    weight = rnd(CONV_DIM, KSIZE) * 0.5
    conv_pool, rec_pool = rnd(num_slots, KSIZE - 1, CONV_DIM), rnd(num_slots, HV, DK, DV) * 0.3
    slots = torch.tensor([1 + 2, 5 + 0, 9 + 3, 13 + 1, 0])
    for pool in (conv_pool, rec_pool):
        pool[5] = float("nan")                       # lane 1's slot, never written
    init = torch.tensor([True, False, True, True, False])
    groups = slot_groups(slots, M)
    A_log, dt_bias, norm_w = torch.rand(HV, generator=gen) * 3 - 1, rnd(HV), 1 + 0.1 * rnd(DV)
    qkv, z, b, a = proj.split((CONV_DIM, VALUE_DIM, HV, HV), dim=-1)

    want_pools = (conv_pool.clone(), rec_pool.clone())
    qsl = torch.arange(0, t + 1, rows)
    y = causal_conv1d(qkv, weight, None, want_pools[0], slots, qsl, init, write_slots=groups)
    q, k, v = y.split((KEY_DIM, KEY_DIM, VALUE_DIM), dim=-1)
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    o = speculative_gated_delta_rule(q.reshape(t, H, DK), k.reshape(t, H, DK),
                                     v.reshape(t, HV, DV), g, beta, want_pools[1], slots,
                                     groups, qsl, init, None, rows, use_fla=False)
    want = rms_norm_gated(o, z.reshape(t, HV, DV), norm_w, 1e-6).reshape(t, VALUE_DIM)

    got_y = fused_verify.conv_verify(qkv, weight, conv_pool, slots, init, groups, rows)
    got = fused_verify.gated_delta_verify(got_y, z, b, a, A_log, dt_bias, norm_w, 1e-6,
                                          rec_pool, slots, init, groups, rows, H)
    real = slice(0, (R - 1) * rows)
    written = groups[:R - 1, :rows].reshape(-1)
    kept = [s for s in range(1, num_slots) if s not in written.tolist()]
    checks = {
        "conv output": torch.allclose(got_y[real], y[real], rtol=1e-5, atol=1e-5),
        "output": torch.allclose(got[real], want[real], rtol=1e-4, atol=1e-4),
        "conv states": torch.equal(conv_pool[written], want_pools[0][written]),
        "recurrent states": torch.allclose(rec_pool[written], want_pools[1][written],
                                           rtol=1e-5, atol=1e-5),
        "other slots untouched": torch.equal(rec_pool[kept].nan_to_num(),
                                             want_pools[1][kept].nan_to_num()),
    }
    for name, ok in checks.items():
        print(f"rows {rows}: {name} {'ok' if ok else 'FAILED'}")
    return [name for name, ok in checks.items() if not ok]


if __name__ == "__main__":
    failures = [f for rows in (1, 3, 4) for f in case(rows)]
    print("FAILURES", len(failures))
