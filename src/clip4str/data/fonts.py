"""Font discovery and per-font glyph coverage for the synthetic word renderer."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import ImageFont

FONT_SUFFIXES = {".ttf", ".otf", ".ttc"}
# Where Debian packages, users and matplotlib put fonts; CLIP4STR_FONTS (os.pathsep-separated) comes first.
DEFAULT_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts")
# Families whose glyphs are not the letters their code points name (symbol fonts map ASCII to pictures) or
# whose case differs from the label (small capitals); matched against the font's own family name.
EXCLUDED_FAMILIES = ("symbol", "dingbat", "d050000l", "keyboard", "math", "smallcaps", "small caps", "emoji",
                     "awesome", "icons", "wingding", "webding",
                     # matplotlib's TeX math fonts (ASCII code points drawn as arrows, braces, operators) and its
                     # placeholder font (a box naming the Unicode block, for every character)
                     "cmex", "cmsy", "cmmi", "last resort")
# TeX's text fonts (matplotlib's cmr10, cmss10, cmb10, cmti10) keep the old OT1 layout, which draws other signs at
# these ASCII code points (< as the inverted exclamation mark, " as a closing quote, { as an en dash, ...).
OT1_FAMILY = re.compile(r"cm(r|ss|b|bx|ti|sl)\d")
OT1_ELSEWHERE = set('<>\\_{|}"`')


def discover_fonts(dirs: list[str | Path] | None = None) -> list[Path]:
    """Font files under the given folders, or the default discovery (env var, system folders, matplotlib)."""
    if dirs is None:
        env = [d for d in os.environ.get("CLIP4STR_FONTS", "").split(os.pathsep) if d]
        dirs = [*env, *DEFAULT_FONT_DIRS]
        try:
            import matplotlib

            dirs.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf")
        except ImportError:
            pass
    else:
        for d in dirs:
            if not Path(d).expanduser().is_dir():
                raise FileNotFoundError(f"font folder {str(d)!r} does not exist")
    found = set()
    for d in dirs:
        root = Path(d).expanduser()
        if root.is_dir():
            found.update(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES)
    return sorted(found)


@dataclass(frozen=True)
class FontInfo:
    """A usable font: the characters it draws (of a charset) and whether it draws lowercase as capitals."""

    path: str
    covered: frozenset[str]
    caps_only: bool


def _glyph(font: ImageFont.FreeTypeFont, ch: str) -> bytes:
    mask = font.getmask(ch)
    return bytes(mask.size) + bytes(mask)


def _missing_glyphs(font: ImageFont.FreeTypeFont) -> set[bytes]:
    """What the font draws for characters it lacks (its missing-glyph box), as `_glyph` bytes."""
    return {_glyph(font, "\U0010fffd"), _glyph(font, "\uffff")}


def inspect_font(path: str | Path, charset: str) -> FontInfo | None:
    """Which charset characters the font really draws (not its missing-glyph box); None if unreadable."""
    try:
        font = ImageFont.truetype(str(path), 24)
    except OSError:
        return None
    family = " ".join(font.getname()).lower()
    if any(word in family for word in EXCLUDED_FAMILIES):
        return None
    missing = _missing_glyphs(font)
    covered = frozenset(c for c in charset if not c.isspace() and _glyph(font, c) not in missing
                        and font.getbbox(c)[2] > font.getbbox(c)[0])
    covered |= frozenset(c for c in charset if c.isspace())
    if OT1_FAMILY.match(family):
        covered -= OT1_ELSEWHERE
    # One drawing for many characters (matplotlib's Last Resort font: the same box for all of Basic Latin) would
    # teach that a box reads as any label. Capitals and digits only: caps-only fonts draw lowercase as capitals.
    basis = [c for c in covered if c.isalnum() and not c.islower()]
    if len(basis) >= 10 and len({_glyph(font, c) for c in basis}) < 0.8 * len(basis):
        return None
    caps = sum(_glyph(font, lo) == _glyph(font, lo.upper()) for lo in "aegmrs") >= 4
    return FontInfo(str(path), covered, caps)


@functools.lru_cache(maxsize=8)
def usable_fonts(paths: tuple[str, ...], charset: str, min_coverage: float = 0.9) -> tuple[FontInfo, ...]:
    """Fonts that draw at least `min_coverage` of the charset's letters and digits (symbol fonts drop out)."""
    core = [c for c in charset if c.isalnum()] or list(charset)
    infos = []
    for p in paths:
        info = inspect_font(p, charset)
        if info is not None and sum(c in info.covered for c in core) >= min_coverage * len(core):
            infos.append(info)
    return tuple(infos)


@functools.lru_cache(maxsize=8192)
def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """A cached FreeType font object."""
    return ImageFont.truetype(path, size)


def label_font(text: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font to write `text` on figures: Pillow's own, or where that draws some of its characters as boxes
    (anything past Latin letters), the installed font that draws the most of them (DejaVu Sans first)."""
    default = ImageFont.load_default(size=size)
    chars = "".join(sorted({c for c in text if not c.isspace()}))
    missing = _missing_glyphs(default)
    if all(_glyph(default, c) not in missing for c in chars):
        return default
    best = _font_drawing_most(chars)
    return load_font(best, size) if best else default


@functools.lru_cache(maxsize=32)
def _font_drawing_most(chars: str) -> str | None:
    best, best_lacking = None, len(chars)
    for path in sorted(discover_fonts(), key=lambda p: (p.name != "DejaVuSans.ttf", p.name)):
        info = inspect_font(path, chars)
        if info is not None and len(set(chars) - info.covered) < best_lacking:
            best, best_lacking = info.path, len(set(chars) - info.covered)
            if not best_lacking:
                break
    return best
