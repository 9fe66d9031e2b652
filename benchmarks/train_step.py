"""Time one training step (forward, permutation loss, backward, AdamW) of a preset on this machine.

    python benchmarks/train_step.py --preset tiny --batch-size 64 --precision fp32 bf16
    python benchmarks/train_step.py --preset tiny --set clip.vision_cfg.patch_size=[8,8]
    python benchmarks/train_step.py --preset tiny --batch-size 2 --adamw fused loop
    python benchmarks/train_step.py --preset tiny --batch-size 2 --precision bf16 --count-ops
    python benchmarks/train_step.py --preset tiny --precision bf16 --encoder eager compiled

--count-ops also counts, in one step, the PyTorch operators and the reads of a tensor value on the host
(`aten._local_scalar_dense`: `.item()`, `bool(t)`, indexing with a 0-d tensor), each a wait for the device on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import string
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from clip4str import create_model
from clip4str.model.towers import encode_image_tokens
from clip4str.train.compile import compile_image_encoder
from clip4str.train.system import build_optimizer


def parse_set(items: list[str]) -> dict:
    """key.sub=JSON-value items -> nested override dict."""
    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = json.loads(value)
    return out


def time_train_step(model: torch.nn.Module, batch_size: int, precision: str, steps: int = 5,
                    attention: str = "math", fused: bool = True) -> float:
    """Median seconds of one training step (forward, loss, backward, AdamW) on random images."""
    model.train()
    h, w = model.config.image_size
    rng = random.Random(0)
    labels = ["".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(3, 10)))
              for _ in range(batch_size)]
    images = torch.randn(batch_size, 3, h, w)
    opt = build_optimizer(model, 1e-4, 1.0, 0.05, fused=fused)
    kernel = sdpa_kernel([SDPBackend.MATH]) if attention == "math" else contextlib.nullcontext()
    times = []
    with kernel:
        for step in range(steps + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(images, labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:  # the first step warms up allocators and kernels
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] if times else float("nan")


def count_step_ops(model: torch.nn.Module, batch_size: int, precision: str, attention: str = "math",
                   fused: bool = True) -> tuple[int, int]:
    """Operators and host reads of a tensor value (`aten._local_scalar_dense`) in one training step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"ops": 0, "reads": 0}

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            counts["ops"] += 1
            counts["reads"] += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    with Counting():
        time_train_step(model, batch_size, precision, 0, attention, fused)
    return counts["ops"], counts["reads"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, key.sub=JSON")
    ap.add_argument("--attention", choices=["math", "default"], default="math",
                    help="SDPA kernel: math (what clip4str train uses on CPU) or PyTorch's default choice")
    ap.add_argument("--adamw", nargs="+", choices=["fused", "loop"], default=["fused"],
                    help="AdamW as clip4str train runs it (fused) or PyTorch's per-parameter loop")
    ap.add_argument("--count-ops", action="store_true", help="count operators and host reads of one step")
    ap.add_argument("--encoder", nargs="+", choices=["eager", "compiled"], default=["eager"],
                    help="the image tower eager or through torch.compile (train.compile_encoder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(args.preset, **parse_set(args.set))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    h, w = model.config.image_size
    tokens = model.encode_image(torch.zeros(1, 3, h, w)).shape[1]
    print(f"preset={args.preset} overrides={args.set} params={total / 1e6:.2f}M trainable={trainable / 1e6:.2f}M "
          f"input={h}x{w} tokens={tokens} batch={args.batch_size} threads={args.threads}")
    towers = {"eager": encode_image_tokens}
    if "compiled" in args.encoder:
        context = torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in args.precision)
        if not compile_image_encoder(model.train(), args.batch_size, context):
            raise SystemExit("torch.compile failed here")
        towers["compiled"] = model.train_image_tokens
    for precision in args.precision:
        for adamw in args.adamw:  # side by side, so a noisy CPU affects both alike
            for encoder in args.encoder:
                model.train_image_tokens = towers[encoder]
                med = time_train_step(model, args.batch_size, precision, args.steps, args.attention,
                                      adamw == "fused")
                print(f"  {precision}, AdamW {adamw}, {encoder} encoder: {med * 1000:.0f} ms/step, "
                      f"{args.batch_size / med:.1f} images/s")
            if args.count_ops:
                ops, reads = count_step_ops(model, args.batch_size, precision, args.attention, adamw == "fused")
                print(f"    one step: {ops} operators, {reads} host reads of a tensor value")


if __name__ == "__main__":
    main()
