"""The `clip4str` sub-commands that need PyTorch: bench, attention, zeroshot, export, train, presets."""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys


def _recognizer(args: argparse.Namespace, torch_only: str | None = None):  # noqa: ANN202
    from clip4str.cli import recognizer

    if torch_only:
        if getattr(args, "backend", "torch") == "onnx":
            raise ValueError(f"{torch_only} needs the PyTorch model: use --backend torch with a checkpoint folder")
        args = copy.copy(args)
        args.backend = "torch"
    return recognizer(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """Parameters, GFLOPs, batch-1 latency, batched throughput and peak memory, per precision."""
    from clip4str.bench import WORD, run_bench

    model = None
    if args.backend == "onnx":  # what the ONNX backend reads: an export at fp32, never an untrained preset
        if args.preset:
            raise ValueError("--preset builds an untrained PyTorch model; with --backend onnx give --model EXPORT "
                             "(or nothing for the built-in model's graphs)")
        if set(args.precisions or ()) - {"fp32"}:
            raise ValueError("--backend onnx runs fp32 (graphs with float16 weights compute in fp32); leave out "
                             "--precision or give fp32")
    if args.backend == "torch":
        import torch

        from clip4str.factory import create_model
        from clip4str.inference import Recognizer

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.preset:
            torch.manual_seed(0)
            model = create_model(args.preset)
    # Random weights never emit EOS: decode exactly a 5-letter word's steps.
    fixed = args.fixed_length or (len(WORD) if args.preset else None)
    print(f"| model | precision | decoding | params | GFLOPs/image | batch-1 latency (ms) | batch-{args.batch_size} "
          "images/s | peak memory (MB) | first read (ms) |\n|:--|:--|:--|--:|--:|--:|--:|--:|--:|")
    precisions = args.precisions or ["fp32", "bf16"]
    runs = [(p, d) for p in precisions for d in args.decoding] if args.backend == "torch" else [("fp32", "-")]
    for precision, decoding in runs:
        if args.backend == "onnx":
            rec = _recognizer(args)
        elif model is not None:  # bf16 converts its model in place
            rec = Recognizer(copy.deepcopy(model), args.device, precision, compiled=decoding == "compiled")
        else:
            rec = Recognizer.from_pretrained(args.model, device=args.device, precision=precision,
                                             compiled=decoding == "compiled")
        if fixed and fixed > rec.config.max_label_length:
            raise ValueError(f"--fixed-length {fixed}: this model decodes at most {rec.config.max_label_length} "
                             "characters")
        r = run_bench(rec, args.batch_size, args.repeats, fixed)
        name = args.preset or str(args.model or "built-in")
        params = f"{r.params_m:.1f}M" if r.params_m is not None else "-"
        gflops = f"{r.gflops:.2f}" if r.gflops is not None else "-"
        print(f"| {name} | {args.backend} {rec.precision} | {decoding} | {params} | {gflops} | {r.latency_ms:.1f} | "
              f"{r.throughput:.1f} | {r.peak_mb:.0f} | {r.first_ms:.0f} |", flush=True)
    print(f"\n{args.device if args.backend == 'torch' else 'onnxruntime CPU'}; batch-1 latency: median of "
          f"{args.repeats} reads of "
          f"a rendered '{WORD}' including preprocessing" + (f"; decoding exactly {fixed} characters + EOS"
                                                              if fixed else ""))
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    """Save the per-character attention strip of an image."""
    from clip4str.visualize import attention_strip

    rec = _recognizer(args, "attention")
    # The strip shows what `read` gives, second look included (a long crop's merged text falls back inside).
    text, panels = attention_strip(rec, args.image, args.out, rec.read(args.image)[0].text or None)
    print(f"{args.image}\t{text}\t{args.out} ({panels} panels per decoder)")
    return 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    """Print each candidate's probability (CLIP image-text similarity, softmax), best first."""
    from clip4str.model.towers import build_clip
    from clip4str.model_config import OPENAI_MEAN, OPENAI_STD
    from clip4str.weights import load_exact, read_clip_checkpoint
    from clip4str.zeroshot import rank_words

    if args.clip:
        weights = read_clip_checkpoint(args.clip)
        clip = build_clip(weights.config)
        load_exact(clip, {"logit_scale": clip.logit_scale.detach(), **weights.state_dict}, str(args.clip))
        mean, std = OPENAI_MEAN, OPENAI_STD
    else:
        model = _recognizer(args, "zeroshot without --clip").model
        clip, mean, std = model.clip, model.config.image_mean, model.config.image_std
    for word, p in rank_words(clip, args.image, args.candidates, args.template, mean, std):
        print(f"{word}\t{p:.4f}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) an experiment and print where the result is."""
    from clip4str.train.config import load_config
    from clip4str.train.run import export_last, train

    cfg = load_config(args.config, args.overrides)
    if (args.half or args.force) and not args.export_last:
        raise ValueError("--half and --force go with --export-last DEST (they say how to write the export)")
    if args.export_last:
        import torch

        out = export_last(cfg, args.export_last, torch.float16 if args.half else None, force=args.force)
        print(f"exported {cfg.train.out_dir}/last.ckpt to {out}")
        return 0
    result = train(cfg, resume=args.resume)
    if result is not None:  # rank 0 (or a single process) reports; other ranks of a multi-process run do not
        print(f"result: {result}")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Export the model as ONNX graphs and check them against PyTorch on a rendered word."""
    import numpy as np

    from clip4str.bench import word_image
    from clip4str.destinations import check_onnx_destination
    from clip4str.export import export_onnx
    from clip4str.inference import default_model_path
    from clip4str.onnx_backend import OnnxRecognizer

    check_onnx_destination(args.out, args.force)  # before any work (export_onnx checks it again)
    rec = _recognizer(args, "export")
    source = (args.model or default_model_path()) / "model.safetensors"
    digest = hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else None
    out = export_onnx(rec.model, args.out, fp16_weights=args.fp16_weights, source_sha256=digest, force=args.force)
    x = rec.preprocess([word_image()])
    ours = OnnxRecognizer(out)
    logits, _ = ours.decode(x.numpy())
    ref = rec.model.decode(x)
    n = min(logits.shape[1], ref.logits.shape[1])
    diff = float(np.abs(logits[:, :n] - ref.logits[:, :n].detach().numpy()).max())
    same = ours.decode_tensors(x.numpy())[0].text == rec.decode_tensors(x)[0].text
    print(f"exported to {out}; check on a rendered word: same text {same}, max logit difference {diff:.2e}")
    return 0 if same and diff < 1e-3 else 1


def cmd_convert(args: argparse.Namespace) -> int:
    """An authors' checkpoint -> our format (safetensors + JSON config), reporting unused source keys."""
    from clip4str.charset import resolve_charset
    from clip4str.convert import architecture_name, load_authors_checkpoint
    from clip4str.destinations import check_checkpoint_destination
    from clip4str.weights import save_checkpoint

    check_checkpoint_destination(args.out, args.force)  # before any work
    model, report = load_authors_checkpoint(args.src, resolve_charset(args.charset) if args.charset else None)
    cfg = model.config
    v = cfg.clip["vision_cfg"]
    provenance = {"converted_from": str(args.src), "unused_keys": report["unused"]}
    out = save_checkpoint(model, args.out, provenance=provenance, force=args.force)
    print(f"converted {args.src} -> {out}: {architecture_name(cfg)} (width {v['width']} x {v['layers']} layers, "
          f"patch {v['patch_size']}),"
          f"{v['image_size']}px, shared width {cfg.embed_dim}, {len(cfg.charset)} characters, cross branch "
          f"{'on' if cfg.cross_branch else 'off'}; unused source keys: {report['unused'] or 'none'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP API and web page with uvicorn."""
    import uvicorn

    from clip4str.cli import decoding_options
    from clip4str.serve.app import create_app
    from clip4str.serve.connections import guarded_protocol

    rec = _recognizer(args)
    if getattr(rec, "compiled", False):  # compile before the first request, for one image and for batches
        import time

        from clip4str.bench import word_image

        t0 = time.perf_counter()
        # Without drafts or the cascade every step of both branches is taken, so each decoder's step compiles here.
        for batch in ([word_image()], [word_image()] * 2):
            rec.read(batch, draft=False, cascade=False)
        print(f"compiled the decoding step in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    app = create_app(rec, max_batch=args.max_batch, max_upload_mb=args.max_upload_mb,
                     max_images=args.max_images, max_windows=args.max_windows,
                     max_request_windows=args.max_request_windows, max_queue_windows=args.max_queue_windows,
                     decode_options=decoding_options(args), body_seconds=args.body_timeout,
                     max_attention_images=args.max_attention_images)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"clip4str serve: starting on http://{host}:{args.port}/ (POST /v1/read, GET /v1/model; Ctrl-C stops "
          "it)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning",
                http=guarded_protocol(args.max_connections, args.header_timeout))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """List model presets with their parameter counts."""
    from clip4str.factory import create_model
    from clip4str.presets import list_presets

    for name in list_presets():
        model = create_model(name)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        h, w = model.config.image_size
        print(f"{name}\t{h}x{w}\t{total / 1e6:.1f}M params\t{trainable / 1e6:.1f}M trainable")
    return 0
