"""Probe: where a decode step's time goes, from clocks read inside the kernels.

    python benchmarks/probes/kernel_clock.py --batch-sizes 1 8

The profiler gives each kernel's first start and last end, but with PDL a kernel starts
long before its predecessor ends, so its duration says little. This probe rebuilds the
decode step's Triton kernels (the GEMVs, the q/k kernel, decode attention) with three reads
of `%globaltimer` per program: at its start, right after its PDL wait, at a mark (`MARKS`)
and at its end,
stored to a buffer (a slot per launch in the graph, rewritten by every replay). From one
replay it prints, per kernel of a decoder layer (median over layers, µs):

  boundary   from the predecessor's last program end to this kernel's first wait return
             (the drain, the memory flush and the wait's release);
  work       from that wait return to this kernel's last program end;
  spread     first to last wait return over its programs (programs that start late);
  early      first wait return minus first program start (the time it had before its wait).

  mark med/max  median / last program's reading before the call named in MARKS (decode
             attention: the split merge), from the first wait return;
  end med    the median program's end, from the first wait return.

boundary + work of consecutive kernels sum to the step. The reads add a few instructions
and four stores per program.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import math
import os
import tempfile
import textwrap

import numpy as np
import torch

from fullgraph import LLM, SamplingParams
from profile_step import drain, start_decoding      # this directory's probe

TARGETS = {"gemv": ("fullgraph.layers.gemv", "_gemv_kernel"),
           "qk": ("fullgraph.layers.qk_norm_rope", "_qk_norm_rope_kv_kernel"),
           "attn": ("fullgraph.attention.paged_decode", "_paged_decode_kernel"),
           "attn_qk": ("fullgraph.attention.paged_decode_qk", "_paged_decode_qk_kernel")}

HELPERS = '''
@triton.jit
def _gtimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [tl.program_id(0)],
                                     dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _gtimer_after(x):
    """The clock once `x` (a tensor) is computed."""
    t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x.to(tl.float32)],
                                  dtype=tl.int64, is_pure=False, pack=1)
    return tl.min(tl.reshape(t, [t.numel]), 0)


@triton.jit
def _trace_store(trace_ptr, t0, t1, t2, t3):
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1)
                                                   * tl.program_id(2))
    base = trace_ptr + pid.to(tl.int64) * 4
    tl.store(base, t0)
    tl.store(base + 1, t1)
    tl.store(base + 2, t2)
    tl.store(base + 3, t3)
'''


# A fourth reading, before the top-level call named here, once the named value is computed.
MARKS = {"attn": ("finish_split", "l_i"), "attn_qk": ("finish_split", "l_i")}


class _Instrument(ast.NodeTransformer):
    def __init__(self, mark):
        self.mark = mark

    def visit_Expr(self, node):
        call = node.value
        if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("gdc_wait"):
            return [node, ast.parse("_t1 = _gtimer()").body[0]]
        if (self.mark and isinstance(call, ast.Call)
                and ast.unparse(call.func) == self.mark[0]):
            return [ast.parse(f"_t2 = _gtimer_after({self.mark[1]})").body[0], node]
        return node


def instrumented(module_name: str, kernel_name: str, out_dir: str, mark=None):
    """The kernel rebuilt with timer reads, in a module file of its own (Triton reads the
    source), with the original module's globals."""
    mod = importlib.import_module(module_name)
    jit = getattr(mod, kernel_name)
    tree = ast.parse(textwrap.dedent(inspect.getsource(jit.fn)))
    fn = tree.body[0]
    fn.args.args.append(ast.arg(arg="trace_ptr"))
    body = fn.body
    start = 1 if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)) else 0
    fn.body = (body[:start] + ast.parse("_t0 = _gtimer()\n_t1 = _t0").body
               + [_Instrument(mark).visit(s) for s in body[start:]]
               + ast.parse("_t3 = _gtimer()\n" + ("" if mark else "_t2 = _t3\n")
                           + "_trace_store(trace_ptr, _t0, _t1, _t2, _t3)").body)
    fn.body = [x for s in fn.body for x in (s if isinstance(s, list) else [s])]
    ast.fix_missing_locations(tree)
    src = ("import triton\nimport triton.language as tl\n" + HELPERS + "\n\n"
           + ast.unparse(tree) + "\n")
    path = os.path.join(out_dir, f"clocked_{kernel_name.strip('_')}.py")
    with open(path, "w") as f:
        f.write(src)
    ns = dict(vars(mod))
    ns["__file__"] = path
    exec(compile(src, path, "exec"), ns)
    return ns[kernel_name]


class Tracer:
    """Stands in for a kernel: `[grid](...)` launches the clocked kernel with a slot of the
    trace buffer, recording which launches are captured into a graph."""

    def __init__(self, name: str, kernel, buf: torch.Tensor, launches: list):
        self.name, self.kernel, self.buf, self.launches = name, kernel, buf, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            programs = math.prod(grid)
            last = self.launches[-1] if self.launches else (None, 0, 0, None)
            start = last[1] + -(-last[2] // 16) * 16
            if (start + programs * 4) > self.buf.numel():
                raise RuntimeError("trace buffer full")
            capturing = torch.cuda.is_current_stream_capturing()
            self.launches.append((self.name, start, programs * 4, capturing))
            return self.kernel[grid](*args, trace_ptr=self.buf[start:], **kwargs)
        return launch


def report(buf: torch.Tensor, launches: list) -> None:
    trace = buf.cpu().numpy()
    rows = []
    for name, start, n, captured in launches:
        if not captured:
            continue
        t = trace[start:start + n].reshape(-1, 4)
        if (t == 0).any():
            continue                   # a launch of another graph
        rows.append((name, t[:, 0].min(), t[:, 1].min(), t[:, 1].max(), t[:, 3].max(),
                     np.median(t[:, 2]), t[:, 2].max(), np.median(t[:, 3])))
    if not rows:
        print("no traced launch in the replayed graph")
        return
    t0 = rows[0][1]
    names = [r[0] for r in rows]
    attn = [i for i, n in enumerate(names) if n.startswith("attn")]
    period = attn[1] - attn[0]
    first = attn[0] - names[attn[0]::-1].index("gemv")     # the layer's qkv GEMV
    print(f"{len(rows)} traced kernels, first start to last end "
          f"{(max(r[4] for r in rows) - t0) / 1e3:.1f} us, period {period}")
    stats = []
    for j in range(period):
        idx = [first + layer * period + j for layer in range(len(attn))]
        idx = [i for i in idx if 0 < i < len(rows)]
        b = [rows[i][2] - rows[i - 1][4] for i in idx]
        w = [rows[i][4] - rows[i][2] for i in idx]
        sp = [rows[i][3] - rows[i][2] for i in idx]
        e = [rows[i][2] - rows[i][1] for i in idx]
        mk = [rows[i][5] - rows[i][2] for i in idx]
        mx = [rows[i][6] - rows[i][2] for i in idx]
        em = [rows[i][7] - rows[i][2] for i in idx]
        stats.append((names[first + j],
                      *(np.median(x) / 1e3 for x in (b, w, sp, e, mk, mx, em))))
    print(f"  {'kernel':8s} {'boundary':>9s} {'work':>7s} {'spread':>7s} {'early':>7s} "
          f"{'mark med':>9s} {'mark max':>9s} {'end med':>8s}  (µs)")
    for name, b, w, sp, e, mk, mx, em in stats:
        print(f"  {name:8s} {b:9.2f} {w:7.2f} {sp:7.2f} {e:7.2f} {mk:9.2f} {mx:9.2f} {em:8.2f}")
    print(f"  layer: {sum(s[1] + s[2] for s in stats):.2f} us")
    tail = rows[first + period * len(attn):]
    for (name, s, w0, w1, e, *_), prev in zip(tail, rows[first + period * len(attn) - 1:]):
        print(f"  tail {name}: boundary {(w0 - prev[4]) / 1e3:.2f} work {(e - w0) / 1e3:.2f}")
    deltas = np.diff(np.unique(trace[trace > 0]))
    print(f"  timer: smallest step between distinct readings {deltas.min()} ns")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b-random")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--replays", type=int, default=3, help="steps reported, one after another")
    p.add_argument("--variant", help="decode_variants.py's edits, e.g. fuse+splits=8")
    a = p.parse_args()
    if a.variant:
        from decode_variants import apply     # this directory's probe
        apply(a.variant)
    buf = torch.zeros(1 << 24, dtype=torch.int64, device="cuda")
    launches: list = []
    out_dir = tempfile.mkdtemp(prefix="kernel_clock_")
    for name, (module_name, kernel_name) in TARGETS.items():
        setattr(importlib.import_module(module_name), kernel_name,
                Tracer(name, instrumented(module_name, kernel_name, out_dir, MARKS.get(name)),
                       buf, launches))
    llm = LLM(a.model, cudagraph_mode="full_decode_only", cudagraph_capture_sizes=a.batch_sizes,
              max_num_seqs=max(a.batch_sizes), compile_ahead=False)
    engine = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for b in a.batch_sizes:
        start_decoding(engine, [rng.integers(0, 50000, a.input_len).tolist() for _ in range(b)],
                       params, f"c{b}")
        for i in range(a.replays):
            torch.cuda.synchronize()
            buf.zero_()
            engine.step()
            torch.cuda.synchronize()
            print(f"batch {b}, step {i}:")
            report(buf, launches)
        drain(engine)


if __name__ == "__main__":
    main()
