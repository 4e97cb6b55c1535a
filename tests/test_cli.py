"""The `fullgraph` command line, run as a user would."""
from __future__ import annotations

import os
import subprocess
import sys


def run(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "fullgraph.entrypoints.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def test_generate_on_the_preset():
    r = run("generate", "--model", "tiny-qwen3", "--prompt", "Hello", "--prompt", "The cat",
            "--max-tokens", "5", "--max-model-len", "128", "--ignore-eos",
            "--num-gpu-blocks-override", "64")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("5 generated") == 2
    assert "tokens/s on cpu" in r.stdout


def test_generate_reports_bad_input_without_a_traceback(tmp_path):
    r = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2
    assert "error:" in r.stderr and "neither a local directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_selftest_passes_with_fake_graphs_on_cpu():
    r = run("selftest", "--model", "tiny-qwen3", "--trials", "1", "--max-num-seqs", "4",
            "--cudagraph-capture-sizes", "1 2 4 8 16 32 64 128")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "graph replays" in r.stdout
