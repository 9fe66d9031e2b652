"""`clip4str` command line: read, test, bench, export, serve, convert, attention, zeroshot, train, data."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path

from tqdm import tqdm

from clip4str import commands
from clip4str.argtypes import device_name, port_number, positive_int, positive_number, word_template
from clip4str.charset import CHARSETS
from clip4str.data.cli import add_data_commands
from clip4str.data.folder import LABELS_NAME
from clip4str.evaluate import collect_benchmarks, format_table, run_benchmarks
from clip4str.inputs import expand_inputs
from clip4str.reading import MAX_REFINE_ITERS, MAX_WINDOWS, BaseRecognizer

# PyTorch is imported only by the commands that need it: reading with the ONNX backend runs without it.

TORCH_EXTRA = "pip install 'clip4str[torch]'"
# Packages of the [torch] extra: a command that imports one of them without it installed says what to install.
TORCH_PACKAGES = {"torch", "torchvision", "open_clip", "lightning", "safetensors", "yaml", "matplotlib",
                  "tensorboardX", "onnx", "onnxscript"}


def torch_installed() -> bool:
    """Whether PyTorch can be imported here (without importing it)."""
    return importlib.util.find_spec("torch") is not None


def recognizer(args: argparse.Namespace) -> BaseRecognizer:
    """The model named by --model, else the built-in one; `--backend auto` reads with PyTorch where it is
    installed and with ONNX Runtime (the built-in model's exported graphs) where it is not."""
    backend = getattr(args, "backend", "auto")
    if backend == "auto":
        onnx_folder = args.model is not None and any(Path(args.model).glob("*.onnx"))
        backend = "onnx" if onnx_folder or not torch_installed() else "torch"
    if backend == "onnx":
        from clip4str.onnx_backend import OnnxRecognizer, default_onnx_model_path

        if getattr(args, "compile", False):
            raise ValueError("--compile compiles PyTorch decoding; use it with --backend torch, or drop it")
        ignored = [f"--{name} {value}" for name, value, default in (("device", getattr(args, "device", "cpu"), "cpu"),
                   ("precision", getattr(args, "precision", "fp32"), "fp32")) if value != default]
        if ignored:
            verb, them = ("needs", "it") if len(ignored) == 1 else ("need", "them")
            raise ValueError(f"the ONNX backend reads in fp32 on the CPU; {' and '.join(ignored)} {verb} the PyTorch "
                             f"backend (--backend torch; {TORCH_EXTRA}), or drop {them}")
        if args.model is not None and not any(Path(args.model).glob("*.onnx")) and Path(args.model).exists():
            raise ValueError(f"{args.model} is not an ONNX export; reading it needs PyTorch ({TORCH_EXTRA}), or "
                             "export it with `clip4str export onnx` where PyTorch is installed")
        return OnnxRecognizer(args.model or default_onnx_model_path())
    if not torch_installed():
        raise ValueError(f"--backend torch needs PyTorch: {TORCH_EXTRA}, or read with --backend onnx")
    from clip4str.inference import Recognizer

    return Recognizer.from_pretrained(args.model, device=args.device, precision=args.precision,
                                      compiled=getattr(args, "compile", False))


# A file name may hold tabs and line breaks: written escaped, one image stays one line of three fields.
TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def json_line(doc: dict) -> str:
    """One JSON line, UTF-8 as it is; a file name that is not UTF-8 (its bytes kept as surrogates) is written
    with \\u escapes, so that the line stays valid JSON."""
    line = json.dumps(doc, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(doc)
    return line


def cmd_read(args: argparse.Namespace) -> int:
    """One line per image (text, tsv or json lines); failures listed on stderr and exit status 1."""
    paths = expand_inputs(args.images)
    if not paths:
        datasets = [p for p in args.images if Path(p).is_dir() and ((Path(p) / LABELS_NAME).is_file() or
                                                                   any(Path(p).rglob("data.mdb")))]
        hint = f": {datasets[0]!r} is a labelled dataset; score it with `clip4str test {datasets[0]}`" if datasets \
            else ""
        raise FileNotFoundError(f"no images to read{hint}")
    rec = recognizer(args)
    bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=len(paths) < 50 or args.quiet)
    failures, notes = [], []
    results = rec.iter_read(paths, args.batch_size, mode=args.mode, refine_iters=args.refine_iters,
                            max_windows=args.max_windows, **decoding_options(args))
    for path, r in zip(paths, results, strict=True):
        bar.update(1)
        if r.error:
            failures.append(f"{path}: {r.error}")
        if r.note:
            notes.append(f"{path}: {r.note}")
        if args.format == "json":
            print(json_line({"path": path, "text": r.text, "confidence": round(r.confidence, 6),
                             "char_probs": [round(p, 6) for p in r.char_probs], "error": r.error,
                             "note": r.note}))
        elif args.format == "tsv":
            print(f"{path.translate(TSV_ESCAPES)}\t{r.text}\t{r.confidence:.4f}")
        else:
            print(r.text if not r.error else "")
    bar.close()
    for note in notes[:3]:
        print(f"note: {note}", file=sys.stderr)
    if len(notes) > 3:
        print(f"note: {len(notes) - 3} more images look like whole photos (--format json names each)",
              file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(paths)} images failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
    return 1 if failures else 0


def cmd_test(args: argparse.Namespace) -> int:
    """Score a model on benchmark datasets and print the table."""
    charset = CHARSETS[args.charset]
    if args.csv is not None and args.csv.is_dir():
        raise ValueError(f"--csv {args.csv} is a folder; give the path of a file to write")
    benches = collect_benchmarks(args.data, charset, args.by_folder)
    for bench in benches:
        if not len(bench.data):
            print(f"warning: {bench.name} has no sample with a label in the {args.charset}-character charset",
                  file=sys.stderr)
    if not any(len(b.data) for b in benches):
        raise ValueError(f"nothing to score in {' '.join(map(str, args.data))}: no sample has a label of up to 25 "
                         f"characters in the {args.charset}-character charset")
    rec = recognizer(args)
    total = sum(len(b.data) for b in benches)
    unloaded: list[str] = []
    with tqdm(total=total, unit="img", file=sys.stderr, disable=total < 50 or args.quiet) as bar:
        rows, ms = run_benchmarks(rec, benches, charset, args.batch_size, args.csv, bar.update, unloaded,
                                  max_windows=args.max_windows, **decoding_options(args))
    if unloaded:  # the datasets' warnings named each; they are in the scores, as wrong readings
        print(f"{len(unloaded)} of {total} images could not be loaded or read ({'; '.join(unloaded[:3])}"
              f"{'; ...' if len(unloaded) > 3 else ''}): counted as wrong readings", file=sys.stderr)
    print(format_table(rows, charset, args.format))
    if args.format == "md":
        backend = "torch" if hasattr(rec, "model") else "onnx"  # what --backend auto chose
        print(f"\n{ms:.1f} ms/image (batch {args.batch_size}, {backend} backend, {args.device}, "
              f"{rec.precision})")
    return 0


def refine_count(text: str) -> int:
    """argparse type: refinement passes, 0 to MAX_REFINE_ITERS (each is a decoder pass over every position)."""
    value = int(text)
    if not 0 <= value <= MAX_REFINE_ITERS:
        raise argparse.ArgumentTypeError(f"must be 0-{MAX_REFINE_ITERS}, got {value}")
    return value


def _window_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-windows", type=positive_int, default=MAX_WINDOWS, help="an image wider than this many "
                   f"windows (about 7 heights each) gets an error instead of a reading (default {MAX_WINDOWS})")


def _decoding_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-guard", action="store_true", help="keep readings that run away (no EOS, or one character "
                   "5+ times) instead of reading those images with the CTC head")
    p.add_argument("--no-rescore", action="store_true", help="keep the final reading where the image-branch or CTC "
                   "reading differs, instead of giving the one both decoders and the CTC head score highest")
    p.add_argument("--no-cascade", action="store_true", help="run the cross-modal branch on every image, also where "
                   "the image branch and the CTC head agree with the model's cascade_confidence (the built-in model "
                   "skips it there)")
    p.add_argument("--no-second-look", action="store_true", help="read every crop once, also where its reading "
                   "is less confident than the model's second_look_confidence (the built-in model reads those again "
                   "at two other vertical scales and keeps the most confident reading)")


def decoding_options(args: argparse.Namespace) -> dict:
    """The reading options of --no-guard, --no-rescore, --no-cascade and --no-second-look, as `read()` keywords."""
    return {"guard": not args.no_guard, "rescore": not args.no_rescore, "cascade": not args.no_cascade,
            "second_look": not args.no_second_look}


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="checkpoint folder (default: the built-in model)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="decoding steps through torch.compile (PyTorch backend): "
                   "seconds to compile on first use, then faster steps; for long jobs and servers")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                   help="onnx: ONNX Runtime, no PyTorch (--model: a folder from `clip4str export onnx`, default the "
                   "built-in model's graphs); auto: torch where PyTorch is installed, else onnx")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="clip4str", description="CLIP4STR scene text recognition")
    sub = parser.add_subparsers(dest="command", required=True)
    read = sub.add_parser("read", help="read the text in cropped word images")
    read.add_argument("images", nargs="+", help="image files, folders, globs, or - for paths on stdin")
    _model_options(read)
    _decoding_options(read)
    read.add_argument("--format", choices=["text", "tsv", "json"], default="tsv")
    read.add_argument("--mode", choices=["ar", "nar"], default=None, help="decoding mode (default: model's)")
    read.add_argument("--refine-iters", type=refine_count, default=None, help="refinement passes, 0-8 (default: "
                      "model's)")
    _window_option(read)
    read.set_defaults(func=cmd_read)
    test = sub.add_parser("test", help="score a model on LMDB roots or labels.tsv folders")
    test.add_argument("data", nargs="+", help="LMDB roots or folders with labels.tsv")
    _model_options(test)
    _decoding_options(test)
    test.add_argument("--charset", choices=["36", "62", "94"], default="36", help="evaluation charset")
    test.add_argument("--format", choices=["md", "json"], default="md")
    test.add_argument("--by-folder", action="store_true", help="report each sub-folder of a labels.tsv folder")
    test.add_argument("--csv", type=Path, help="write per-sample predictions here")
    _window_option(test)
    test.set_defaults(func=cmd_test)
    bench = sub.add_parser("bench", help="parameters, GFLOPs, latency, throughput and memory of a model")
    bench.add_argument("--model", type=Path, help="checkpoint folder (default: the built-in model)")
    bench.add_argument("--preset", help="benchmark an untrained preset (tiny, b16, l14, h14) instead")
    bench.add_argument("--device", type=device_name, default="cpu")
    bench.add_argument("--precision", dest="precisions", nargs="+", choices=["fp32", "bf16", "fp16"],
                       help="default: fp32 bf16 (PyTorch), fp32 (ONNX)")
    bench.add_argument("--decoding", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"],
                       help="decoding steps eager and/or through torch.compile (PyTorch backend)")
    bench.add_argument("--batch-size", type=positive_int, default=64)
    bench.add_argument("--repeats", type=positive_int, default=20)
    bench.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all)")
    bench.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                       help="onnx: --model is a folder from `clip4str export onnx`")
    bench.add_argument("--fixed-length", type=positive_int, help="decode exactly N characters (default: 5 with "
                       "--preset; use it for untrained or exported-untrained models, which never emit EOS)")
    bench.set_defaults(func=commands.cmd_bench)
    export = sub.add_parser("export", help="export a model").add_subparsers(dest="export_format", required=True)
    onnx = export.add_parser("onnx", help="ONNX graphs + config for ONNX Runtime (no PyTorch needed to run)")
    onnx.add_argument("--model", type=Path, help="checkpoint folder (default: the built-in model)")
    onnx.add_argument("--out", type=Path, required=True)
    onnx.add_argument("--fp16-weights", action="store_true",
                      help="store weights as float16 in the files (half the size; ONNX Runtime computes in float32)")
    onnx.add_argument("--force", action="store_true", help="replace an ONNX export already in --out")
    onnx.set_defaults(func=commands.cmd_export_onnx, backend="torch", device="cpu", precision="fp32")
    serve = sub.add_parser("serve", help="HTTP API (POST /v1/read) and a web page to try the recognizer")
    _model_options(serve)
    _decoding_options(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port_number, default=8000)
    serve.add_argument("--max-batch", type=positive_int, default=32, help="images per model batch (across requests)")
    serve.add_argument("--max-upload-mb", type=positive_number, default=10.0)
    serve.add_argument("--max-images", type=positive_int, default=64, help="images per request")
    serve.add_argument("--max-windows", type=positive_int, default=24,
                       help="windows of model work per image (a long crop is read in overlapping windows)")
    serve.add_argument("--max-request-windows", type=positive_int, default=256, help="windows per request")
    serve.add_argument("--max-queue-windows", type=positive_int, default=512,
                       help="windows waiting for the model before requests get 503")
    serve.add_argument("--max-attention-images", type=positive_int, default=8, help="images whose attention strips "
                       "(?attention=1, several readings' work each) are drawn at once, across requests (503 beyond)")
    serve.add_argument("--max-connections", type=positive_int, default=256,
                       help="open connections; more are closed at once (idle sockets cannot use up descriptors)")
    serve.add_argument("--header-timeout", type=positive_number, default=10.0, help="seconds a connection has to "
                       "send a request's headers, after opening or after its last response; it is closed otherwise")
    serve.add_argument("--body-timeout", type=positive_number, default=60.0,
                       help="seconds an upload has to arrive (408 otherwise)")
    serve.set_defaults(func=commands.cmd_serve)
    conv = sub.add_parser("convert", help="the authors' .ckpt/.pt checkpoint -> clip4str checkpoint folder")
    conv.add_argument("src", type=Path)
    conv.add_argument("out", type=Path)
    conv.add_argument("--charset", help="only for checkpoints of a charset other than 36/62/94 (in token order)")
    conv.add_argument("--force", action="store_true", help="replace a checkpoint already in OUT")
    conv.set_defaults(func=commands.cmd_convert)
    att = sub.add_parser("attention", help="draw where the decoders look for each character (PNG)")
    att.add_argument("image", type=Path)
    att.add_argument("--out", type=Path, required=True, help="PNG to write")
    _model_options(att)
    att.set_defaults(func=commands.cmd_attention)
    zs = sub.add_parser("zeroshot", help="rank candidate words for an image by CLIP similarity")
    zs.add_argument("image", type=Path)
    zs.add_argument("--candidates", nargs="+", required=True)
    zs.add_argument("--clip", type=Path, help="a local CLIP file (OpenAI or open_clip); default: --model's towers")
    zs.add_argument("--template", type=word_template, default='a photo of the word "{}".')
    _model_options(zs)
    zs.set_defaults(func=commands.cmd_zeroshot)
    presets = sub.add_parser("presets", help="list model presets")
    presets.set_defaults(func=commands.cmd_presets)
    add_data_commands(sub)
    train = sub.add_parser("train", help="train or fine-tune a model from a YAML experiment config")
    train.add_argument("--config", type=Path, help="experiment YAML (see configs/)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")
    train.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.ckpt")
    train.add_argument("--export-last", metavar="DEST", help="do not train: write the model of OUT_DIR/last.ckpt "
                       "as a checkpoint folder at DEST (for a run stopped before max_steps)")
    train.add_argument("--half", action="store_true", help="with --export-last: store the weights in float16")
    train.add_argument("--force", action="store_true", help="with --export-last: replace a checkpoint already in DEST")
    train.set_defaults(func=commands.cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `clip4str` console script."""
    args = build_parser().parse_args(argv)
    # File names are bytes to the OS: one that is not UTF-8 passes through as it is, instead of ending the run.
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "surrogateescape"),
                           (sys.stderr, "backslashreplace")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)
    # A skipped sample's warning is one line for the user, not the source line that raised it.
    formatwarning, warnings.formatwarning = warnings.formatwarning, lambda message, *rest, **kw: f"warning: {message}\n"
    try:
        return args.func(args)
    except (OSError, ValueError) as e:  # missing, unreadable or odd files and values: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TORCH_PACKAGES:
            raise
        print(f"error: `clip4str {args.command}` needs {e.name}, which comes with PyTorch's extra: {TORCH_EXTRA}",
              file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
