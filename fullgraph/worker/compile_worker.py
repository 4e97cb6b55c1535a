"""Triton kernel compiles in subprocesses: `CompileWorkers` (the client) and this module's
`main` (a worker: `python -m fullgraph.worker.compile_worker`).

Threads do not compile in parallel: Triton holds the GIL through most of a compile (H100,
cold capture: 26 compiles in threads took 18.7 s of thread time in 8.8 s, about two at
once; docs/benchmarks.md, seventh session). Plain subprocesses rather than
multiprocessing: spawn and forkserver re-import the user's `__main__`, which starts an
engine again in a script without a `__main__` guard.

A request is one JSON line {"module", "name", "specialization"}: the kernel
`module.name` (a `triton.jit` function) and Triton's serialized specialization of one
launch (what `JITFunction.preload` takes). The worker compiles it into the Triton cache
(TRITON_CACHE_DIR, inherited) and answers {"ok": true} or {"error": text}; the client's
process then loads the kernel from the cache. Workers need no CUDA context: compiling only
queries the device's capability. A worker ends when its input ends (`close`, or the client
process exiting).
"""
from __future__ import annotations

import importlib
import json
import os
import queue
import subprocess
import sys
import time
import traceback
import weakref
from concurrent.futures import Future, ThreadPoolExecutor


class CompileWorkers:
    """`num_workers` worker processes, started at once (a worker imports torch and Triton
    for ~5 s before its first compile) and stopped by `close`."""

    def __init__(self, num_workers: int) -> None:
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="triton-compile")
        self._idle: queue.SimpleQueue[subprocess.Popen] = queue.SimpleQueue()
        self._procs: list[subprocess.Popen] = []
        # `close()` stops them; so does collecting an unclosed one (an engine whose start
        # failed before capture)
        self.close = weakref.finalize(self, _stop, self._pool, self._procs)
        for _ in range(num_workers):
            self._idle.put(self._start())
        # (kernel, submitted, started, finished, worker pid): perf_counter seconds, for probes
        self.log: list[tuple[str, float, float, float, int]] = []

    def _start(self) -> subprocess.Popen:
        # The parent's sys.path, so the worker imports the same fullgraph.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
        self._procs.append(proc)
        return proc

    def submit(self, module: str, name: str, specialization: str) -> Future:
        request = json.dumps({"module": module, "name": name,
                              "specialization": specialization})
        return self._pool.submit(self._compile, request, f"{module}.{name}",
                                 time.perf_counter())

    def _compile(self, request: str, kernel: str, submitted: float) -> None:
        started = time.perf_counter()
        proc = self._idle.get()          # one per pool thread: never waits
        try:
            proc.stdin.write(request + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except OSError:                  # the worker is gone (broken pipe)
            line = ""
        if not line:
            self._idle.put(self._start())
            raise RuntimeError(f"compiling {kernel}: the compile worker exited "
                               f"(code {proc.wait()})")
        self._idle.put(proc)
        reply = json.loads(line)
        self.log.append((kernel, submitted, started, time.perf_counter(), proc.pid))
        if "error" in reply:
            raise RuntimeError(f"compiling {kernel}: {reply['error']}")


def _stop(pool: ThreadPoolExecutor, procs: list[subprocess.Popen]) -> None:
    pool.shutdown(wait=True, cancel_futures=True)
    for proc in procs:
        if proc.poll() is None:
            proc.stdin.close()           # the worker's loop ends at end of input
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _active_driver():
    """Triton's GPU driver, or None where Triton is missing or sees no GPU (a CPU host
    with Triton installed); each request then reports its own error."""
    try:
        import triton
        return triton.runtime.driver.active
    except (ImportError, RuntimeError):
        return None


def main() -> None:
    # Replies go to the original stdout; anything a library prints goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # Before the first request, not in it: importing torch and Triton and setting up
    # Triton's driver took ~4 s of a worker's first compile (H100 host).
    driver = _active_driver()
    if driver is not None:
        driver.get_current_target()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            kernel = getattr(importlib.import_module(request["module"]), request["name"])
            compiled = kernel.preload(request["specialization"])
            # Its launcher too: a C module built per signature (~50 ms), cached like the
            # kernel; the client otherwise builds it at its first launch.
            launcher = getattr(driver, "launcher_cls", None)
            if launcher is not None:
                launcher(compiled.src, compiled.metadata)
            reply = {"ok": True}
        except Exception:                    # reported to the client, which raises it
            reply = {"error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
