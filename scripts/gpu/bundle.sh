#!/bin/bash
# Pack what training on an offline GPU host needs beside the repository into BUNDLE (default .devcarry/,
# which .git/info/exclude should list): fonts subset to printable ASCII (same coverage, a tenth of the size),
# wallpapers shrunk to 1024 px, the real training LMDBs, and wheels of the packages such a host may lack.
# Usage: scripts/gpu/bundle.sh [BUNDLE] [PYTHON_VERSION_OF_THE_HOST]
# MAX_FONTS / MAX_BACKGROUNDS limit how many are packed and WHEELS=0 skips the wheels (the test suite's rehearsal).
set -euo pipefail
BUNDLE=${1:-.devcarry}; PYV=${2:-3.12}
PY=${PYTHON:-.venv/bin/python}
rm -rf "$BUNDLE/whl"; mkdir -p "$BUNDLE/whl"  # a wheel of an earlier call beside a newer one: pip refuses both
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PY" - "$TMP/fsub" "$TMP/bgs" "${MAX_FONTS:-100000}" "${MAX_BACKGROUNDS:-100000}" <<'PY'
import sys
from pathlib import Path
from fontTools import subset
from PIL import Image
fonts, bgs, max_fonts, max_bgs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
opts = subset.Options(layout_features=["*"], name_IDs=["*"], notdef_outline=True, glyph_names=True, hinting=True,
                      legacy_kern=True)
text = "".join(map(chr, range(32, 127)))
fonts_in = [p for p in sorted(Path("/usr/share/fonts").rglob("*")) if p.suffix.lower() in {".ttf", ".otf"}]
for p in fonts_in[:max_fonts]:
    out = fonts / p.relative_to("/usr/share/fonts")
    out.parent.mkdir(parents=True, exist_ok=True)
    font = subset.load_font(str(p), opts)
    sub = subset.Subsetter(opts)
    sub.populate(text=text)
    sub.subset(font)
    subset.save_font(font, str(out), opts)
bgs.mkdir()
images = [p for p in sorted(Path("/usr/share/backgrounds").rglob("*")) if p.suffix.lower() in {".jpg", ".jpeg", ".png"}]
for i, p in enumerate(images[:max_bgs]):
    img = Image.open(p).convert("RGB")
    img.thumbnail((1024, 1024))
    img.save(bgs / f"{i:03d}-{p.stem}.jpg", quality=85)
PY
for db in lmdb ic13-train; do mkdir -p "$TMP/realtrain/$db" && cp "../shared/realtrain/$db/data.mdb" "$TMP/realtrain/$db/"; done
tar -C "$TMP" -cJf "$BUNDLE/fonts.tar.xz" fsub
tar -C "$TMP" -cf "$BUNDLE/bgs.tar" bgs
tar -C "$TMP" -cJf "$BUNDLE/realtrain.tar.xz" realtrain
[ "${WHEELS:-1}" = 0 ] && { du -sh "$BUNDLE"; exit 0; }
OC=$("$PY" -c "import importlib.metadata as m; print(m.version('open_clip_torch'))")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$BUNDLE/whl" "open_clip_torch==$OC" ftfy wcwidth lmdb
du -sh "$BUNDLE"
