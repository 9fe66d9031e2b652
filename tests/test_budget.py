"""`train.max_minutes`: a run of N minutes warms up, anneals to zero at its end, exports, and keeps its budget
across a stop and resume."""

import csv
import subprocess
import sys
import time

import pytest
import torch

from clip4str.train.budget import DIV_FACTOR, FINAL_DIV_FACTOR, one_cycle
from clip4str.train.config import load_config
from clip4str.train.run import train
from test_train import _config, folder, train_then_sigterm_the_group  # noqa: F401 - the fixture is used by name

PEAK = 0.1 * 8 / 512  # base_lr x batch / 512 of test_train's config


def _lrs(out):
    rows = []
    for metrics in sorted(out.glob("logs/run-*/metrics.csv")):
        with metrics.open() as f:
            rows += [(int(r["step"]), float(r["lr"])) for r in csv.DictReader(f) if r.get("lr")]
    return rows


def test_one_cycle_has_onecycle_lr_shape():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    total, warmup = 200, 0.1
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total, pct_start=warmup,
                                                anneal_strategy="cos", cycle_momentum=False)
    for step in range(total):
        # OneCycleLR ends its warm-up at step pct x total - 1 and its annealing at total - 1.
        p = step / (warmup * total - 1) * warmup if step < warmup * total else \
            warmup + (step - (warmup * total - 1)) / (total - warmup * total) * (1 - warmup)
        assert one_cycle(p, warmup) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-9), step
        opt.step()
        sched.step()
    assert one_cycle(0.0, warmup) == pytest.approx(1 / DIV_FACTOR)
    assert one_cycle(1.0, warmup) == pytest.approx(1 / (DIV_FACTOR * FINAL_DIV_FACTOR))
    assert one_cycle(2.0, warmup) == one_cycle(1.0, warmup)


@pytest.mark.slow
def test_a_budgeted_run_anneals_to_zero_when_its_time_is_spent_and_exports(tmp_path, folder, monkeypatch):  # noqa: F811
    # A clock that advances 0.3 s each time the budget reads it (once a step): the schedule is then the same on
    # an idle or a loaded machine, where real seconds per step vary tenfold.
    import clip4str.train.budget as budget

    ticks = iter(range(10**9))
    monkeypatch.setattr(budget, "_clock", lambda: 0.3 * next(ticks))
    cfg = load_config(_config(tmp_path, folder, "budget", max_steps=1_000_000, max_minutes=0.2, log_every_steps=1))
    result = train(cfg)
    assert result == tmp_path / "budget" / "final" and (result / "model.safetensors").is_file()
    lrs = _lrs(tmp_path / "budget")
    assert 30 < len(lrs) < 45  # 12 s of budget at 0.3 s a step, not max_steps
    assert max(lr for _, lr in lrs) == pytest.approx(PEAK, rel=0.05)  # it warmed up to the peak
    assert lrs[-1][1] < 0.01 * PEAK  # and annealed to (nearly) zero at the end of the budget
    from clip4str.weights import read_checkpoint_config
    assert read_checkpoint_config(result)[0]["provenance"]["budget_minutes"] == 0.2


@pytest.mark.slow
def test_a_budget_carries_over_a_stop_and_resume(tmp_path, folder):  # noqa: F811
    cfg = _config(tmp_path, folder, "carry", max_steps=1_000_000, max_minutes=0.4, log_every_steps=2)
    cmd = [sys.executable, "-m", "clip4str.cli", "train", "--config", str(cfg)]
    proc, err = train_then_sigterm_the_group(cfg, tmp_path / "carry", after_seconds=3)
    assert proc.returncode == 0 and b"checkpoint saved" in err, err.decode()[-2000:]
    ckpt = torch.load(tmp_path / "carry" / "last.ckpt", weights_only=False)
    spent = next(v["elapsed"] for k, v in ckpt["callbacks"].items() if "TimeBudget" in k)
    assert 0 < spent < 24
    start = time.monotonic()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "result:" in resumed.stdout and (tmp_path / "carry" / "final" / "model.safetensors").is_file()
    assert took < 24 - spent + 60  # only the rest of the budget (plus start-up), not a new one
    ckpt = torch.load(tmp_path / "carry" / "last.ckpt", weights_only=False)
    assert next(v["elapsed"] for k, v in ckpt["callbacks"].items() if "TimeBudget" in k) >= 24
    # (How far the rate annealed depends on real seconds per step here: the test above checks the schedule.)
