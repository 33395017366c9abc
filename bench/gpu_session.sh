#!/usr/bin/env bash
# A lent GPU machine's session, prepared: what to run there, in the order its minutes are worth.
#
#     bench/gpu_prepare.sh /path/to/nanochat    # here, once: .gpu/ (wheels, GPT-2's BPE, nanochat)
#     bench/gpu_session.sh check                # there: bench/gpu_check.py (under 8 minutes)
#     bench/gpu_session.sh vs-nanochat          # there: bench/vs_nanochat.py at nano-1B, bf16 then fp8
#     bench/gpu_session.sh train                # there: nano-125M on synthetic Python, then HumanEval
#
# Each stage fits one device call of 10 minutes. Figures and logs go to $OUT (the device call's
# folder that comes back; out/gpu-session here), at most 8 files. The machine has no package
# index: the wheels in .gpu/wheels are installed into /tmp/site first, and the repository's
# packages put on PYTHONPATH, so nothing needs building. The Python is $PY (default python3, the
# image's, which holds torch).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bench/gpu_session.sh check|vs-nanochat|train}
PY=${PY:-python3}
OUT=${OUT:-out/gpu-session}
mkdir -p "$OUT"
if [ -d .gpu/wheels ] && ! [ -f /tmp/site/.installed ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl && touch /tmp/site/.installed || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD/trainer_image:$PWD/operator:$PWD/cli:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="$PWD/.gpu/tiktoken"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.csv" 2>&1 || echo "no nvidia-smi" >"$OUT/gpu.csv"

case "$stage" in
  check)
    # Every CUDA path once; exits 1 on any failed section or past its 480 s limit, with every figure
    # in the JSON either way.
    "$PY" bench/gpu_check.py --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
    ;;
  vs-nanochat)
    # Ours against nanochat at nano-1B's shape on this GPU, bf16 then both sides in fp8 (nanochat's
    # speedrun trains with --fp8). One round each: the machine is not shared. VS_MODES picks (default
    # "bf16 fp8"; each takes ~3-5 minutes); VS_SHAPE overrides the shape flags (e.g. "--shape tiny"
    # to try the stage on a CPU).
    status=0
    for mode in ${VS_MODES:-bf16 fp8}; do
      fp8=$([ "$mode" = fp8 ] && echo --fp8)
      name=vs_nanochat${fp8:+-fp8}
      timeout 280 "$PY" bench/vs_nanochat.py --nanochat "${NANOCHAT:-.gpu/nanochat}" ${VS_SHAPE:---shape nano-1B} \
        --rounds 1 --steps 10 --warmup 3 $fp8 --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
    exit $status
    ;;
  train)
    # The phase-1 model scaled to one call: nano-125M pretrained on synthetic Python (the machine
    # reaches neither The Stack nor a teacher), validation loss on the standard library, then
    # HumanEval pass@1 on TRAIN_PROBLEMS problems (all 164, greedy). TRAIN_STEPS x 16 x 1024 tokens;
    # the default is ~25M tokens, minutes at nano-125M's expected GPU throughput. TRAIN_ARGS: more
    # top-level YAML (keys not above).
    run=/tmp/gpu-session-train
    steps=${TRAIN_STEPS:-1500}
    cat >"$run.yaml" <<YAML
preset: nano-125M
data: {source: synthetic}
steps: $steps
schedule: {warmup_steps: $((steps / 10))}
validation: {every: $((steps / 3)), tokens: 262144}
evaluation: {benchmark: humaneval, every: $steps, problems: ${TRAIN_PROBLEMS:-164}}
checkpoint: {dir: $run, every: $steps}
metrics: {port: 0, log_every: 10}
${TRAIN_ARGS:-}
YAML
    timeout 560 "$PY" -m nanochat_trainer.train --config "$run.yaml" 2>&1 | tee "$OUT/train.log"
    status=${PIPESTATUS[0]}
    cp "$run/log.jsonl" "$OUT/train-log.jsonl" 2>/dev/null
    exit "$status"
    ;;
  *)
    echo "unknown stage $stage: check, vs-nanochat or train" >&2
    exit 2
    ;;
esac
