"""clip4str against other offline recognizers on labelled crops: accuracy, 1-NED, median ms per crop.

    python benchmarks/compare.py ../shared/realdata [--model DIR] [--limit N] [--peers clip4str tesseract rapidocr]

Peers: Tesseract 5 (Debian `tesseract-ocr`, CLI, single-word mode `--psm 8`) and RapidOCR's recognition
model (PyPI `rapidocr`, its bundled PP-OCRv6 small recognizer, recognition only). A peer that is not
installed is skipped with a note. Every method reads one crop at a time (batch 1); scoring is the
36-character protocol of `clip4str test`. One table per dataset (sub-folders of a labels.tsv folder, or each
LMDB under a root).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from clip4str.charset import CHARSETS
from clip4str.evaluate import collect_benchmarks
from clip4str.metrics import Scores

Reader = Callable[[Image.Image], str]
HEADER = "| method | accuracy | 1 - NED | median ms/crop |\n|:--|--:|--:|--:|"


def clip4str_reader(model: str | None, precision: str = "fp32", compiled: bool = False, rescore: bool = True,
                    draft: bool = True, packed: bool = True, cascade: bool = True, second_look: bool = True
                    ) -> Reader:
    """Batch-1 reading with the clip4str Recognizer (built-in model unless --model); a compiled one is warmed up
    on a rendered word first, so compilation is not timed."""
    from clip4str.bench import word_image
    from clip4str.inference import Recognizer

    if precision == "onnx":  # the light install's backend: the exported graphs on ONNX Runtime
        from clip4str.onnx_backend import OnnxRecognizer

        rec = OnnxRecognizer(model)
    else:
        rec = Recognizer.from_pretrained(model, precision=precision, compiled=compiled, packed=packed)
    rec.read(word_image())
    return lambda img: rec.read(img, rescore=rescore, draft=draft, cascade=cascade,
                                second_look=second_look)[0].text


def tesseract_reader() -> Reader | None:
    """Tesseract's CLI in single-word mode, or None if it is not installed."""
    exe = shutil.which("tesseract")
    if exe is None:
        return None
    tmp = Path(tempfile.mkdtemp())

    def read(img: Image.Image) -> str:
        path = tmp / "crop.png"
        img.save(path)
        out = subprocess.run([exe, str(path), "stdout", "--psm", "8", "-l", "eng"], capture_output=True, text=True)
        return out.stdout.strip()

    return read


def rapidocr_reader() -> Reader | None:
    """RapidOCR's bundled recognition model alone (no detection, no angle classifier), or None."""
    try:
        from rapidocr import RapidOCR
    except ImportError:
        return None
    engine = RapidOCR()

    def read(img: Image.Image) -> str:
        result = engine(np.asarray(img.convert("RGB")), use_det=False, use_cls=False, use_rec=True)
        return result.txts[0] if result.txts else ""

    return read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", help="labels.tsv folders or LMDB roots")
    ap.add_argument("--model", help="clip4str checkpoint folder (default: the built-in model)")
    ap.add_argument("--peers", nargs="+", default=["clip4str", "tesseract", "rapidocr"])
    ap.add_argument("--limit", type=int, help="at most N crops per dataset (evenly spaced)")
    ap.add_argument("--clip4str-variants", nargs="+", default=["fp32"],
                    metavar="PRECISION[-compiled][-norescore][-nodraft][-nocascade][-nosecondlook][-unpacked]",
                    help="clip4str configurations, each a row: fp32, bf16, fp16 or onnx (ONNX Runtime; --model is then "
                    "an export folder), optionally -compiled (the decoding "
                    "step through torch.compile), -norescore (no joint rescoring), -nodraft (a step per character "
                    "instead of checking a draft), -nocascade (the cross branch for every crop), -nosecondlook (each "
                    "crop read once) and -unpacked (fp32 products through MKL, not oneDNN)")
    args = ap.parse_args()
    charset = CHARSETS["36"]
    makers = {"tesseract": tesseract_reader, "rapidocr": rapidocr_reader}
    for variant in args.clip4str_variants:
        precision, *flags = variant.split("-")
        makers[f"clip4str {variant}"] = lambda p=precision, f=flags: clip4str_reader(
            args.model, p, compiled="compiled" in f, rescore="norescore" not in f, draft="nodraft" not in f,
            packed="unpacked" not in f, cascade="nocascade" not in f, second_look="nosecondlook" not in f)
    readers: dict[str, Reader] = {}
    for peer in args.peers:
        for name in [m for m in makers if m.split()[0] == peer]:
            reader = makers[name]()
            if reader is None:
                print(f"note: {name} is not installed; skipped", file=sys.stderr)
            else:
                readers[name] = reader
    benches = collect_benchmarks(args.data, charset, by_folder=True)
    totals = {name: (Scores(charset), []) for name in readers}
    for bench in benches:
        n = len(bench.data)
        indices = range(n) if not args.limit or args.limit >= n else np.linspace(0, n - 1, args.limit).astype(int)
        items = [bench.data[int(i)] for i in indices]
        print(f"\n### {bench.name} ({len(items)} crops)\n\n{HEADER}")
        for name, reader in readers.items():
            scores, times = Scores(charset), []
            for item in items:
                if item is None:
                    continue
                image, label = item
                t0 = time.perf_counter()
                text = reader(image)
                times.append(1000 * (time.perf_counter() - t0))
                scores.update([text], [label], [0.0])
            totals[name][0].merge(scores)
            totals[name][1].extend(times)
            print(f"| {name} | {scores.accuracy:.2f} | {scores.one_minus_ned:.2f} | {statistics.median(times):.1f} |",
                  flush=True)
    print(f"\n### Combined\n\n{HEADER}")
    for name, (scores, times) in totals.items():
        print(f"| {name} | {scores.accuracy:.2f} | {scores.one_minus_ned:.2f} | {statistics.median(times):.1f} |")


if __name__ == "__main__":
    main()
