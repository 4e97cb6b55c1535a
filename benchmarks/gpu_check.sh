#!/usr/bin/env bash
# The GPU tests on a CUDA machine, file by file, each under its own time limit, a summary
# line per file last:
#   bash benchmarks/gpu_check.sh [SECONDS_PER_FILE] [TEST_FILE_OR_NODE_ID ...]
# (default: 300 s, every tests/test_gpu_*.py). Wheels the GPU image lacks (fla-core, einops)
# are installed from .whl/ when it exists; the whole log goes to $OUT/gpu_check.log when
# OUT is set. PYTEST_ADDOPTS passes more pytest options (for example -k).
set -uo pipefail
cd "$(dirname "$0")/.."
limit=${1:-300}
shift || true
. benchmarks/device_env.sh
log=${OUT:-$(mktemp -d)}/gpu_check.log
files=("$@")
[ ${#files[@]} -eq 0 ] && files=(tests/test_gpu_*.py)
summary=()
for f in "${files[@]}"; do
    start=$SECONDS
    echo "=== $f" >>"$log"
    from=$(wc -l <"$log")
    timeout "$limit" python3 -m pytest -q -m gpu "$f" >>"$log" 2>&1
    rc=$?
    last=$(tail -n +"$((from + 1))" "$log" | grep -E "passed|failed|error|skipped" | tail -1)
    summary+=("$(printf '%-60s rc=%-3s %4ss  %s' "$f" "$rc" $((SECONDS - start)) "$last")")
done
grep -E "^(FAILED|ERROR) " "$log" | head -40
printf '%s\n' "${summary[@]}"
