"""Runs a check script under Triton's CPU interpreter (TRITON_INTERPRET=1) in a fresh process,
for the CPU suite's kernel tests (test_*_interpret.py): the interpreter is chosen when
Triton's decorators run, so it cannot be turned on inside the test process.

Triton 3.6's interpreter turns a loop bound into an int with int(array), which numpy >= 2.3
refuses for a 1-element array that is not 0-d; `numpy_shim` indexes the element instead.
"""
from __future__ import annotations

import os
import runpy
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def numpy_shim() -> None:
    import triton.runtime.interpreter as interpreter
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interpreter._patch_lang_tensor = patched


def run(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`script` (a path) with `args`, interpreted; its output captured."""
    path = os.pathsep.join([os.path.join(HERE, ".."), HERE, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, __file__, script, *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


if __name__ == "__main__":
    numpy_shim()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
