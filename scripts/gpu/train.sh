#!/bin/bash
# Continue the built-in model on an offline GPU host for a fixed time and bring back float16 weights.
# Run from the repository root with the bundle of scripts/gpu/bundle.sh beside it:
#   OUT=results scripts/gpu/train.sh TRAIN_SECONDS [BUNDLE] [config overrides ...]
# Everything goes to $OUT/log.txt as it happens (a pipe through grep or tail holds output back, and a command
# killed at its time limit then shows nothing). A step that hangs is stopped with SIGABRT, on which Python's
# fault handler prints every thread's stack.
set -u
T0=$(date +%s)
SECONDS_TRAIN=$1; BUNDLE=${2:-.devcarry}; shift $(( $# >= 2 ? 2 : 1 ))
OUT=${OUT:-gpu-results}; mkdir -p "$OUT/w"
exec >"$OUT/log.txt" 2>&1
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
if ! python3 -c "import open_clip, lmdb, ftfy" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$BUNDLE"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
D=/tmp/clip4str-data; mkdir -p $D
tar -C $D -xJf "$BUNDLE/fonts.tar.xz" && tar -C $D -xf "$BUNDLE/bgs.tar" && tar -C $D -xJf "$BUNDLE/realtrain.tar.xz" \
  || exit 1
[ -e ../shared/realtrain/lmdb ] || { mkdir -p ../shared/realtrain && ln -s $D/rt ../shared/realtrain/lmdb; }
nvidia-smi -L; echo "cores: $(nproc)"; df -h /dev/shm /tmp
python3 -c "import torch, lightning, open_clip; print(torch.__version__, lightning.__version__, open_clip.__version__)"
CFG=configs/tiny-builtin-gpu.yaml
OV=("data.fonts=[$D/fsub]" "data.backgrounds=[$D/bgs]" "$@")
CLI=(python3 -m clip4str.cli)
say "probe"
STEPS=$(timeout -s ABRT -k 10 150 python3 scripts/gpu/probe.py "$SECONDS_TRAIN" $CFG "${OV[@]}") \
  || { say "probe failed"; exit 1; }
say "training $STEPS steps"
timeout -s TERM -k 60 $(( SECONDS_TRAIN + 90 )) "${CLI[@]}" train --config $CFG "${OV[@]}" train.max_steps="$STEPS"
say "training ended ($?)"
"${CLI[@]}" train --config $CFG "${OV[@]}" train.max_steps="$STEPS" --export-last /tmp/clip4str-w --half || exit 1
# Hosts that return files of at most 16 MB: join with `cat model.safetensors.part-* > model.safetensors`.
split -b 15M /tmp/clip4str-w/model.safetensors "$OUT/w/model.safetensors.part-"
cp /tmp/clip4str-w/config.json "$OUT/w/"
RUN=$(python3 -c "import sys; from clip4str.train.config import load_config as c; print(c(sys.argv[1], sys.argv[2:]).train.out_dir)" \
  $CFG "${OV[@]}")
cp "$RUN"/logs/run-0/metrics.csv "$OUT/"
say "exported"
timeout 45 "${CLI[@]}" bench --model /tmp/clip4str-w --device cuda --precision fp32 bf16 --repeats 20
say "done"
