"""Compile-only, no GPU needed: attention/paged_invariant.py's kernel compiled for sm_90 by
this machine's Triton, and the registers and stack (spill) bytes a thread uses, read with the
`cuobjdump` Triton bundles, and how many asynchronous copies the software pipeliner made. The
mode's tiles (16 query rows) by KV tile, warps and program spreading, the triton backend's
prefill tiles (one pass) by query rows, KV tile, warps and stages, and the normal mode's
decode kernel (attention/paged_decode.py) at batch 1 by head dim, KV tile and splits. Spills on the GPU
cost local-memory traffic in the KV walk; read these before timing a tile on the device.
For the GPU machine's Triton, run it from a venv holding that version's wheel
(`pip download --no-deps --only-binary=:all: triton==X`) and torch's CPU build.

    python benchmarks/probes/attention_registers.py
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fullgraph.attention import paged_decode, paged_invariant  # noqa: E402

POINTERS = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16",
            "block_table_ptr": "*i32", "seq_lens_ptr": "*i32", "positions_ptr": "*i64",
            "tile_req_ptr": "*i32", "tile_first_ptr": "*i32", "tile_end_ptr": "*i32",
            "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "counter_ptr": "*i32",
            "scale_log2e": "fp32"}


def usage(tile: int, split: int, programs: int, warps: int, qtok: int = 8, group: int = 2,
          block_m: int = 16, head_dim: int = 128, stages: int = 2) -> str:
    const = dict(GROUP=group, QTOK=qtok, BLOCK_M=block_m, D=head_dim, PAGE=32, TILE=tile,
                 SPLIT=split, PROGRAMS=programs, PART_SPLITS=32, PRECISION="tf32",
                 USE_PDL=True)
    return resources(paged_invariant._invariant_attention_kernel, const, warps, stages)


def decode_usage(head_dim: int, kv_heads: int, group: int, tile: int, splits: int) -> str:
    """The normal mode's decode kernel at one query token a request, as `paged_decode`
    launches it (its tiling, warps and stages) but for `tile`."""
    pd = paged_decode
    rows_p2 = pd.next_power_of_2(group)
    const = pd.tiling(32, rows_p2, splits) | dict(
        TILE=tile, QUERY_LEN=1, GROUP=group, HKV=kv_heads, D=head_dim, PAGE=32,
        PRECISION="tf32", USE_PDL=True)
    return resources(pd._paged_decode_kernel, const, pd.NUM_WARPS, pd.pipeline_stages(splits))


# Integer arguments our launches pass as multiples of 16 (head and token strides at head
# dims of 16 and more), which the JIT specializes as such, like 16-byte aligned pointers.
DIVISIBLE = {"stride_qt", "stride_qh", "stride_ks", "stride_kh", "stride_vs", "stride_vh",
             "stride_ot", "stride_oh"}


def resources(kernel, const: dict, warps: int, stages: int) -> str:
    """Registers and stack bytes a thread of `kernel` compiled for sm_90, specialized as
    Triton's JIT specializes our launches: every pointer 16-byte aligned, the `DIVISIBLE`
    integers multiples of 16. Without that specialization loads cannot be vectorized or
    copied asynchronously, so the software pipeliner leaves the KV loop alone and the
    figures are far off (251 registers instead of 168 for the prefill tiles)."""
    signature = {name: "constexpr" if name in const else POINTERS.get(name, "i32")
                 for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name not in const and (signature[name].startswith("*") or name in DIVISIBLE)}
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                    constexprs={(kernel.arg_names.index(n),): v for n, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    fields = dict(w.split(":") for line in out.splitlines() if "REG:" in line
                  for w in line.split() if ":" in w)
    copies = compiled.asm["ttgir"].count("ttg.async_copy_global_to_local")
    return (f"{fields.get('REG', '?'):>4} registers, {fields.get('STACK', '?'):>5} stack bytes, "
            f"{copies} asynchronous copies")


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90, bf16, head dim 128, GQA group 2, 32-token pages")
    for tile, warps, programs in itertools.product((32, 64), (4, 8), (1, 4)):
        print(f"mode: 16 rows, {tile}-token KV tiles, 256-token splits, {warps} warps, "
              f"{programs} program(s) a tile: {usage(tile, 256, programs, warps)}")
    for qtok, tile, warps, stages in itertools.product((32, 64), (32, 64, 128), (4, 8), (2, 3)):
        print(f"triton backend prefill: {2 * qtok} rows, {tile}-token KV tiles, one pass, "
              f"{warps} warps, {stages} stages: "
              f"{usage(tile, 0, 1, warps, qtok=qtok, block_m=2 * qtok, stages=stages)}")
    for head_dim, kv_heads, group in ((128, 8, 2), (256, 2, 4)):
        for tile, splits in ((64, 16), (64, 1), (32, 16), (32, 8), (32, 32)):
            print(f"decode, head dim {head_dim}, {kv_heads} KV heads, group {group}: "
                  f"{tile}-token KV tiles, {splits} splits: "
                  f"{decode_usage(head_dim, kv_heads, group, tile, splits)}")


if __name__ == "__main__":
    main()
