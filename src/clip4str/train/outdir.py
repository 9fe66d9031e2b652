"""The run folder: one `clip4str train` writes it at a time, and a new run never writes over another run's files."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the files check below still holds
    fcntl = None

# What a run writes into its folder (besides last.ckpt, which --resume continues from).
RUN_FILES = ("final", "config.yaml", "logs", "started_from.json")


def first_process() -> bool:
    """Whether this is the first process of a (possibly multi-process) run, before Lightning knows its rank: the
    other ranks are started by the first, or by a launcher, with these variables set."""
    return all(int(os.environ.get(k) or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


@contextlib.contextmanager
def claimed(out: Path, resume: bool) -> Iterator[None]:
    """Hold `out` for this run: refused while another run writes it, and, for a new run, where it holds another
    run's files without a last.ckpt to resume (a finished run whose checkpoint was deleted, say)."""
    if not first_process():
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+", encoding="utf-8") as lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FileExistsError(f"another `clip4str train` is writing to {out} now; wait for it to end or "
                                      "choose another train.out_dir") from None
        if not resume and not (out / "last.ckpt").exists():
            found = [n for n in RUN_FILES if (out / n).exists()]
            if found:
                raise FileExistsError(f"{out} holds another run's {', '.join(found)} and no last.ckpt to continue "
                                      "with --resume; choose another train.out_dir (or delete that folder to start "
                                      "over)")
        yield
