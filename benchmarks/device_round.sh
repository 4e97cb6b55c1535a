#!/usr/bin/env bash
# The recurring GPU benchmarks as named steps, each under its own time limit, in one device
# call (starts are scarce: batch them). Output per step in $OUT/<step>.log, the figures'
# lines printed; the GPU tests are benchmarks/gpu_check.sh's.
#   bash benchmarks/device_round.sh [SECONDS_PER_STEP] STEP...
# Steps: backends (TTFT at 4,096 tokens and latency at 1 / 32 / 128 x 512, flex vs triton),
# ttft (TTFT at 4,096 tokens), step-256 (a batch-256 decode step),
# throughput (bench throughput, flex vs triton), sampler (sampler_bench at 1 and 256 rows),
# sampler-sweep (the draw's block and programs at 256 rows), invariant
# (--compare-batch-invariant), invariant-throughput (bench throughput greedy and sampled, normal
# then in the mode), profile-invariant (profile_step.py in the mode),
# invariant-matmul (the mode's matmul against the normal one, then its few-row tiles by
# time: invariant_matmul.py --rows, --sweep-rows), invariant-attention (the mode's attention
# at decode by warps, pipeline stages and programs a tile, at today's tile and
# split: invariant_attention.py),
# prefill-attention (the triton backend's prefill kernel by query tokens a program, KV tile,
# warps and stages, against SDPA's causal kernel: prefill_attention.py),
# spec (the 0.6B EAGLE-3 pair, synchronous vs --async-scheduling), spec-32k (that pair
# with a 32,000-token draft vocabulary), spec-profile (its speculative step kernel by
# kernel), spec-hybrid (the Qwen3.5-0.8B pair), spec-4b, spec-8b (the qwen3-4b-random / qwen3-8b-random pairs,
# speculative and plain, both asynchronous), hybrid (qwen3.5-0.8b-random's decode at 1 and
# 32), paged-hybrid (its gated attention's decode kernel by splits and KV tile:
# paged_decode.py), gdn-probe (gdn_aligned.py), gdn-decode (the hybrid's decode kernels
# alone, the rule's tiles, the batch-1 layout: gdn_decode.py), hybrid-profile (profile_step.py on
# qwen3.5-0.8b-random at batch 1), eager (eager decode ms/step at 1 and 32), eager-ab (the
# same through Triton's JIT, then with direct launches: layers/launch.py), eager-profile
# (cProfile of an eager batch-1 run, eager.prof kept), eager-host (where an eager step's host
# time goes: eager_host.py), eager-gpu (an eager step's kernels and the GPU's idle gaps),
# prefill-profile (an 8,192-token prefill step kernel by kernel: prefill_profile.py),
# cudagraph-modes (NONE vs PIECEWISE vs FULL: bench throughput, then a served run at 32
# concurrent requests; the server's wheels in .whl/, benchmarks/device_env.sh), serve-modes
# (its served runs alone), lazy-capture (a lazy capture's parts: lazy_capture.py),
# hybrid-ttft (qwen3.5-0.8b-random's 4,096-token TTFT, flex vs triton).
set -uo pipefail
cd "$(dirname "$0")/.."
limit=${1:-120}
shift || true
. benchmarks/device_env.sh
out=${OUT:-$(mktemp -d)}
bench="python3 -m fullgraph.entrypoints.cli bench"

run() {   # run NAME COMMAND...: the command under the step limit, its figures' lines printed
    local name=$1 start=$SECONDS
    shift
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    echo "=== $name: rc=$? $((SECONDS - start))s"
    local figures="^\[|tok/s|ms per|^[a-z_]+ +[0-9.n]|equal|differ|fastest|^\{|^=== |^idle"
    grep -E "$figures|^ *[0-9]+ +[0-9.]+ us" "$out/$name.log" | tail -40
}

latency() {   # latency NAME ARGS...: `bench latency --modes graph` as step NAME
    local name=$1
    shift
    run "$name" $bench latency --modes graph --out "$out/$name" "$@"
}

spec_pair() {   # spec_pair NAME SPEC_PAIRS_ARGS...: the pair's latency, sync then async
    local name=$1 dir=/tmp/$1
    shift
    run "$name-pair" python3 tests/spec_pairs.py "$@" --out "$dir"
    local spec="{\"method\": \"eagle3\", \"model\": \"$dir/drafter\",
                 \"num_speculative_tokens\": 3}"
    for mode in no-async-scheduling async-scheduling; do
        latency "$name-$mode" --model "$dir/target" --speculative-config "$spec" \
            --batch-sizes 1 8 32 --input-len 512 --output-len 128 --"$mode"
    done
    latency "$name-plain" --model "$dir/target" --batch-sizes 1 8 32 --input-len 512 \
        --output-len 128
}

served() {   # served NAME SERVE_ARGS...: a server on a free port, `bench serve` against it
    local name=$1 port
    shift
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m fullgraph.entrypoints.cli serve --port "$port" "$@" >"$out/$name.server.log" 2>&1 &
    local server=$!
    if python3 - "$port" "$limit" <<'PY'
import sys, time, urllib.request
port, limit = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit(1)
PY
    then
        run "$name" $bench serve --base-url "http://127.0.0.1:$port" --concurrency 32 \
            --num-prompts 256 --input-len 512 --output-len 128 --out "$out/$name"
    else
        echo "=== $name: the server did not answer /health"; tail -5 "$out/$name.server.log"
    fi
    kill "$server" 2>/dev/null; wait "$server" 2>/dev/null
}

nvidia-smi --query-gpu=name --format=csv,noheader
for step in "$@"; do
    case $step in
    backends)
        for be in flex triton; do
            latency "ttft-$be" --model qwen3-0.6b-random --batch-sizes 1 --input-len 4096 \
                --output-len 16 --attention-backend "$be"
            latency "latency-$be" --model qwen3-0.6b-random --batch-sizes 1 32 128 \
                --input-len 512 --output-len 64 --attention-backend "$be"
        done ;;
    throughput)
        for be in flex triton; do
            run "throughput-$be" $bench throughput --model qwen3-0.6b-random \
                --attention-backend "$be" --out "$out/throughput-$be"
        done ;;
    sampler)
        run sampler python3 benchmarks/probes/sampler_bench.py --rows 1 256 --no-old ;;
    ttft)
        latency ttft --model qwen3-0.6b-random --batch-sizes 1 --input-len 4096 \
            --output-len 8 ;;
    step-256)   # the decode step the sampler's share is taken of
        latency step-256 --model qwen3-0.6b-random --batch-sizes 256 --input-len 128 \
            --output-len 16 --cudagraph-capture-sizes 256 ;;
    invariant-throughput)   # bench throughput, greedy and sampled, normal then invariant
        run invariant-throughput $bench throughput --model qwen3-0.6b-random \
            --compare-batch-invariant --out "$out/invariant-throughput" ;;
    invariant)
        latency invariant --model qwen3-0.6b-random --compare-batch-invariant \
            --batch-sizes 1 32 128 --input-len 512 --output-len 64 ;;
    profile-invariant)
        (cd benchmarks/probes && run profile-invariant python3 profile_step.py \
            --batch-sizes 1 32 --capture-sizes 1 32 --batch-invariant --top 25) ;;
    spec) spec_pair spec --source qwen3-0.6b-random --disagree 0.3 ;;
    spec-32k)   # the 0.6B pair with a 32,000-token draft vocabulary, as published drafters
        spec_pair spec-32k --source qwen3-0.6b-random --disagree 0.3 --draft-vocab 32000 ;;
    spec-hybrid) spec_pair spec-hybrid --source qwen3.5-0.8b-random --mix 0.02 ;;
    spec-8b)   # the 8B pair (published EAGLE-3 drafters' usual target), asynchronous only
        run spec-8b-pair python3 tests/spec_pairs.py --source qwen3-8b-random --disagree 0.3 \
            --draft-vocab 32000 --out /tmp/spec-8b
        spec8='{"method": "eagle3", "model": "/tmp/spec-8b/drafter", "num_speculative_tokens": 3}'
        latency spec-8b-async --model /tmp/spec-8b/target --batch-sizes 1 8 32 --input-len 512 \
            --output-len 128 --async-scheduling --speculative-config "$spec8"
        latency spec-8b-plain-async --model /tmp/spec-8b/target --batch-sizes 1 8 32 \
            --input-len 512 --output-len 128 --async-scheduling ;;
    spec-4b)   # the 4B pair, asynchronous, speculative and plain
        run spec-4b-pair python3 tests/spec_pairs.py --source qwen3-4b-random --disagree 0.3 \
            --out /tmp/spec-4b
        spec4='{"method": "eagle3", "model": "/tmp/spec-4b/drafter", "num_speculative_tokens": 3}'
        latency spec-4b-async --model /tmp/spec-4b/target --batch-sizes 1 8 32 --input-len 512 \
            --output-len 128 --async-scheduling --speculative-config "$spec4"
        latency spec-4b-plain-async --model /tmp/spec-4b/target --batch-sizes 1 8 32 \
            --input-len 512 --output-len 128 --async-scheduling ;;
    hybrid-ttft)   # the hybrid's TTFT at 4,096 tokens, its gated attention flex vs triton
        for be in flex triton; do
            latency "hybrid-ttft-$be" --model qwen3.5-0.8b-random --batch-sizes 1 \
                --input-len 4096 --output-len 8 --attention-backend "$be"
        done ;;
    hybrid)   # the hybrid's decode against its bytes floor (issue 23)
        latency hybrid --model qwen3.5-0.8b-random --batch-sizes 1 32 --input-len 512 \
            --output-len 128 ;;
    paged-hybrid)   # the gated attention's decode kernel by splits and KV tile
        (cd benchmarks/probes && run paged-hybrid python3 paged_decode.py --heads 8 2 256 \
            --ctx 576 --batches 1 --splits 8 16 32 --tiles 32 64 --evict-l2) ;;
    eager-profile)
        run eager-profile python3 -m cProfile -o "$out/eager.prof" -m fullgraph.entrypoints.cli \
            bench latency --model qwen3-0.6b-random --batch-sizes 1 --input-len 512 \
            --output-len 64 --modes eager --out /tmp/eager-profile
        python3 -c "import pstats, sys
pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(30)" "$out/eager.prof" \
            | tail -40 | cut -c1-150 ;;
    sampler-sweep)
        (cd benchmarks/probes && run sampler-sweep python3 sampler_bench.py --rows 256 --no-old \
            --cases temperature top_p --draw-programs 528 2112 --draw-blocks 1024 2048 4096) ;;
    hybrid-profile)
        (cd benchmarks/probes && run hybrid-profile python3 profile_step.py \
            --model qwen3.5-0.8b-random --batch-sizes 1 --capture-sizes 1 --top 30) ;;
    gdn-probe) run gdn-probe python3 benchmarks/probes/gdn_aligned.py ;;
    gdn-decode) run gdn-decode python3 benchmarks/probes/gdn_decode.py ;;
    invariant-matmul)
        run invariant-matmul python3 benchmarks/probes/invariant_matmul.py --rows 1 16 32 512 8192
        run invariant-matmul-sweep python3 benchmarks/probes/invariant_matmul.py \
            --sweep-rows 1 16 32
        run invariant-matmul-sweep-many python3 benchmarks/probes/invariant_matmul.py \
            --sweep-rows 128 512 8192 ;;
    cudagraph-modes)
        for mode in none piecewise full; do
            run "throughput-$mode" $bench throughput --model qwen3-0.6b-random \
                --cudagraph-mode "$mode" --out "$out/throughput-$mode"
            served "serve-$mode" qwen3-0.6b-random --cudagraph-mode "$mode"
        done ;;
    serve-modes)   # cudagraph-modes' served runs alone
        for mode in none piecewise full; do
            served "serve-$mode" qwen3-0.6b-random --cudagraph-mode "$mode"
        done ;;
    prefill-attention)
        (cd benchmarks/probes && run prefill-attention python3 prefill_attention.py \
            --qtok 32 64 --tiles 32 64 128 --warps 4 8 --stages 2 3) ;;
    invariant-attention)
        (cd benchmarks/probes && run invariant-attention python3 invariant_attention.py \
            --batch-sizes 1 32 128 --lengths 576 4096 --tiles 64 --warps 4 8 --splits 256 \
            --stages 2 3 4 --programs 2 4) ;;
    spec-profile)   # the 0.6B pair's steps kernel by kernel (a verify step, its drafts)
        run spec-profile-pair python3 tests/spec_pairs.py --source qwen3-0.6b-random \
            --disagree 0.3 --out /tmp/spec-profile
        (cd benchmarks/probes && run spec-profile python3 profile_step.py \
            --model /tmp/spec-profile/target --batch-sizes 1 --capture-sizes 1 4 --top 40 \
            --speculative-config '{"method": "eagle3", "model": "/tmp/spec-profile/drafter",
                                   "num_speculative_tokens": 3}') ;;
    prefill-profile)
        (cd benchmarks/probes && run prefill-profile python3 prefill_profile.py) ;;
    lazy-capture)   # where a lazily captured graph's ~0.3 s goes
        (cd benchmarks/probes && run lazy-capture python3 lazy_capture.py) ;;
    eager-host)
        (cd benchmarks/probes && run eager-host python3 eager_host.py --steps 30) ;;
    eager-gpu)
        (cd benchmarks/probes && run eager-gpu python3 profile_step.py --cudagraph-mode none \
            --batch-sizes 1 --capture-sizes --steps 3 --top 14) ;;
    eager)   # --modes given again: the last one counts
        latency eager --model qwen3-0.6b-random --batch-sizes 1 32 --input-len 512 \
            --output-len 32 --modes eager ;;
    eager-ab)   # eager decode through Triton's JIT, then with our direct launches
        for direct in 0 1; do
            export FULLGRAPH_DIRECT_LAUNCH=$direct
            latency "eager-direct-$direct" --model qwen3-0.6b-random --batch-sizes 1 32 \
                --input-len 512 --output-len 32 --modes eager
        done
        unset FULLGRAPH_DIRECT_LAUNCH ;;
    *) echo "unknown step $step" ;;
    esac
done
