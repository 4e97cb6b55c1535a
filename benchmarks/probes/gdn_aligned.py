"""Probe (docs/batch_invariance.md, section 9, probe 3): can fla's chunked gated delta rule
serve the batch-invariant mode on the GPU? The mode commits a lane's state at multiples of
the chunk (64) and runs its tail + new rows as a span that starts at a boundary, so a row
must come out with the same bits:

1. in a partial chunk (its span's first n rows) as in the full chunk;
2. whatever other spans share the call (fla's grid and autotuned configs follow T and the
   number of chunks);
3. from a committed state (the final state of a 64-row call, fed to the next call) as inside
   one longer call that crosses the boundary.

Prints each comparison (equal or the max difference). Qwen3.5-0.8B's GDN shapes, bf16 inputs.

    python benchmarks/probes/gdn_aligned.py
"""
from __future__ import annotations

import torch

from fullgraph.layers.gdn.kernels import fla_gated_delta_rule
from fullgraph.layers.gdn.metadata import chunk_metadata

H, HV, DK, DV = 16, 16, 128, 128


def run(fla, lanes: list[dict], h0: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One fla call over `lanes` (dicts of q, k, v, g, beta [n, ...]) packed; (outputs per
    lane, final states)."""
    lens = [x["q"].shape[0] for x in lanes]
    qsl = torch.tensor([0] + lens).cumsum(0)
    idx, _ = chunk_metadata(qsl.numpy())
    cat = {name: torch.cat([x[name] for x in lanes])[None] for name in lanes[0]}
    o, ht = fla.chunk_gated_delta_rule(
        **cat, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
        cu_seqlens=qsl.cuda(), chunk_indices=torch.from_numpy(idx).cuda(), chunk_size=64)
    return list(o[0].split(lens)), ht


def lane(n: int, gen: torch.Generator) -> dict:
    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)
    return {"q": rnd(n, H, DK).bfloat16(), "k": rnd(n, H, DK).bfloat16(),
            "v": rnd(n, HV, DV).bfloat16(),
            "g": -torch.rand(n, HV, device="cuda", generator=gen) * 0.5,
            "beta": torch.rand(n, HV, device="cuda", generator=gen).bfloat16()}


def cut(x: dict, lo: int, hi: int) -> dict:
    return {name: t[lo:hi] for name, t in x.items()}


def report(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    same = torch.equal(a, b)
    diff = "" if same else f" (max diff {(a.float() - b.float()).abs().max().item():.3e})"
    print(f"{name}: {'equal' if same else 'DIFFERENT'}{diff}", flush=True)


def main() -> None:
    fla = fla_gated_delta_rule(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = lane(128, gen)
    s0 = torch.randn(1, HV, DK, DV, device="cuda", generator=gen) * 0.1
    (full,), s64_whole = run(fla, [cut(x, 0, 64)], s0)
    for n in (1, 2, 17, 37, 63):
        (part,), _ = run(fla, [cut(x, 0, n)], s0)
        report(f"1. rows 0..{n - 1} alone vs in the full chunk", part, full[:n])
    for others in ((100,), (5, 300), (1, 1, 1), (2000,)):
        spans = [lane(m, gen) for m in others]
        states = torch.cat([torch.randn(len(others), HV, DK, DV, device="cuda",
                                         generator=gen) * 0.1, s0])
        outs, _ = run(fla, spans + [cut(x, 0, 37)], states)
        report(f"2. rows 0..36 after spans {others} vs alone", outs[-1], full[:37])
        outs, _ = run(fla, [cut(x, 0, 37)] + spans, torch.cat([s0, states[:-1]]))
        report(f"2. rows 0..36 before spans {others} vs alone", outs[0], full[:37])
    (both,), _ = run(fla, [x], s0)
    (second,), _ = run(fla, [cut(x, 64, 128)], s64_whole)
    report("3. rows 64..127 from the committed state vs in one 128-row call", second, both[64:])
    (second_part,), _ = run(fla, [cut(x, 64, 64 + 9)], s64_whole)
    report("3. rows 64..72 from the committed state (a partial chunk) vs in one call",
           second_part, both[64:73])


if __name__ == "__main__":
    main()
