"""Measure GPU step time and data-loader rate for a config; print max_steps that fit a time budget."""
import os
import sys
import time

import torch

from clip4str.train.config import load_config
from clip4str.train.run import build_datamodule, build_model

budget, cfg = float(sys.argv[1]), load_config(sys.argv[2], sys.argv[3:])
B = cfg.data.batch_size
cfg.data.synth_val_size = 0  # the probe times training batches only
dev = "cuda" if torch.cuda.is_available() else "cpu"
model = build_model(cfg).to(dev).train()
dm = build_datamodule(cfg, model)
it = iter(dm.train_dataloader())
images, labels = next(it)
images = images.to(dev)
opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
for i in range(20):
    if i == 5:
        torch.cuda.synchronize() if dev == "cuda" else None
        t = time.perf_counter()
    with torch.autocast(dev, dtype=torch.bfloat16):
        loss = model(images, labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
torch.cuda.synchronize() if dev == "cuda" else None
gpu = (time.perf_counter() - t) / 15
next(it)
t, n = time.perf_counter(), 0
while time.perf_counter() - t < 8:
    n += len(next(it)[1])
data = B * 1.0 / (n / (time.perf_counter() - t))
step = 1.1 * max(gpu, data)
steps = int(budget / step)
print(f"probe: loss {loss.item():.3f}; model step {gpu * 1000:.1f} ms, data {B / data:.0f} img/s "
      f"({data * 1000:.1f} ms/batch of {B}); planned {steps} steps of ~{step * 1000:.1f} ms", file=sys.stderr)
print(steps)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
