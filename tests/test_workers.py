"""Data-loader workers never outlive their run: however the main process ends, a shell capture `$(...)` of
its output returns at once, even while a worker is busy with a long batch (the probe of the GPU kit once held
a `$(...)` for 440 s that way)."""

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

# Four workers over the training stream; after the first batch every sample takes two minutes, so a worker is
# always in the middle of a batch (not at PyTorch's periodic check of its parent) when the main process ends.
DRIVER = """
import os, signal, sys, time
from clip4str.data.datamodule import TrainStream
from clip4str.train.config import load_config
from clip4str.train.run import build_datamodule, build_model

sample = TrainStream.sample
def slow_after_the_first_batch(self, g):
    if g >= self.batch_size:
        time.sleep(120)
    return sample(self, g)
TrainStream.sample = slow_after_the_first_batch

cfg = load_config(None, ["data.num_workers=4", "data.batch_size=32", "data.synth_val_size=0"])
loader = build_datamodule(cfg, build_model(cfg)).train_dataloader()
it = iter(loader)
next(it)
print("workers", *[w.pid for w in it._workers], flush=True)
time.sleep(1)
how = sys.argv[1]
if how == "os_exit":
    os._exit(0)
elif how == "exception":
    raise RuntimeError("injected failure")
elif how in ("SIGTERM", "SIGINT", "SIGKILL"):
    os.kill(os.getpid(), getattr(signal, how))
    time.sleep(30)
print("normal end", flush=True)
"""


@pytest.mark.parametrize("how", ["normal", "exception", "SIGTERM", "SIGINT", "os_exit", "SIGKILL"])
def test_a_shell_capture_of_a_run_returns_however_it_ends(tmp_path, how):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # bash's $(...) returns only when every process holding the pipe (the workers too) has closed it.
    script = f'out=$("{sys.executable}" "{driver}" {how} 2>/dev/null); echo "$out"'
    start = time.monotonic()
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=150)
    took = time.monotonic() - start
    workers = [int(p) for p in proc.stdout.split("workers", 1)[1].split()[:4]] if "workers" in proc.stdout else []
    assert len(workers) == 4, proc.stdout + proc.stderr
    # Start-up (imports, a tiny model, the first batch) and PyTorch's shutdown of its workers (up to 5 s each)
    # take seconds, more on a loaded machine; a worker left behind holds the capture for its 2-minute sample.
    assert took < 75, f"the capture took {took:.0f} s"
    time.sleep(1)
    for pid in workers:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        assert state == "Z", f"worker {pid} is still running ({state}) after its run ended {how}"
