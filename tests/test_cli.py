"""The `fullgraph` command line, run as a user would."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


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


def test_generate_prints_every_sample_and_its_logprobs():
    """`--n` and `--logprobs`: each sample's tokens and logprobs, as `LLM.generate` gives
    them for the same seed."""
    from fullgraph import LLM, SamplingParams
    flags = dict(n=2, logprobs=1, temperature=1.0, seed=3, max_tokens=4)
    r = run("generate", "--model", "tiny-qwen3", "--prompt", "Hello", "--n", "2",
            "--logprobs", "1", "--temperature", "1", "--sampling-seed", "3", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    printed = [(int(m[1]), float(m[2]))
               for m in re.finditer(r"^ +(\d+) +'.*?' +(-?\d+\.\d{6})", r.stdout, re.M)]
    out = LLM("tiny-qwen3").generate("Hello", SamplingParams(**flags), use_tqdm=False)[0]
    expected = [(t, round(lp[t].logprob, 6)) for c in out.outputs
                for t, lp in zip(c.token_ids, c.logprobs)]
    assert r.stdout.count("--- sample") == 2 and len(printed) == 8
    assert printed == expected


def test_generate_reports_bad_input_without_a_traceback(tmp_path):
    r = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2
    assert "error:" in r.stderr and "not a local directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_sampling_flags_are_checked_before_the_model_loads(tmp_path):
    """A bad --max-tokens is named even where the model could not load: it is checked
    first, so the user does not wait for a load to learn it."""
    r = run("generate", "--model", str(tmp_path / "missing"), "--max-tokens", "-1")
    assert r.returncode == 2
    assert "max_tokens" in r.stderr and "not a local directory" not in r.stderr


def test_max_model_len_takes_vllm_s_suffixes():
    """--max-model-len as vLLM writes it: 2k is 2,000, 1K is 1,024, 1.5k is 1,500; a
    decimal with a binary suffix, or no number, is a usage error that names the value."""
    from fullgraph.entrypoints.cli import build_parser
    for text, tokens in (("2k", 2000), ("1K", 1024), ("1.5k", 1500), ("300", 300)):
        ns = build_parser(["generate"]).parse_args(["generate", "--max-model-len", text])
        assert ns.max_model_len == tokens
    r = run("generate", "--model", "tiny-qwen3", "--prompt", "Hi", "--max-tokens", "2",
            "--max-model-len", "0.25K")
    assert r.returncode == 2 and "'0.25K'" in r.stderr and "did you mean 0.25k" in r.stderr
    r = run("generate", "--model", "tiny-qwen3", "--prompt", "Hi", "--max-tokens", "2",
            "--max-model-len", "1K", "--ignore-eos")
    assert r.returncode == 0, r.stderr


def test_version_port_range_and_python_dash_m():
    import fullgraph
    r = subprocess.run([sys.executable, "-m", "fullgraph", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"fullgraph {fullgraph.__version__}"
    for port in ("99999", "-5", "http"):
        r = run("serve", "tiny-qwen3", "--port", port)
        assert r.returncode == 2 and "a TCP port is 0-65535" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    # a port in use: said before the model loads (vLLM binds first too)
    import socket
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        r = run("serve", "tiny-qwen3", "--port", port)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "loaded" not in r.stderr and "Traceback" not in r.stderr


def test_served_connections_have_nagle_off():
    """A stream writes small chunks: asyncio turns Nagle's algorithm off on the connections
    it accepts only from a listening socket that says TCP (with it on, a streamed response on
    a reused connection waited ~40 ms for the client's delayed ACK)."""
    import asyncio
    import socket

    from fullgraph.entrypoints.server.cli import listening_socket

    async def nodelay_of_an_accepted_connection() -> int:
        sock = listening_socket("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        def accepted(reader, writer):
            conn = writer.get_extra_info("socket")
            seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()
        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            nodelay = await asyncio.wait_for(seen, 10)
            writer.close()
        return nodelay
    assert asyncio.run(nodelay_of_an_accepted_connection()) != 0


def test_selftest_passes_with_fake_graphs_on_cpu():
    r = run("selftest", "--model", "tiny-qwen3", "--trials", "1", "--max-num-seqs", "4",
            "--cudagraph-capture-sizes", "1 2 4 8 16 32 64 128")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "graph replays" in r.stdout
    # on a CPU the graphs are the emulator's, and the log says so
    assert "emulated graphs" in r.stdout and "CUDA graphs" not in r.stdout + r.stderr
    assert re.search(r"captured \d+ emulated graphs", r.stderr)


def test_bad_log_level_is_a_usage_error_not_a_traceback():
    r = run("--log-level", "bogus", "generate", "--help")
    assert r.returncode == 2
    assert "unknown log level 'bogus'" in r.stderr and "Traceback" not in r.stderr


def test_log_level_after_the_subcommand_and_timestamped_lines():
    r = run("generate", "--log-level", "debug", "--model", "tiny-qwen3", "--prompt", "Hi",
            "--max-tokens", "2", "--max-model-len", "64", "--num-gpu-blocks-override", "9",
            "--block-size", "16")
    assert r.returncode == 0, r.stderr
    # "LEVEL MM-DD HH:MM:SS.mmm [logger] message", and the usable blocks (block 0 is the null
    # block), as the errors and /metrics count them
    assert re.search(r"^INFO \d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[fullgraph\.engine\.engine\] "
                     r"KV cache: 8 blocks of 16 tokens", r.stderr, re.M), r.stderr
    assert re.search(r"^DEBUG ", r.stderr, re.M) or "DEBUG" not in r.stderr


def test_help_shows_defaults_and_vllm_flags():
    r = run("serve", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for flag in ("--enable-prefix-caching, --no-enable-prefix-caching", "--tokenizer",
                 "--chat-template", "--generation-config", "--disable-log-stats"):
        assert flag in text, flag
    assert "--max-num-seqs MAX_NUM_SEQS (default: 256)" in text
    assert "(default: auto)" in text
    # once per flag, and never a default of None
    assert "(default: None)" not in text
    assert not re.search(r"\(default: [^)]*\) \(default:", text), text
    # the server's own flags are the server's only
    other = " ".join(run("selftest", "--help").stdout.split())
    assert "--max-num-seqs" in other
    assert "--served-model-name" not in other and "--disable-log-stats" not in other


def test_subcommands_import_only_what_they_run():
    """`fullgraph serve` must not need the benchmarks' HTTP client, nor `--help` any
    subcommand module."""
    code = ("import sys; from fullgraph.entrypoints.cli import build_parser; "
            "build_parser(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.startswith(('fullgraph.entrypoints', "
            "'httpx'))))")

    def imported(*argv):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout
    top = imported()
    assert "bench" not in top and "server" not in top and "generate" not in top
    serve = imported("serve", "tiny-qwen3")
    assert "fullgraph.entrypoints.server.cli" in serve
    assert "httpx" not in serve and "bench" not in serve
    assert "fullgraph.entrypoints.bench.serve" in imported("bench", "serve")


def test_bench_latency_on_a_cpu_says_it_ran_eagerly(tmp_path):
    r = run("bench", "latency", "--model", "tiny-qwen3", "--batch-sizes", "1", "--input-len",
            "8", "--output-len", "4", "--modes", "graph", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "no CUDA graphs" in r.stdout and "None" not in r.stdout
    assert "[graph] batch" not in r.stdout
    # both modes asked for (the default): the eager one runs once, not twice
    r = run("bench", "latency", "--model", "tiny-qwen3", "--batch-sizes", "1", "--input-len",
            "8", "--output-len", "4", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "only the eager mode runs" in r.stdout and r.stdout.count("] batch    1:") == 1


def test_bench_throughput_reports_greedy_and_sampled(tmp_path):
    import json
    r = run("bench", "throughput", "--model", "tiny-qwen3", "--num-prompts", "4", "--min-len",
            "8", "--max-len", "16", "--top-p", "0.9", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "bench_throughput.json").read_text())
    assert [run["sampling"]["temperature"] for run in data["runs"]] == [0.0, 0.6]
    assert data["runs"][1]["sampling"]["top_p"] == 0.9
    assert 0 < data["sampled_over_greedy"] and "sampled / greedy" in r.stdout


def test_benches_draw_text_prompts_for_a_vision_language_model(tmp_path):
    """Random prompts never hold an image placeholder (tiny-qwen3-vl's vocabulary is 752 ids,
    three of them the vision tokens): a prompt with image tokens needs images."""
    for args in (["throughput", "--num-prompts", "16", "--min-len", "64", "--max-len", "128"],
                 ["latency", "--batch-sizes", "2", "--input-len", "256", "--output-len", "4"]):
        r = run("bench", *args, "--model", "tiny-qwen3-vl", "--out", str(tmp_path))
        assert r.returncode == 0, r.stderr


def test_bench_compares_the_batch_invariant_mode_in_one_run(tmp_path):
    import json
    r = run("bench", "latency", "--model", "tiny-qwen3", "--batch-sizes", "1", "--input-len",
            "8", "--output-len", "6", "--modes", "eager", "--compare-batch-invariant",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    modes = json.loads((tmp_path / "bench_latency.json").read_text())["modes"]
    assert [m["mode"] for m in modes] == ["eager", "eager (batch-invariant)"]
    assert modes[1]["rows"][0]["over_normal_ms_per_step"] > 0
    assert "the normal mode's ms/step" in r.stdout and "batch-invariant mode" in r.stderr
    # each run's row lines name its mode
    assert re.search(r"^\[eager\] batch +1: [\d.]+ ms/step", r.stdout, re.M)
    assert re.search(r"^\[eager \(batch-invariant\)\] batch +1: [\d.]+ ms/step", r.stdout,
                     re.M)
    r = run("bench", "throughput", "--model", "tiny-qwen3", "--num-prompts", "3", "--min-len",
            "8", "--max-len", "12", "--temperature", "0", "--compare-batch-invariant",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "bench_throughput.json").read_text())
    assert len(data["runs"]) == len(data["batch_invariant_runs"]) == 1
    assert data["batch_invariant_runs"][0]["over_normal_tokens_per_s"] > 0
    assert r.stderr.count("batch-invariant mode") == 1          # the second engine only


def test_batch_invariant_flag_runs_and_names_what_cannot_keep_it():
    r = run("generate", "--model", "tiny-qwen3", "--prompt", "Hello", "--max-tokens", "3",
            "--max-model-len", "128", "--batch-invariant")
    assert r.returncode == 0, r.stderr
    assert "batch-invariant mode" in r.stderr and r.stdout.count("3 generated") == 1
    r = run("generate", "--model", "tiny-qwen3", "--prompt", "Hello", "--batch-invariant",
            "--attention-backend", "sdpa")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "attention backend 'sdpa' does not support batch-invariant mode" in r.stderr


@pytest.mark.parametrize("target", ["tiny-qwen3", "tiny-qwen3.5"])
def test_generate_with_speculative_config(target):
    r = run("generate", "--model", target, "--prompt", "Hello", "--max-tokens", "6",
            "--max-model-len", "128", "--ignore-eos", "--speculative-config",
            '{"method": "eagle3", "model": "%s-eagle3", "num_speculative_tokens": 2}' % target)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("6 generated") == 1
    assert re.search(r"speculative decoding: \d+ of \d+ draft tokens accepted", r.stdout)


def test_prefix_caching_asked_of_a_hybrid_is_named_in_one_sentence():
    r = run("generate", "--model", "tiny-qwen3.5", "--prompt", "Hello", "--enable-prefix-caching")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("prefix caching is not supported for Qwen3_5ForCausalLM: it keeps a recurrent "
            "state per request" in r.stderr), r.stderr


def test_generate_names_a_bad_speculative_config():
    r = run("generate", "--model", "tiny-qwen3", "--prompt", "Hello", "--speculative-config",
            '{"method": "eagle3", "model": "tiny-qwen3-eagle3", "num_speculative_tokens": 0}')
    assert r.returncode == 2 and "num_speculative_tokens must be an integer >= 1" in r.stderr


def test_vllm_command_lines_run_or_say_what_differs():
    """vLLM's flags that have one meaning here are accepted (tensor parallel size 1, trust
    remote code, chunked prefill, request logging); the values fullgraph cannot honor are an
    error naming the flag and why, before the model loads."""
    r = run("generate", "--model", "tiny-qwen3", "--prompt", "Hello", "--max-tokens", "2",
            "-tp", "1", "--trust-remote-code", "--enable-chunked-prefill",
            "--disable-log-requests", "--kv-cache-dtype", "auto")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("2 generated") == 1
    for flags, words in [(["--tensor-parallel-size", "2"], "one GPU"),
                         (["--pipeline-parallel-size", "2"], "one GPU"),
                         (["--quantization", "fp8"], "unquantized"),
                         (["--kv-cache-dtype", "fp8"], "model's dtype"),
                         (["--no-enable-chunked-prefill"], "always chunked")]:
        r = run("generate", "--model", "tiny-qwen3", "--prompt", "Hello", *flags)
        assert r.returncode == 2 and words in r.stderr and flags[0] in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "loaded" not in r.stderr
