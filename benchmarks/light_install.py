"""A user who only reads: wall time and peak memory of reading one image in a fresh process, and the size of
the environment, for clip4str's light install against RapidOCR's recognizer, side by side in one run.

    python benchmarks/light_install.py --clip4str-python /tmp/light/bin/python --rapidocr-python /tmp/rapid/bin/python

Each interpreter belongs to its own virtual environment: `pip install clip4str` (the base package: ONNX Runtime,
the built-in model's graphs, no PyTorch) and `pip install rapidocr onnxruntime`. Every read is a new process
(start-up, model load, one image), repeated and reported as the median wall time and the largest peak RSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIP4STR = "from clip4str.cli import main; import sys; sys.exit(main(['read', sys.argv[1]]))"
RAPIDOCR = ("import sys, numpy as np; from PIL import Image; from rapidocr import RapidOCR\n"
            "r = RapidOCR()(np.asarray(Image.open(sys.argv[1]).convert('RGB')), use_det=False, use_cls=False, "
            "use_rec=True)\nprint(sys.argv[1], r.txts[0] if r.txts else '', sep='\\t')")


def one_read(python: str, code: str, image: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one fresh process reading the image."""
    start = time.perf_counter()
    proc = subprocess.Popen([python, "-c", code, str(image)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=ROOT)
    out = proc.stdout.read().decode()
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return time.perf_counter() - start, usage.ru_maxrss / 1024, out.strip()


def environment_mb(python: str) -> float:
    """Disk size of the virtual environment an interpreter belongs to."""
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                            check=True).stdout.strip()
    total = sum(p.stat().st_size for p in Path(prefix).rglob("*") if p.is_file() and not p.is_symlink())
    return total / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip4str-python", required=True)
    ap.add_argument("--rapidocr-python", required=True)
    ap.add_argument("--image", type=Path, default=ROOT / "examples" / "hello.png")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    peers = {"clip4str (light install)": (args.clip4str_python, CLIP4STR),
             "RapidOCR (PP-OCRv6 rec)": (args.rapidocr_python, RAPIDOCR)}
    runs: dict[str, list[tuple[float, float, str]]] = {name: [] for name in peers}
    for _ in range(args.repeats):  # interleaved, so that a noisy CPU affects both alike
        for name, (python, code) in peers.items():
            runs[name].append(one_read(python, code, args.image))
    print("| reader | environment (MB) | wall per read, median (s) | peak memory (MB) | output |")
    print("|:--|--:|--:|--:|:--|")
    for name, (python, _) in peers.items():
        walls = [w for w, _, _ in runs[name]]
        print(f"| {name} | {environment_mb(python):.0f} | {statistics.median(walls):.2f} | "
              f"{max(m for _, m, _ in runs[name]):.0f} | {runs[name][-1][2]} |")
    base = {name: (statistics.median(w for w, _, _ in r), max(m for _, m, _ in r)) for name, r in runs.items()}
    (c_wall, c_mem), (r_wall, r_mem) = base.values()
    print(f"\nclip4str / RapidOCR: wall {c_wall / r_wall:.2f}x, peak memory {c_mem / r_mem:.2f}x "
          f"({args.repeats} fresh processes each, interleaved; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
