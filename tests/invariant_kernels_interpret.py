"""The batch-invariant mode's matmul and attention kernels (layers/invariant_gemm.py,
attention/paged_invariant.py; the attention kernel also at the triton backend's prefill
tiles, attention/triton_attn.py) at op level: a row's bits whatever else is computed with it
(other row counts and tile buckets; a prefill row, a decode row, a chunk's row, a row after
other requests), and closeness to torch's float32 matmul and SDPA. The GPU tests
(test_gpu_batch_invariant.py) run these cases in bfloat16 at Qwen3-0.6B's shapes; run as a
script under Triton's CPU interpreter (tests/triton_interpret.py, by
test_invariant_kernels_interpret.py) they run in float32 at small shapes. Prints
"FAILURES n"."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from fullgraph.attention import triton_attn
from fullgraph.attention.paged_invariant import (SplitWorkspace, block_rows,
                                                 invariant_attention, query_tokens, tile_map,
                                                 tiled_attention)
from fullgraph.layers.invariant_gemm import invariant_mm
from fullgraph.layers.policy import KernelPolicy

POLICY = KernelPolicy(batch_invariant=True)
CUTS = ((0, 1), (5, 1), (17, 2), (40, 7), (9, 16), (1, 17), (2, 32), (64, 64), (3, 65),
        (100, 200), (0, 256), (20, 257))


def matmul_case(device: str, dtype: torch.dtype, shapes, rows: int = 300,
                cuts=CUTS) -> list[str]:
    """Per weight shape (N, K): every slice of rows in `cuts` alone == the same rows of one
    call over `rows`, and the call close to float32. (The interpreter's tl.dot sums a whole
    K slice at once, so there only slices of the same tile bucket compare equal; the GPU's
    tensor cores accumulate in K order whatever the tile.)"""
    failed = []
    gen = torch.Generator().manual_seed(0)
    for n, k in shapes:
        w = (torch.randn(n, k, generator=gen) / 32).to(device, dtype)
        x = torch.randn(rows, k, generator=gen).to(device, dtype)
        full = invariant_mm(x, w)
        ref = x.float() @ w.float().T
        if (full.float() - ref).abs().max() > 2e-2 * ref.abs().max():
            failed.append(f"matmul {n}x{k}: far from float32")
        for lo, m in cuts:
            if lo + m <= rows and not torch.equal(invariant_mm(x[lo:lo + m].clone(), w),
                                                  full[lo:lo + m]):
                failed.append(f"matmul {n}x{k}: rows {lo}..{lo + m - 1}")
    return failed


def _paged(lengths, hkv, d, block_size, device, dtype):
    """Random K/V for requests of `lengths` tokens, in shuffled pages (page 0: the null
    block)."""
    g = torch.Generator().manual_seed(1)
    pages = [-(-n // block_size) for n in lengths]
    order = torch.randperm(sum(pages), generator=g) + 1
    table = torch.zeros(len(lengths) + 1, max(pages), dtype=torch.int32)
    for i, (at, p) in enumerate(zip(itertools.accumulate([0] + pages), pages)):
        table[i, :p] = order[at:at + p]
    slots = (sum(pages) + 1) * block_size
    k, v = (torch.randn(slots, hkv, d, generator=g).to(device, dtype) for _ in range(2))
    return k, v, table.to(device)


def _attend_tiles(q, k, v, table, lengths, queries, block_size, policy, prefill_tiles=False):
    """The kernel over one step: request i's last `queries[i]` tokens (seq_len lengths[i]);
    at the mode's tiles, or at the triton backend's prefill tiles (attention/triton_attn.py)."""
    dev = q.device
    qsl = torch.tensor([0, *itertools.accumulate(queries)], dtype=torch.int32, device=dev)
    positions = torch.cat([torch.arange(n - m, n) for n, m in zip(lengths, queries)]).to(dev)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    group = q.shape[1] // k.shape[1]
    qtok = (max(1, triton_attn.PREFILL_ROWS // group) if prefill_tiles
            else query_tokens(group))
    tiles = tile_map(qsl, len(lengths), q.shape[0], qtok)
    if prefill_tiles:
        return tiled_attention(q, k, v, table, seq_lens, positions, tiles, block_size,
                               q.shape[-1] ** -0.5, qtok, triton_attn.PREFILL_TILE,
                               triton_attn.PREFILL_SPLIT,
                               triton_attn.prefill_warps(q.shape[-1]))
    return invariant_attention(q, k, v, table, seq_lens, positions, tiles, block_size,
                               q.shape[-1] ** -0.5, policy)


def _padding_case(q, k, v, table, lengths, outs, block_size, policy, prefill_tiles
                  ) -> list[str]:
    """The step padded with 19 tokens past its last request (a graph's padded shape): the
    requests' rows as before and the padding rows zeros, though the output starts as NaN
    (the kernel writes every row)."""
    pad = torch.full((19,) + q[0].shape[1:], 7.0, dtype=q[0].dtype, device=q[0].device)
    empty_like = torch.empty_like
    torch.empty_like = lambda t, **kw: empty_like(t, **kw).fill_(float("nan"))
    try:
        got = _attend_tiles(torch.cat(q + [pad]), k, v, table, lengths, lengths, block_size,
                            policy, prefill_tiles)
    finally:
        torch.empty_like = empty_like
    n = sum(lengths)
    if not torch.equal(got[:n], torch.cat(outs)) or not torch.equal(got[n:],
                                                                     torch.zeros_like(pad)):
        return ["attention: a step padded past its last request"]
    return []


def _spread_case(q, k, v, table, lengths, outs, block_size, policy) -> list[str]:
    """Decode rows of requests 0 and 2 with each tile's splits spread over 2, 3, 4 and 8
    programs (more than the splits: idle ones), and over 2 with a workspace one split too
    small for request 0 (its program 0 walks it alone): the bits of the prefill."""
    failed = []
    group = q[0].shape[1] // k.shape[1]
    split = policy.attention_split
    n_splits = -(-lengths[0] // split)
    assert n_splits >= 3
    for reqs, programs, part_splits in (([0], 2, n_splits), ([0], 3, n_splits),
                                        ([0, 2], 4, n_splits), ([0, 2], 8, n_splits),
                                        ([0, 2], 2, n_splits - 1)):
        rows = torch.cat([q[j][-1:] for j in reqs])
        dev = q[0].device
        qsl = torch.arange(len(reqs) + 1, dtype=torch.int32, device=dev)
        tiles = tile_map(qsl, len(reqs), len(reqs), query_tokens(group))
        workspace = SplitWorkspace(tiles[0].shape[0], k.shape[1], part_splits,
                                   block_rows(query_tokens(group), group), q[0].shape[-1],
                                   dev)
        got = tiled_attention(
            rows, k, v, table[reqs + [len(lengths)]],
            torch.tensor([lengths[j] for j in reqs], dtype=torch.int32, device=dev),
            torch.tensor([lengths[j] - 1 for j in reqs], device=dev), tiles, block_size,
            q[0].shape[-1] ** -0.5, query_tokens(group),
            policy.attention_tile_for(q[0].shape[-1]), split,
            programs=programs, workspace=workspace)
        if not torch.equal(got, torch.cat([outs[j][-1:] for j in reqs])):
            failed.append(f"attention: decode rows of {reqs} over {programs} programs "
                          f"({part_splits} splits kept)")
        if workspace.counters.any():
            failed.append(f"attention: arrival counters left at {workspace.counters.tolist()}")
    return failed


def attention_case(device: str, dtype: torch.dtype, lengths=(700, 37, 300), hq: int = 16,
                   hkv: int = 8, d: int = 128, block_size: int = 16,
                   policy: KernelPolicy = POLICY, tol: float = 2e-2,
                   prefill_tiles: bool = False) -> list[str]:
    """Three requests prefilled in one step, against SDPA (float32, causal); then request 0's
    last token alone (decode), a chunk of its last rows, and rows of requests 0 and 2 in a
    step where other requests' rows come first: the same bits as in the prefill (at fixed
    tiles a row's arithmetic is its own, whatever the tile holds besides)."""
    k, v, table = _paged(lengths, hkv, d, block_size, device, dtype)
    g = torch.Generator().manual_seed(2)
    q = [torch.randn(n, hq, d, generator=g).to(device, dtype) for n in lengths]

    def _attend(*args):
        return _attend_tiles(*args, policy, prefill_tiles)
    outs = _attend(torch.cat(q), k, v, table, lengths, lengths, block_size)
    outs = outs.split(list(lengths))
    failed = []
    for i, n in enumerate(lengths):
        cols = torch.arange(n, device=device)
        slots = table[i, cols // block_size].long() * block_size + cols % block_size
        kk, vv = (x[slots].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
                  for x in (k, v))
        ref = F.scaled_dot_product_attention(q[i].float().transpose(0, 1), kk, vv,
                                             is_causal=True).transpose(0, 1)
        if (outs[i].float() - ref).abs().max() >= tol:
            failed.append(f"attention request {i}: far from SDPA")
    n0, n2, chunk = lengths[0], lengths[2], lengths[0] * 4 // 7
    if not torch.equal(_attend(q[0][-1:], k, v, table[:1], [n0], [1], block_size),
                       outs[0][-1:]):
        failed.append("attention: decode row")
    if not torch.equal(_attend(q[0][-chunk:], k, v, table[:1], [n0], [chunk], block_size),
                       outs[0][-chunk:]):
        failed.append("attention: chunk rows")
    failed += _padding_case(q, k, v, table, lengths, outs, block_size, policy, prefill_tiles)
    if not prefill_tiles:
        failed += _spread_case(q, k, v, table, lengths, outs, block_size, policy)
    order = [2, 1, 0]
    mixed = _attend(torch.cat([q[2][-5:], q[1][-1:], q[0][-9:]]), k, v,
                    table[order + [len(lengths)]], [lengths[j] for j in order], [5, 1, 9],
                    block_size)
    if not (torch.equal(mixed[-9:], outs[0][-9:]) and torch.equal(mixed[:5], outs[2][-5:])):
        failed.append("attention: rows after other requests")
    assert n2 >= 5
    return failed


if __name__ == "__main__":
    small = KernelPolicy(batch_invariant=True, attention_tile=16, attention_split=64)
    failures = (matmul_case("cpu", torch.float32, ((40, 64), (100, 96)), rows=70,
                            cuts=[(lo, m) for lo, m in CUTS if m > 32])
                + attention_case("cpu", torch.float32, lengths=(150, 9, 70), hq=4, hkv=2,
                                 d=32, block_size=8, policy=small, tol=1e-4)
                # request 0's decode row ends a KV tile (16 tokens)
                + attention_case("cpu", torch.float32, lengths=(144, 9, 70), hq=4, hkv=2,
                                 d=32, block_size=8, policy=small, tol=1e-4)
                + attention_case("cpu", torch.float32, lengths=(150, 9, 70), hq=4, hkv=2,
                                 d=32, block_size=8, tol=1e-4, prefill_tiles=True)
                # GQA group 4, as the Qwen3.5 hybrids' gated attention
                + attention_case("cpu", torch.float32, lengths=(150, 9, 70), hq=8, hkv=2,
                                 d=32, block_size=8, policy=small, tol=1e-4)
                + attention_case("cpu", torch.float32, lengths=(150, 9, 70), hq=8, hkv=2,
                                 d=32, block_size=8, tol=1e-4, prefill_tiles=True))
    for f in failures:
        print("FAILED", f)
    print("FAILURES", len(failures))
