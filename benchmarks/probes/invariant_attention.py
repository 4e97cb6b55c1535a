"""The batch-invariant mode's attention kernel (attention/paged_invariant.py) on decode steps:
µs per call (graph replay) by KV tile, split size and warps, and by whether a tile's splits
are spread over programs, at Qwen3-0.6B's attention shape (16 query heads, 8 KV heads, head
dim 128, bf16, 16-token pages), and a check that one program and spread splits give the
same bits; with `--programs`, other spreads too (a workspace sized for the launch); with
`--stages`, Triton's pipeline stages of the KV loop too, each checked for the bits of the
mode's 2 stages (a pure schedule, if the compiled dot is the same). With
`--prefill`, the same variants on whole-prompt steps too (a smaller split
is more folds a prefill tile), at 32-token pages (prefill_attention.py's step), also at
larger query tiles (`--prefill-qtok`), each checked for the bits of the mode's own query
tiles at the same KV tile and split (a row's arithmetic is its own at any query tile if the
compiled layouts sum a row's scores alike).

    python benchmarks/probes/invariant_attention.py [--batch-sizes 1 8 32] [--lengths 576 4096]
        [--tiles 32 64] [--warps 4 8] [--splits 64 128 256] [--stages 2 3 4] [--programs 2 4]
        [--prefill 16x512 1x4096]
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from fullgraph.attention.paged_invariant import (NUM_WARPS, SplitWorkspace, block_rows,
                                                 query_tokens, split_programs, tile_map,
                                                 tiled_attention)
from graph_timing import replay_ms
from prefill_attention import step as prefill_step

HQ, HKV, D, PAGE = 16, 8, 128, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--lengths", type=int, nargs="+", default=[576, 4096])
    ap.add_argument("--tiles", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--splits", type=int, nargs="+", default=[256])
    ap.add_argument("--stages", type=int, nargs="+", default=[2],
                    help="pipeline stages of the decode steps' KV loop (2: the mode's)")
    ap.add_argument("--programs", type=int, nargs="*", default=[],
                    help="programs a (query tile, KV head) to time besides 1 and the mode's "
                         "choice, with a workspace sized for the launch (the mode's is sized "
                         "for launches of up to an SM's worth of pairs)")
    ap.add_argument("--prefill", nargs="*", default=[], help="requests x prompt tokens")
    ap.add_argument("--prefill-qtok", type=int, nargs="*", default=[8, 32],
                    help="query tokens a program on prefill steps (the mode's first)")
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    dev = torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    qtok = query_tokens(HQ // HKV)
    rows, differ = [], False
    for length in args.lengths:
        pages = -(-length // PAGE)
        for batch in args.batch_sizes:
            g = torch.Generator(device=dev).manual_seed(0)
            slots = (batch * pages + 1) * PAGE
            k, v = (torch.randn(slots, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
                    for _ in range(2))
            table = (torch.randperm(batch * pages, device=dev, generator=g) + 1).int()
            table = torch.cat([table.view(batch, pages),
                               torch.zeros(1, pages, dtype=torch.int32, device=dev)])
            q = torch.randn(batch, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
            seq_lens = torch.full((batch,), length, dtype=torch.int32, device=dev)
            positions = seq_lens.long() - 1
            qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
            tiles = tile_map(qsl, batch, batch, qtok)
            for tile, split, warps in itertools.product(args.tiles, args.splits, args.warps):
                ws = SplitWorkspace.for_spec(HQ, HKV, D, length, split, num_sms, dev)
                programs = split_programs(tiles[0].shape[0], HKV, num_sms, ws)
                wide = (SplitWorkspace(tiles[0].shape[0], HKV, -(-length // split),
                                       block_rows(qtok, HQ // HKV), D, dev)
                        if args.programs else None)     # only for --programs' spreads
                outs = {}
                for stages, p in itertools.product(sorted({2, *args.stages}),
                                                   sorted({1, programs, *args.programs})):
                    def call(p=p, stages=stages):
                        return tiled_attention(q, k, v, table, seq_lens, positions, tiles, PAGE,
                                               D ** -0.5, qtok, tile, split, warps,
                                               num_stages=stages, programs=p,
                                               workspace=ws if p == programs else wide)
                    outs[stages, p] = call()
                    rows.append({"length": length, "batch": batch, "tile": tile,
                                 "split": split, "warps": warps, "stages": stages,
                                 "programs": p, "us": round(replay_ms(call, args.iters) * 1e3, 2),
                                 "bits_of_2_stages_1_program": torch.equal(outs[stages, p],
                                                                           outs[2, 1])})
                    print(json.dumps(rows[-1]), flush=True)
                    if not rows[-1]["bits_of_2_stages_1_program"]:
                        differ = True
                        print(f"DIFFER length {length} batch {batch} tile {tile} split {split} "
                              f"warps {warps}: {stages} stages, {p} programs")
    for spec in args.prefill:
        reqs, length = (int(x) for x in spec.split("x"))
        q, k_cache, v_cache, table, seq_lens, pos, qsl, _ = prefill_step(reqs, length, dev)
        for tile, split in itertools.product(args.tiles, args.splits):
            mode = None                # the mode's query tiles at its warps: the bits to keep
            for qt, warps in [(qtok, NUM_WARPS)] + [(t, w) for t in args.prefill_qtok
                                                    for w in args.warps]:
                tiles = tile_map(qsl, reqs, reqs * length, qt)

                def call(qt=qt, tile=tile, split=split, warps=warps, tiles=tiles):
                    return tiled_attention(q, k_cache, v_cache, table, seq_lens, pos, tiles,
                                           32, D ** -0.5, qt, tile, split, warps)
                out = call()
                mode = out if mode is None else mode
                rows.append({"prefill": spec, "qtok": qt, "tile": tile, "split": split,
                             "warps": warps, "us": round(replay_ms(call, args.iters // 4) * 1e3, 1),
                             "bits_of_the_mode_tiles": torch.equal(out, mode)})
                print(json.dumps(rows[-1]), flush=True)
    print("bits differ somewhere" if differ else "every decode variant: the bits of 2 stages "
          "and 1 program")


if __name__ == "__main__":
    main()
