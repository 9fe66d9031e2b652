"""Training experiment configs: YAML files plus `section.key=value` overrides; every key is checked."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clip4str.model_config import ModelConfig
from clip4str.train.checks import check_sources, check_values, short


@dataclass
class ModelSection:
    """Which model to build: preset, initialisation, and any `ModelConfig` key (freezing, peft, ...)."""

    preset: str = "tiny"
    init: str = "random"  # random | builtin | clip:<file> | imagenet:<file> | checkpoint:<clip4str folder>
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """Training sources with mixing weights, validation sets, batching and synthetic-data options."""

    train: list[dict[str, Any]] = field(default_factory=lambda: [{"path": "synth", "weight": 1.0}])
    val: list[str] = field(default_factory=list)
    synth_val_size: int = 0
    batch_size: int = 64
    num_workers: int = 1
    augment: bool = True
    curriculum_images: int = 0  # ramp synthetic difficulty and augmentation from 0 to 1 over this many images
    scale_jitter: float = 0.0  # share of samples whose text is rescaled vertically (edge rows added or cut)
    join_real: float = 0.0  # share of real samples joined side by side with another crop of their source
    fonts: list[str] | None = None
    backgrounds: list[str] | None = None
    min_fonts: int = 0  # refuse to train when the synthetic words would use fewer usable fonts than this
    min_photos: int = 0  # ... or fewer background photos

    def __post_init__(self) -> None:
        if not 0.0 <= self.scale_jitter <= 1.0:
            raise ValueError(f"data.scale_jitter is a share of samples in [0, 1], got {self.scale_jitter!r}")
        if not 0.0 <= self.join_real <= 1.0:
            raise ValueError(f"data.join_real is a share of samples in [0, 1], got {self.join_real!r}")


@dataclass
class TrainSection:
    """Optimisation, precision, devices, validation and checkpoint cadence, output folder."""

    max_steps: int = 1000
    max_minutes: float | None = None  # a wall-clock budget: the schedule follows time; max_steps stays a cap
    base_lr: float = 8.4e-5
    decoder_lr_scale: float = 19.0
    weight_decay: float = 0.2
    warmup_pct: float = 0.075
    grad_clip: float = 20.0
    average_from: float | None = None  # average the weights of every step from this share of the schedule on
    precision: str = "bf16-mixed"
    accelerator: str = "auto"
    devices: int | str | list[int] = 1  # a count, 'auto', or the GPU ids
    num_nodes: int = 1
    strategy: str = "auto"
    accumulate_grad_batches: int = 1
    seed: int = 0
    val_every_steps: int = 500
    checkpoint_every_minutes: float | None = 10.0
    checkpoint_every_steps: int | None = None
    log_every_steps: int = 10
    threads: int | None = None
    compile_encoder: bool = False  # torch.compile the image tower of training steps (1.3x faster tiny steps on CPU)
    out_dir: str = "runs/experiment"

    def __post_init__(self) -> None:
        d = self.devices
        if not (d == "auto" or (type(d) is int and (d >= 1 or d == -1)) or (
                isinstance(d, list) and d and all(type(i) is int and i >= 0 for i in d) and len(set(d)) == len(d))):
            raise ValueError(f"train.devices must be a count >= 1 (-1: all), 'auto', or a list of distinct device "
                             f"ids such as [0, 1], got {short(d)}")
        if self.average_from is not None and not 0.0 <= self.average_from < 1.0:
            raise ValueError(f"train.average_from is the share of the schedule after which every step's weights "
                             f"are averaged, in [0, 1), got {self.average_from!r}")


@dataclass
class TrainConfig:
    """A whole experiment."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in the layout a config file takes (for YAML and checkpoint provenance)."""
        doc = dataclasses.asdict(self)
        doc["model"].update(doc["model"].pop("overrides"))  # a run's config.yaml reloads as --config
        return doc


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection}
MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}


def _check_keys(section: str, values: dict[str, Any]) -> None:
    if section == "train" and "swa_lr" in values:
        # Lightning's epoch-based SWA never ran on the streamed data (it stopped every run at its start).
        if values.pop("swa_lr") is not None:  # `swa_lr: null` in the config.yaml of an earlier run: nothing to do
            raise ValueError("train.swa_lr is gone (it could not run on streamed data); use train.average_from "
                             "(e.g. 0.75: average the weights of every step of the schedule's last quarter)")
    cls = SECTIONS[section]
    names = {f.name for f in dataclasses.fields(cls)} - {"overrides"}
    allowed = names | (MODEL_KEYS if section == "model" else set())
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                         f"valid keys in '{section}': {', '.join(sorted(allowed))}")


def build_config(doc: dict[str, Any]) -> TrainConfig:
    """Validate a nested dict and build the config; model keys outside the section's own go to overrides."""
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; sections are {sorted(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        raw = doc.get(name) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config section '{name}' must be a mapping of keys to values, got {short(raw)}")
        values = dict(raw)
        _check_keys(name, values)
        check_values(name, cls, values)
        if name == "model":
            check_values(name, ModelConfig, values)
            own = {f.name for f in dataclasses.fields(cls)}
            values = {**{k: v for k, v in values.items() if k in own},
                      "overrides": {k: v for k, v in values.items() if k not in own}}
        if name == "data" and "train" in values:
            check_sources(values["train"])
        sections[name] = cls(**values)
    return TrainConfig(**sections)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (path, YAML-parsed value)."""
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=100)")
    try:
        return key.split("."), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        reason = " ".join(str(e).split())[:160]
        raise ValueError(f"override {item!r}: the value is not valid YAML ({reason}); quote it: "
                         f"\"{key}='{raw}'\"") from e


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML experiment and apply `section.key=value` overrides."""
    doc: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            reason = " ".join(str(e).split())[:200]
            raise ValueError(f"{p} is not valid YAML ({reason})") from e
        if not isinstance(doc, dict):
            raise ValueError(f"{p} must hold a mapping with sections {sorted(SECTIONS)}")
    for item in overrides:
        keys, value = parse_override(item)
        node = doc
        for depth, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(keys[:depth + 1])} is {short(node)}, not a section "
                                 "with keys")
        node[keys[-1]] = value
    return build_config(doc)
