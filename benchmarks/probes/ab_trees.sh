#!/usr/bin/env bash
# A/B of code variants in the model, on one machine (run from the repo root, on the GPU):
#
#     bash benchmarks/probes/ab_trees.sh ROUNDS "BATCHES" TREE[:EDITS]...
#     bash benchmarks/probes/ab_trees.sh 2 "1 8 32" old base base:splits=8
#
# TREE "base" is this checkout; any other TREE is a copy of it (in /tmp/t_TREE) with the
# files under ab/TREE/ swapped in, each naming the file it replaces on its first line
# ("# path: fullgraph/layers/gemv.py"; keep ab/ out of commits, not out of the working tree,
# which is what travels to the device). EDITS are decode_variants.py's (default: base).
# Every run is decode_variants.py --in-process in a new process (ms/step per batch size),
# trees interleaved round by round, so drift between runs hits them alike.
export FULLGRAPH_CACHE_DIR=${FULLGRAPH_CACHE_DIR:-/tmp/fgc}
rounds=$1; batches=$2; shift 2
for spec in "$@"; do
  tree=${spec%%:*}
  [ "$tree" = base ] || [ -d "/tmp/t_$tree" ] && continue
  cp -r "$PWD" "/tmp/t_$tree"
  for f in ab/"$tree"/*.py; do cp "$f" "/tmp/t_$tree/$(head -1 "$f" | cut -d' ' -f3)"; done
done
for _ in $(seq "$rounds"); do
  for spec in "$@"; do
    tree=${spec%%:*}; edits=base; [ "$spec" = "$tree" ] || edits=${spec#*:}
    dir=$PWD; [ "$tree" = base ] || dir=/tmp/t_$tree
    (cd "$dir" && PYTHONPATH=$dir timeout 200 python benchmarks/probes/decode_variants.py \
        --batch-sizes $batches --repeats 1 --in-process "$edits" 2>&1 \
        | grep "^rep" | sed "s|^rep 0 [^ ]*|$spec|")
  done
done
