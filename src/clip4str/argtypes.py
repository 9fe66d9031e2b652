"""argparse types of the command line: a value out of range is a usage error naming the option, not a traceback
from deep inside (a port of 70000, a NaN upload limit, a device PyTorch cannot run on)."""

from __future__ import annotations

import argparse
import math
import re


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_number(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def device_name(text: str) -> str:
    """argparse type: a PyTorch device a model can run on (cpu, cuda, cuda:1, mps, xpu:0)."""
    if not re.fullmatch(r"cpu|mps|(cuda|xpu)(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device to run on; give cpu, cuda, cuda:N or mps")
    return text


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1-65535, got {value}")
    return value


def word_template(text: str) -> str:
    """argparse type: a caption with one {} where the candidate word goes and no other braces."""
    try:
        filled = text.format("\0")
    except (IndexError, KeyError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: one {{}} where the word goes, other braces doubled "
                                         f"({{{{ }}}}) ({type(e).__name__})") from e
    if filled.count("\0") != 1:
        raise argparse.ArgumentTypeError(f"{text!r} needs exactly one {{}} where the word goes")
    return text
