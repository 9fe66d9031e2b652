"""A run's history: every logged row of its metrics.csv files, as JSON and as a plot of loss and accuracy."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def read_history(out: Path) -> list[dict[str, float]]:
    """Every logged row of every run of an experiment, by step (later runs win)."""
    rows: dict[tuple[int, str], dict[str, float]] = {}
    for metrics in sorted((out / "logs").glob("run-*/metrics.csv"), key=lambda p: int(p.parent.name[4:])):
        with metrics.open() as f:
            for row in csv.DictReader(f):
                values = {k: float(v) for k, v in row.items() if v not in ("", None)}
                if "step" in values:
                    kind = "val" if any(k.startswith("val") for k in values) else "train"
                    rows[(int(values["step"]), kind)] = values
    return [rows[k] for k in sorted(rows)]


def plot_history(out: Path) -> Path:
    """PNG of training loss and validation accuracy against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_history(out)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = [r for r in history if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    val = [r for r in history if "val_accuracy" in r]
    if val:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "o-", color="C1",
                 label="validation accuracy (%)")
        ax2.set_ylabel("validation word accuracy (%)")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(out.name)
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    (out / "history.json").write_text(json.dumps(history))
    return path
