"""Two-process DDP training on CPU (gloo): ranks read disjoint halves of the one seeded stream, the losses match
one process with the doubled batch, a signal to one rank stops both with one checkpoint, and resume finishes
the run exactly; only rank 0 writes files and reports."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import labelled_folder
from test_train import _losses

pytestmark = pytest.mark.slow

# One label length: the loss is a mean over characters, so with equal lengths the mean of the ranks' halves is
# the mean of the whole batch, and two ranks must match one process to rounding, not just roughly.
WORDS = ["cafe", "STOP", "Park", "x7Qz", "door", "BEER", "1984", "Main"]
SMALL = {"clip": {"embed_dim": 32, "vision_cfg": {"width": 64, "layers": 2, "head_width": 32},
                  "text_cfg": {"width": 32, "heads": 2, "layers": 2}}, "decoder_heads": 4}
STEPS, BATCH = 8, 4  # per rank; the single process reads 2 * BATCH

# Lightning starts rank 1 by running this script again, so what the driver records, every rank records.
DRIVER = """
import os, signal, sys
from pathlib import Path
from clip4str.cli import main
from clip4str.data.datamodule import TrainStream
import clip4str.train.run as run
from clip4str.train.system import STRSystem

record = Path(sys.argv[2])
def note(line):
    with record.open("a") as f:
        f.write(line + "\\n")

sample = TrainStream.sample
def recorded_sample(self, g):
    note(f"sample {self.rank} {self.world} {g}")
    return sample(self, g)
TrainStream.sample = recorded_sample

def rank():
    return int(os.environ.get("LOCAL_RANK", 0))
for name in ("save_checkpoint", "plot_history"):
    def wrapped(*args, _f=getattr(run, name), _name=name, **kwargs):
        note(f"write {rank()} {_name}")
        return _f(*args, **kwargs)
    setattr(run, name, wrapped)

kill_at = int(os.environ.get("SIGTERM_RANK0_AT_STEP", -1))
start = STRSystem.on_train_batch_start
def maybe_signal(self, batch, batch_idx):
    if self.global_step == kill_at and self.trainer.global_rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)  # to rank 0 alone: rank 1 must learn of it through the ranks' vote
    return start(self, batch, batch_idx)
STRSystem.on_train_batch_start = maybe_signal
sys.exit(main(["train", "--config", sys.argv[1], *sys.argv[3:]]))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return labelled_folder(tmp_path_factory.mktemp("words"), WORDS)


def _run(tmp_path: Path, folder: Path, name: str, devices: int, *extra: str, env: dict | None = None,
         **train: object) -> tuple[subprocess.CompletedProcess, Path]:
    """Train `name` with `devices` CPU processes through the driver; returns the process and its record file."""
    batch = BATCH if devices > 1 else 2 * BATCH
    doc = {"model": {"preset": "tiny", **SMALL, "dropout": 0.0},  # dropout masks depend on the batch's shape
           "data": {"train": [{"path": str(folder)}], "batch_size": batch,
                    "num_workers": 0, "augment": True},
           "train": {"max_steps": STEPS, "base_lr": 0.1, "decoder_lr_scale": 1.0, "val_every_steps": 1000,
                     "accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                     "precision": "32-true", "log_every_steps": 1, "checkpoint_every_minutes": None,
                     "threads": 1, "out_dir": str(tmp_path / name), **train}}
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    record = tmp_path / f"{name}.record"
    proc = subprocess.run([sys.executable, str(driver), str(cfg), str(record), *extra], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})}, cwd=tmp_path)
    return proc, record


def _samples(record: Path) -> dict[int, list[int]]:
    by_rank: dict[int, list[int]] = {}
    for line in record.read_text().splitlines():
        kind, *fields = line.split()
        if kind == "sample":
            by_rank.setdefault(int(fields[0]), []).append(int(fields[2]))
    return by_rank


def _writes(record: Path) -> list[str]:
    return [line for line in record.read_text().splitlines() if line.startswith("write")]


@pytest.fixture(scope="module")
def single(tmp_path_factory, folder):
    tmp = tmp_path_factory.mktemp("single")
    proc, record = _run(tmp, folder, "single", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "single", record


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, folder):
    tmp = tmp_path_factory.mktemp("ddp")
    proc, record = _run(tmp, folder, "ddp", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "ddp", record, proc


def test_ranks_read_disjoint_samples_that_together_are_the_single_process_stream(single, ddp):
    _, single_record = single
    _, ddp_record, _ = ddp
    ranks, alone = _samples(ddp_record), _samples(single_record)
    assert sorted(ranks) == [0, 1] and sorted(alone) == [0]
    for seen in ranks.values():
        assert len(seen) == len(set(seen)) and len(seen) >= STEPS * BATCH
    assert not set(ranks[0]) & set(ranks[1])
    trained = range(STEPS * 2 * BATCH)  # the samples of steps 0..STEPS-1 (loaders may read one batch ahead)
    union = {g for g in ranks[0] + ranks[1] if g in trained}
    assert union == {g for g in alone[0] if g in trained} == set(trained)


def test_each_steps_loss_matches_one_process_with_the_doubled_batch(single, ddp):
    expected, got = _losses(single[0]), _losses(ddp[0])
    assert sorted(got) == sorted(expected) == list(range(STEPS))
    # Equal to rounding (summation order differs): rank 0's half alone or one rank's gradients alone are off
    # by 0.1-1%.
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=2e-5), (step, got, expected)
    assert got[STEPS - 1] < got[0]


def test_only_rank_zero_writes_and_reports(ddp):
    out, record, proc = ddp
    assert proc.stdout.count("result:") == 1, proc.stdout
    assert proc.stderr.count("parameters:") == 1
    assert sorted(_writes(record)) == ["write 0 plot_history", "write 0 save_checkpoint"]
    assert (out / "final" / "model.safetensors").is_file() and (out / "last.ckpt").is_file()
    assert (out / "training.png").is_file() and not list(out.glob("*.tmp"))


def test_a_signal_to_one_rank_stops_both_with_one_checkpoint_and_resume_finishes_the_same_run(tmp_path, folder,
                                                                                                ddp):
    proc, record = _run(tmp_path, folder, "cut", 2, env={"SIGTERM_RANK0_AT_STEP": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("checkpoint saved at step 4") == 1, proc.stderr[-3000:]
    out = tmp_path / "cut"
    import torch
    assert torch.load(out / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not (out / "final").exists() and "result:" not in proc.stdout and not _writes(record)
    resumed, record = _run(tmp_path, folder, "cut", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("result:") == 1
    assert sorted(_writes(record)) == ["write 0 plot_history", "write 0 save_checkpoint"]
    with (out / "logs" / "run-1" / "metrics.csv").open() as f:
        assert min(int(r["step"]) for r in csv.DictReader(f) if r.get("loss")) == 4
    expected, got = _losses(ddp[0]), _losses(out)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
