"""Probe: where a decode step's time goes, from clocks read inside the kernels.

    python benchmarks/probes/kernel_clock.py --batch-sizes 1 8

The profiler gives each kernel's first start and last end, but with PDL a kernel starts
long before its predecessor ends, so its duration says little. This probe rebuilds the
decode step's Triton kernels (the GEMVs, the q/k kernel, decode attention) with reads of
`%globaltimer` (32 ns steps on an H100) in every program: at its start, right after its PDL
wait, at its end and at the marks in `MARKS`, stored to a buffer (a slot per launch in the
graph, rewritten by every replay). From one replay it prints, per kernel of a decoder layer
(median over layers, µs):

  boundary   from the predecessor's last program end to this kernel's first wait return
             (the drain, the memory flush and the wait's release);
  work       from that wait return to this kernel's last program end;
  spread     first to last wait return over its programs (programs that start late);
  early      first wait return minus first program start (the time it had before its wait);
  end med    the median program's end, from the first wait return;
  marks      for the kernels in MARKS (decode attention: q loaded, the q.k scores, the
             probabilities, before the split merge): the median and the last program's
             reading, from the first wait return.

boundary + work of consecutive kernels sum to the step. The reads add a few instructions
and stores per program; a mark adds a reduction over the program's threads.
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

from fullgraph import LLM
from profile_step import decoding_batches   # this directory's probe

TARGETS = {"gemv": ("fullgraph.layers.gemv", "_gemv_kernel"),
           "qk": ("fullgraph.layers.qk_norm_rope", "_qk_norm_rope_kv_kernel"),
           "attn": ("fullgraph.attention.paged_decode", "_paged_decode_kernel"),
           "attn_qk": ("fullgraph.attention.paged_decode_qk", "_paged_decode_qk_kernel")}

HELPERS = """
@triton.jit
def _gtimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [tl.program_id(0)],
                                     dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _gtimer_after(x):
    # the clock once every thread has its part of `x` (a tensor)
    t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x.to(tl.float32)],
                                  dtype=tl.int64, is_pure=False, pack=1)
    return tl.max(tl.reshape(t, [t.numel]), 0)


@triton.jit
def _record(trace_ptr):
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1)
                                                   * tl.program_id(2))
    return trace_ptr + pid.to(tl.int64) * 8
"""

RECORD = 8                             # per program: start, wait, end, up to 5 marks
# Extra readings per kernel, in record order: ("after", v) once the first assignment to `v`
# has its value (inside a loop: the last iteration's), ("before", f, v) before the call of
# `f` once `v` is computed.
MARKS = {"attn": [("after", "q"), ("after", "qk"), ("after", "pr"),
                  ("before", "finish_split", "l_i")],
         "attn_qk": [("before", "finish_split", "l_i")]}


class _Instrument(ast.NodeTransformer):
    def __init__(self, marks):
        self.marks, self.done = marks, set()

    def _mark(self, i: int, value: str):
        self.done.add(i)
        return ast.parse(f"_m{i} = _gtimer_after({value})").body[0]

    def visit_Expr(self, node):
        call = node.value
        if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("gdc_wait"):
            return [node, ast.parse("_t1 = _gtimer()").body[0]]
        for i, m in enumerate(self.marks):
            if (m[0] == "before" and i not in self.done and isinstance(call, ast.Call)
                    and ast.unparse(call.func) == m[1]):
                return [self._mark(i, m[2]), node]
        return node

    def visit_Assign(self, node):
        names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        for i, m in enumerate(self.marks):
            if m[0] == "after" and i not in self.done and m[1] in names:
                return [node, self._mark(i, m[1])]
        return node

    def generic_visit(self, node):
        super().generic_visit(node)
        for field in ("body", "orelse"):      # statements that became lists
            stmts = getattr(node, field, None)
            if isinstance(stmts, list):
                setattr(node, field, [x for s in stmts
                                      for x in (s if isinstance(s, list) else [s])])
        return node


def instrumented(module_name: str, kernel_name: str, out_dir: str, marks=()):
    """The kernel rebuilt with timer reads, in a module file of its own (Triton reads the
    source), with the original module's globals."""
    mod = importlib.import_module(module_name)
    jit = getattr(mod, kernel_name)
    tree = ast.parse(textwrap.dedent(inspect.getsource(jit.fn)))
    fn = tree.body[0]
    fn.args.args.append(ast.arg(arg="trace_ptr"))
    body = fn.body
    start = 1 if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)) else 0
    inst = _Instrument(list(marks))
    fn.body = body[start:]
    inst.visit(fn)
    if len(inst.done) != len(marks):
        raise ValueError(f"{kernel_name}: marks not found: {marks}")
    init = "_t0 = _gtimer()\n_t1 = _t0\n" + "".join(f"_m{i} = _t0\n" for i in range(len(marks)))
    stores = ["_t0", "_t1", "_gtimer()"] + [f"_m{i}" for i in range(len(marks))]
    fin = "_rec = _record(trace_ptr)\n" + "".join(f"tl.store(_rec + {j}, {v})\n"
                                                   for j, v in enumerate(stores))
    fn.body = body[:start] + ast.parse(init).body + fn.body + ast.parse(fin).body
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
            n = math.prod(grid) * RECORD
            start = self.launches[-1][1] + self.launches[-1][2] if self.launches else 0
            if start + n > self.buf.numel():
                raise RuntimeError("trace buffer full")
            capturing = torch.cuda.is_current_stream_capturing()
            self.launches.append((self.name, start, n, capturing))
            return self.kernel[grid](*args, trace_ptr=self.buf[start:], **kwargs)
        return launch


def report(buf: torch.Tensor, launches: list) -> None:
    trace = buf.cpu().numpy()
    rows = []
    for name, start, n, captured in launches:
        if not captured:
            continue
        t = trace[start:start + n].reshape(-1, RECORD)
        if (t[:, :3] == 0).any():
            continue                   # a launch of another graph
        wait = t[:, 1].min()
        marks = [(np.median(t[:, 3 + i]) - wait, t[:, 3 + i].max() - wait)
                 for i in range(len(MARKS.get(name, ())))]
        rows.append((name, t[:, 0].min(), wait, t[:, 1].max(), t[:, 2].max(),
                     np.median(t[:, 2]) - wait, marks))
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
    print(f"  {'kernel':8s} {'boundary':>9s} {'work':>7s} {'spread':>7s} {'early':>7s} "
          f"{'end med':>8s}  marks: median / last program  (µs from the first wait)")
    total = 0.0
    for j in range(period):
        idx = [first + layer * period + j for layer in range(len(attn))]
        idx = [i for i in idx if 0 < i < len(rows)]
        def med(f):                    # median over the layers of f(row, previous row)
            return np.median([f(rows[i], rows[i - 1]) for i in idx]) / 1e3

        b, w = med(lambda r, p: r[2] - p[4]), med(lambda r, p: r[4] - r[2])
        total += b + w
        name = names[first + j]
        marks = "  ".join(f"{m[1] if m[0] == 'after' else m[2]} "
                          f"{med(lambda r, p, k=k: r[6][k][0]):.2f}/"
                          f"{med(lambda r, p, k=k: r[6][k][1]):.2f}"
                          for k, m in enumerate(MARKS.get(name, ())))
        print(f"  {name:8s} {b:9.2f} {w:7.2f} {med(lambda r, p: r[3] - r[2]):7.2f} "
              f"{med(lambda r, p: r[2] - r[1]):7.2f} {med(lambda r, p: r[5]):8.2f}  {marks}")
    print(f"  layer: {total:.2f} us")
    tail = rows[first + period * len(attn):]
    for row, prev in zip(tail, rows[first + period * len(attn) - 1:]):
        print(f"  tail {row[0]}: boundary {(row[2] - prev[4]) / 1e3:.2f} work "
              f"{(row[4] - row[2]) / 1e3:.2f}")
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
                Tracer(name, instrumented(module_name, kernel_name, out_dir,
                                          MARKS.get(name, ())), buf, launches))
    llm = LLM(a.model, cudagraph_mode="full_decode_only", cudagraph_capture_sizes=a.batch_sizes,
              max_num_seqs=max(a.batch_sizes), compile_ahead=False)
    engine = llm.engine
    for b in decoding_batches(engine, a.batch_sizes, a.input_len, 32, "c"):
        for i in range(a.replays):
            torch.cuda.synchronize()
            buf.zero_()
            engine.step()
            torch.cuda.synchronize()
            print(f"batch {b}, step {i}:")
            report(buf, launches)


if __name__ == "__main__":
    main()
