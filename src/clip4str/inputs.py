"""The image arguments of `clip4str read`: files, folders, globs and '-' (paths on stdin)."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def expand_inputs(specs: list[str]) -> list[str]:
    """Files, folders (their images, sorted), globs, and '-' (paths read from stdin), in order."""
    out: list[str] = []
    for spec in specs:
        if spec == "-":
            out.extend(line.strip() for line in sys.stdin if line.strip())
        elif Path(spec).is_dir():
            out.extend(str(p) for p in sorted(Path(spec).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif not Path(spec).exists() and glob.has_magic(spec):  # an existing 'word[1].png' is a file name
            matches = glob_files(spec)
            if not matches:
                raise FileNotFoundError(f"no file matches {spec!r}")
            out.extend(matches)
        else:
            out.append(spec)  # a missing file becomes an error entry of its own
    return out


def glob_files(pattern: str) -> list[str]:
    """Files matching a glob, sorted; '**' does not descend into linked folders (a link loop would never end)."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = Path(*parts[:fixed]) if fixed else Path()
    rest = list(parts[fixed:]) + (["*"] if parts[-1] == "**" else [])  # 'imgs/**': every file below, as glob's
    # As glob.glob: a wildcard does not match a name starting with '.' ('._x.png' beside 'x.png' on macOS copies).
    dotted = any(part.startswith(".") for part in rest)  # a pattern that names hidden files asks for them
    return sorted(str(p) for p in base.glob(str(Path(*rest))) if p.is_file() and (
        dotted or not any(name.startswith(".") for name in p.relative_to(base).parts)))
