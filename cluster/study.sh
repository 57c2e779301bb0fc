#!/usr/bin/env bash
# The text-prior study of docs/results.md: does the class stream help on polysemous keypoint names with a
# language prior, and not without one? Run from the project root:
#
#   cluster/study.sh OUT [--seeds 0,1,2] [--epochs 12] [--ablations full,baseline,cls_only]
#                        [--rules polysemy,default] [--encoders clip,wordllama]
#
# For each split rule (pipelines.synthetic --split-rule: the polysemy-stress split and the default one) it
# makes the synthetic set, its shards, and one embedding table per text encoder (the random tiny CLIP's and
# the packaged prior's); starts a one-machine cluster (cluster/local.sh: Ray head + MLflow server, state in
# OUT/cluster); submits one jobs.sweep per (rule, encoder) with `ray job submit` (split 1, the ablations,
# the seeds; experiment study-<rule>, both encoders' runs in it, named apart by the encoder); writes
# jobs.report's tables and plots to OUT/report-<rule>; and stops the cluster. Everything stays in OUT;
# re-running skips what is done (finished trials are skipped by the sweep). PYTHON: the interpreter with
# the project installed (default .venv/bin/python).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "error: $*" >&2; exit 2; }

[[ $# -ge 1 && "$1" != -* ]] || { usage; exit 2; }
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"; shift
SEEDS=0,1,2 EPOCHS=12 ABLATIONS=full,baseline,cls_only RULES=polysemy,default ENCODERS=clip,wordllama
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seeds) SEEDS="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --ablations) ABLATIONS="$2"; shift 2 ;;
    --rules) RULES="$2"; shift 2 ;;
    --encoders) ENCODERS="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || die "PYTHON=$PYTHON is not an interpreter; set PYTHON to the one with capenext installed"
PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
export PATH="$(dirname "$PYTHON"):$PATH"  # the job's `python` (and `ray`) are this environment's
cd "$(dirname "$0")/.."
start=$(date +%s)

for rule in ${RULES//,/ }; do
  [[ -f "$OUT/data-$rule/annotations/mp100_split1_test.json" ]] ||
    "$PYTHON" -m pipelines.synthetic --out "$OUT/data-$rule" --split-rule "$rule" --quiet
  [[ -f "$OUT/shards-$rule/manifest.json" ]] ||
    "$PYTHON" -m pipelines.shard --data-root "$OUT/data-$rule" --out "$OUT/shards-$rule" --quiet
  for enc in ${ENCODERS//,/ }; do  # up to date tables are left as they are
    "$PYTHON" -m pipelines.embed --shards "$OUT/shards-$rule" --out "$OUT/emb-$rule-$enc" --config tiny \
      --set "model.text_encoder=$enc"
  done
done

PYTHON="$PYTHON" cluster/local.sh start --dir "$OUT/cluster" --num-cpus "$(nproc)"
trap 'cluster/local.sh stop --dir "$OUT/cluster"' EXIT
# shellcheck disable=SC1091
source "$OUT/cluster/env.sh"
for rule in ${RULES//,/ }; do
  for enc in ${ENCODERS//,/ }; do
    ray job submit --working-dir . -- python -m jobs.sweep --splits 1 --ablations "$ABLATIONS" \
      --backbones tiny --seeds "$SEEDS" --experiment "study-$rule" --clip-model tiny --clip-checkpoint random \
      --set "model.text_encoder=$enc" --epochs "$EPOCHS" --val-every "$EPOCHS" --val-episodes 20 \
      --episodes 200 --shards "$OUT/shards-$rule" --embeddings "$OUT/emb-$rule-$enc" \
      --storage-path "$OUT/runs" --num-workers 1 --cpus-per-worker 1
  done
  "$PYTHON" -m jobs.report --experiment "study-$rule" --out "$OUT/report-$rule"
done
echo "study done in $(( $(date +%s) - start )) s: reports in $OUT/report-*"
