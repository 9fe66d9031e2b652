"""Where a model may be written: never over the other kind of model, and over its own kind only when asked."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

from clip4str.onnx_backend import GRAPHS

CHECKPOINT_FILES, ONNX_FILES = ("config.json", "model.safetensors"), (*GRAPHS, "config.json")


def check_destination(folder: Path, ours: tuple[str, ...], foreign: tuple[str, ...], kind: str, force: bool) -> None:
    """Refuse a file, a folder holding files of another kind of model (`foreign` patterns), and, without `force`, a
    folder holding this `kind` already (`ours` patterns)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{str(folder)!r} is a file; give a folder to write the {kind} to")
    if not folder.is_dir():
        return
    names = [p.name for p in folder.iterdir()]
    other = [n for n in names if any(fnmatch(n, pattern) for pattern in foreign)]
    if other:
        raise FileExistsError(f"{str(folder)!r} holds {other[0]}, another kind of model; write the {kind} to "
                              "another folder")
    own = [n for n in names if any(fnmatch(n, pattern) for pattern in ours)]
    if own and not force:
        raise FileExistsError(f"{str(folder)!r} already holds {own[0]}, which writing the {kind} would replace; pass "
                              "--force to replace it, or give another folder")


def check_checkpoint_destination(folder: Path, force: bool) -> None:
    """A clip4str checkpoint (config.json + model.safetensors) may be written to `folder`."""
    check_destination(folder, CHECKPOINT_FILES, ("*.onnx",), "checkpoint", force)


def check_onnx_destination(folder: Path, force: bool) -> None:
    """An ONNX export (graphs + config.json) may be written to `folder`; never beside other ONNX models, which
    `--force` would otherwise have replaced or deleted."""
    strangers = sorted(p.name for p in Path(folder).glob("*.onnx") if p.name not in GRAPHS) \
        if Path(folder).is_dir() else []
    if strangers:
        raise FileExistsError(f"{str(folder)!r} holds {strangers[0]}, which is not a graph of a clip4str export; "
                              "write the ONNX export to another folder")
    check_destination(folder, ONNX_FILES, ("model.safetensors",), "ONNX export", force)
