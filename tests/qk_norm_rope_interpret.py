"""The q/k norm + RoPE + KV store kernel (layers/qk_norm_rope.py) under Triton's CPU
interpreter against the op's reference path (the torch functions the model used), with and
without the q/k norm, at decode and prompt token counts (one head a program, and all of a
token's heads). Prints FAILURES n. Run by tests/test_qk_norm_rope.py through
tests/triton_interpret.py."""
from __future__ import annotations

import torch

import fullgraph.layers.qk_norm_rope as op
from test_qk_norm_rope import make_inputs


def main() -> int:
    failures = 0
    for norm in (True, False):
        for t in (1, 3, op.FEW_TOKENS + 6):
            want = make_inputs(t=t, slots=t + 20, seed=t, norm=norm)
            got = make_inputs(t=t, slots=t + 20, seed=t, norm=norm)
            q_want = op.qk_norm_rope_store_kv(**want)
            supported = op.triton_supported
            op.triton_supported = lambda *a: True          # the kernel, interpreted
            try:
                q_got = op.qk_norm_rope_store_kv(**got)
            finally:
                op.triton_supported = supported
            errs = [(q_got - q_want).abs().max().item(),
                    (got["k_cache"] - want["k_cache"]).abs().max().item()]
            v_same = torch.equal(got["v_cache"], want["v_cache"])
            ok = max(errs) <= 1e-5 and v_same
            print(f"norm={norm} t={t}: max |q|, |k| err {errs[0]:.2e} {errs[1]:.2e}, "
                  f"v {'equal' if v_same else 'differ'}", "" if ok else "FAIL")
            failures += not ok
    print("FAILURES", failures)
    return 0


if __name__ == "__main__":
    main()
