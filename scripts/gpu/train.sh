#!/bin/bash
# Continue the built-in model on an offline GPU host for a wall-clock budget and bring back float16 weights.
# Run from the repository root with the bundle of scripts/gpu/bundle.sh beside it:
#   OUT=results scripts/gpu/train.sh MINUTES [BUNDLE] [config overrides ...]
# Trains configs/tiny-builtin-gpu.yaml for MINUTES of training (train.max_minutes: warm-up and annealing fit the
# budget whatever the step rate), exports the last checkpoint as float16 (also after a SIGTERM or a crash that
# left a checkpoint) and benches it. Everything goes to $OUT/log.txt as it happens. PYTHON picks the
# interpreter (default python3).
set -u
T0=$(date +%s)
MINUTES=$1; BUNDLE=${2:-.devcarry}; shift $(( $# >= 2 ? 2 : 1 ))
OUT=${OUT:-gpu-results}; mkdir -p "$OUT/w"
exec >"$OUT/log.txt" 2>&1
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=${PYTHON:-python3}
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
if ! "$PY" -c "import open_clip, lmdb, ftfy" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$BUNDLE"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
D=$(mktemp -d /tmp/clip4str-data.XXXX); trap 'rm -rf "$D"' EXIT
tar -C "$D" -xJf "$BUNDLE/fonts.tar.xz" && tar -C "$D" -xf "$BUNDLE/bgs.tar" && tar -C "$D" -xJf "$BUNDLE/realtrain.tar.xz" \
  || exit 1
for db in lmdb ic13-train; do  # the config names them under ../shared/realtrain, as on the development machine
  # A link left by an earlier run points into its deleted $D: replace dangling links, never real data.
  if [ ! -e "../shared/realtrain/$db" ]; then
    mkdir -p ../shared/realtrain && ln -sfn "$D/realtrain/$db" "../shared/realtrain/$db" || exit 1
  fi
done
command -v nvidia-smi >/dev/null && nvidia-smi -L; echo "cores: $(nproc)"
"$PY" -c "import torch, lightning, open_clip; print(torch.__version__, lightning.__version__, open_clip.__version__)"
CFG=configs/tiny-builtin-gpu.yaml
# Each call its own run folder (a later call on the same host must not meet this one's last.ckpt); an
# out_dir among the overrides still wins.
OV=("data.fonts=[$D/fsub]" "data.backgrounds=[$D/bgs]" "train.max_minutes=$MINUTES"
    "train.out_dir=runs/tiny-builtin-gpu-$T0" "$@")
CLI=("$PY" -m clip4str.cli)
RUN=$("$PY" -c "import sys; from clip4str.train.config import load_config as c; print(c(sys.argv[1], sys.argv[2:]).train.out_dir)" \
  $CFG "${OV[@]}") || exit 1
say "training for $MINUTES minutes into $RUN"
# A safety net only: the budget ends the run; SIGTERM would still leave a checkpoint to export.
timeout -s TERM -k 60 "$(( ${MINUTES%.*} * 60 + 300 ))" "${CLI[@]}" train --config $CFG "${OV[@]}"
say "training ended ($?)"
# Only what this call trained: a checkpoint written since it started.
if [ ! -f "$RUN/last.ckpt" ] || [ "$(stat -c %Y "$RUN/last.ckpt")" -lt "$T0" ]; then
  say "no checkpoint of this run in $RUN: nothing to export"; exit 1
fi
"${CLI[@]}" train --config $CFG "${OV[@]}" --export-last "$D/w" --half || exit 1
# Hosts that return files of at most 16 MB: join with `cat model.safetensors.part-* > model.safetensors`.
split -b 15M "$D/w/model.safetensors" "$OUT/w/model.safetensors.part-"
cp "$D/w/config.json" "$OUT/w/"
cp "$RUN"/logs/run-*/metrics.csv "$OUT/" 2>/dev/null
say "exported"
DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
timeout 60 "${CLI[@]}" bench --model "$D/w" --device "$DEVICE" --precision fp32 bf16 --repeats 20
say "done"
