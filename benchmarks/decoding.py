"""Time per decoding step, a 5-letter read and full decoding against the image encoder, at batch 1, for the
decoding loops in the code: "recompute" (the whole prefix at every step, as the authors' decoder),
"eager" (the static step, `decode()`'s default) and "compiled" (the same step through torch.compile).

    python benchmarks/decoding.py                          # tiny and b16, fp32, 2 threads
    python benchmarks/decoding.py --before ../old/src      # also an older checkout's default loop, same run

With --before, each source tree is measured in its own child process, alternating, --rounds times; the table
shows medians. Step time = (26-step decode - 6-step decode) / 40 with refinement off (both branches step);
random weights never emit EOS, so every step is taken. "5-letter read" = max_length 5 with the model's
refinement; "full decode / encoder" = the default 26-step decoding over the image encoder's time alone.

    python benchmarks/decoding.py --presets builtin --crops ../shared/realdata --before ../old/src

"builtin" measures the built-in model of each tree as users run it (default decoding; PyTorch fp32 and bf16, and
the ONNX graphs of the light install): whole batch-1 reads of examples/hello.png and the median batch-1 read over
--limit real crops.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _median_ms(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def child(preset: str, threads: int, repeats: int) -> dict:
    """Measurements of the clip4str on sys.path (run in a child process)."""
    import torch

    from clip4str import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(preset).eval()
    h, w = model.config.image_size
    x = torch.randn(1, 3, h, w)
    loops = {"eager": {}}
    if "compiled" in inspect.signature(model.decode).parameters:
        loops["compiled"] = {"compiled": True}
    loops["recompute"] = {"kv_cache": False}
    out = {}
    with torch.inference_mode():
        out["encoder ms"] = _median_ms(lambda: model.encode_image(x), repeats)
        for name, opts in loops.items():
            t0 = time.perf_counter()
            model.decode(x, early_exit=False, **opts)
            first = 1000 * (time.perf_counter() - t0)

            def run(n: int, refine: int | None = 0, o: dict = opts) -> float:
                return _median_ms(lambda: model.decode(x, max_length=n, early_exit=False, refine_iters=refine, **o),
                                  repeats)

            out[f"{name}: step us"] = 1000 * (run(25) - run(5)) / 40
            out[f"{name}: 5-letter read ms"] = run(5, None)
            out[f"{name}: full decode / encoder"] = run(25, None) / out["encoder ms"]
            out[f"{name}: first call ms"] = first
    return out


def child_builtin(threads: int, repeats: int, crops: str | None, limit: int) -> dict:
    """The built-in model of the clip4str on sys.path: encoder and whole batch-1 reads of examples/hello.png,
    and the median batch-1 read over `limit` crops of a labels.tsv folder (PyTorch fp32 and bf16, ONNX)."""
    import torch
    from PIL import Image

    from clip4str.inference import Recognizer

    torch.set_num_threads(threads)
    hello = Image.open(Path(__file__).resolve().parents[1] / "examples" / "hello.png").convert("RGB")
    paths = []
    if crops:
        rows = [line.split("\t")[0] for line in (Path(crops) / "labels.tsv").read_text().splitlines()[1:]]
        n = min(limit, len(rows))
        paths = [Path(crops) / rows[int(i * len(rows) / n)] for i in range(n)]
    from clip4str.onnx_backend import OnnxRecognizer

    out = {}
    recognizers = {p: Recognizer.from_pretrained(precision=p) for p in ("fp32", "bf16")}
    recognizers["onnx"] = OnnxRecognizer()
    for name, rec in recognizers.items():
        x = rec.preprocess([hello])
        if name != "onnx":
            with torch.inference_mode(), rec.autocast():
                out[f"{name}: encoder ms"] = _median_ms(lambda r=rec, x=x: r.model.encode_image(x), repeats)
        out[f"{name}: hello read ms"] = _median_ms(lambda r=rec, x=x: r.decode_tensors(x), repeats)
        if paths:
            inputs = [rec.preprocess([Image.open(p).convert("RGB")]) for p in paths]
            out[f"{name}: real crop median ms"] = statistics.median(
                _median_ms(lambda r=rec, c=c: r.decode_tensors(c), 1) for c in inputs)
    return out


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "b16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3, help="alternating child runs per source tree")
    ap.add_argument("--before", type=Path, help="an older checkout's src/ folder, measured in the same run")
    ap.add_argument("--crops", help="with preset 'builtin': a labels.tsv folder of real crops to time reads on")
    ap.add_argument("--limit", type=int, default=300, help="crops of --crops timed (evenly spaced)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child_builtin(args.threads, args.repeats, args.crops, args.limit) if args.child == "builtin" \
            else child(args.child, args.threads, args.repeats)
        print(json.dumps(result))
        return
    trees = {"now": Path(__file__).resolve().parents[1] / "src"}
    if args.before:
        trees = {"before": args.before.resolve(), **trees}
    print(f"threads={args.threads}, batch 1, fp32, medians of {args.rounds} alternating runs of {args.repeats} "
          "repeats\n\n| preset | measure | " + " | ".join(trees) + " |\n|---|---|" + "---|" * len(trees))
    for preset in args.presets:
        runs: dict[str, list[dict]] = {t: [] for t in trees}
        for _ in range(args.rounds):
            for tree, src in trees.items():
                env = {**os.environ, "PYTHONPATH": str(src)}
                crops = ["--crops", args.crops, "--limit", str(args.limit)] if args.crops else []
                done = subprocess.run([sys.executable, __file__, "--child", preset, "--threads", str(args.threads),
                                       "--repeats", str(args.repeats), *crops], env=env, capture_output=True,
                                      text=True, check=True)
                runs[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
        keys = list(dict.fromkeys(k for r in runs.values() for k in r[0]))
        for key in keys:
            cells = [f"{statistics.median(r[key] for r in runs[t]):.3g}" if key in runs[t][0] else "-"
                     for t in trees]
            print(f"| {preset} | {key} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
