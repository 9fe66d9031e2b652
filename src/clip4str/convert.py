"""The authors' released CLIP4STR (VL4STR) checkpoints -> our module, with the architecture read from shapes.

Their `.ckpt` files are Lightning checkpoints (weights under `state_dict`); their `.pt` files are plain state
dicts. Keys: `clip_model.*` (an OpenAI-layout CLIP), `visual_decoder.*`, `cross_decoder.*`. Their code builds
every CLIP with OpenAI-style blocks (QuickGELU) and width // 64 heads, also for OpenCLIP ViT-H weights; their
released models were fine-tuned that way, so a converted model keeps that architecture to give the same
predictions. Preprocessing is recorded as the one their models were trained with (OpenAI CLIP mean/std,
224x224 bicubic), not the 0.5/0.5 their test scripts use by mistake.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clip4str.charset import CHARSETS
from clip4str.model import CLIP4STR, ModelConfig
from clip4str.model_config import OPENAI_MEAN, OPENAI_STD
from clip4str.weights import count_blocks, infer_clip_config, read_tensors

PREFIXES = {"clip_model.": "clip.", "visual_decoder.": "image_decoder.", "cross_decoder.": "cross_decoder."}
# Keys their model holds that ours computes instead (buffers), reported as unused rather than an error.
IGNORED = ("clip_model.attn_mask",)
DECODER_HEADS = 8  # every configuration of theirs; the head count cannot be read from the weights


KNOWN_TOWERS = {(768, 12, 16): "ViT-B/16", (768, 12, 32): "ViT-B/32", (1024, 24, 14): "ViT-L/14",
                (1280, 32, 14): "ViT-H/14"}


def architecture_name(config: ModelConfig) -> str:
    """'ViT-B/16'-style name of the image tower, or 'custom WxL/P' for other sizes."""
    v = config.clip["vision_cfg"]
    key = (v["width"], v["layers"], v["patch_size"])
    return KNOWN_TOWERS.get(key, f"custom ViT {v['width']}x{v['layers']}/{v['patch_size']}")


def _charset_for(num_classes: int, charset: str | None) -> str:
    if charset is not None:
        if len(charset) + 1 != num_classes:
            raise ValueError(f"the checkpoint predicts {num_classes - 1} characters but the given charset has "
                             f"{len(charset)}")
        return charset
    for chars in (CHARSETS["94"], CHARSETS["62"], CHARSETS["36"]):
        if len(chars) + 1 == num_classes:
            return chars
    raise ValueError(f"the checkpoint predicts {num_classes - 1} characters, which is none of the 36/62/94 "
                     "charsets; pass its charset (in its token order) explicitly")


def authors_config(state: dict[str, torch.Tensor], charset: str | None = None) -> ModelConfig:
    """Our model config for an authors' state dict, from tensor shapes alone."""
    clip_state = {k[len("clip_model."):]: v for k, v in state.items() if k.startswith("clip_model.")}
    clip = infer_clip_config(clip_state, quick_gelu=True)
    clip["vision_cfg"]["head_width"] = 64  # their rule (wrong for ViT-H, but what their weights were trained with)
    pos = state["visual_decoder.pos_queries"]
    head = state["visual_decoder.head.weight"]
    hidden = state["visual_decoder.layers.0.linear1.weight"].shape[0]
    return ModelConfig(
        clip=clip, charset=_charset_for(head.shape[0], charset), max_label_length=pos.shape[1] - 1,
        decoder_depth=count_blocks(state, "visual_decoder.layers."), decoder_heads=DECODER_HEADS,
        decoder_mlp_ratio=hidden / pos.shape[2], text_context_length=16,
        cross_branch=any(k.startswith("cross_decoder.") for k in state),
        text_freeze_layers=clip["text_cfg"]["layers"] // 2,  # the paper's default (6 of 12), for fine-tuning
        image_mean=OPENAI_MEAN, image_std=OPENAI_STD)


def read_authors_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The VL4STR state dict of a `.ckpt` (Lightning) or `.pt` file; clear errors for anything else."""
    p = Path(path)
    if not p.is_file():
        what = "is a folder; give the .ckpt or .pt file" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {str(p)!r} {what}")
    raw, _ = read_tensors(p, kind="authors' checkpoint")
    state = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not any(k.startswith("visual_decoder.") for k in state):
        if "visual.conv1.weight" in state or "clip_model.visual.conv1.weight" in state:
            kind = "a CLIP model (use it as model.init=clip:FILE or create_model(..., clip_checkpoint=FILE))"
        elif any(k.startswith("model.image_decoder.") for k in state):
            raise ValueError(f"{str(p)!r} is a clip4str training checkpoint (a run's last.ckpt), not a model: give "
                             "the run's final/ folder, or export it with `clip4str train --config CONFIG "
                             "--export-last DIR` (and --resume to train on)")
        elif any(k.startswith(("decoder.", "encoder.", "model.decoder.")) for k in state):
            kind = "a PARSeq checkpoint, not CLIP4STR"
        else:
            kind = "not a CLIP4STR checkpoint"
        raise ValueError(f"authors' checkpoint {str(p)!r} holds no visual_decoder.* weights: {kind}")
    return state


def convert_state(state: dict[str, torch.Tensor], model: CLIP4STR, source: str) -> tuple[dict, list[str]]:
    """Map every source key to ours; returns (our state dict, unused source keys). Missing targets fail."""
    mapped, unused = {}, []
    for key, value in state.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if prefix is None or key in IGNORED:
            unused.append(key)
            continue
        mapped[PREFIXES[prefix] + key[len(prefix):]] = value.float()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    if missing:
        theirs = [k.replace("clip.", "clip_model.", 1).replace("image_decoder.", "visual_decoder.", 1)
                  for k in missing[:4]]
        raise ValueError(f"{source} lacks {len(missing)} weight(s) the model needs, e.g. {', '.join(theirs)}")
    extra = sorted(set(mapped) - set(expected))
    wrong = [k for k in mapped if k in expected and mapped[k].shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{source}: shapes do not fit the inferred architecture at {', '.join(wrong[:4])}")
    unused += extra
    return {k: v for k, v in mapped.items() if k in expected}, unused


def load_authors_checkpoint(path: str | Path, charset: str | None = None) -> tuple[CLIP4STR, dict[str, Any]]:
    """An authors' `.ckpt`/`.pt` as our module (eval mode) and a report: {'unused': [...], 'config': ...}."""
    state = read_authors_state(path)
    try:
        config = authors_config(state, charset)
    except KeyError as e:
        raise ValueError(f"{path} lacks {e.args[0]!r}; the checkpoint is incomplete") from e
    except ValueError as e:  # sizes read from its tensors out of range: damaged, or made to exhaust memory
        raise ValueError(f"{path}: its tensors describe no CLIP4STR model this library builds ({e})") from e
    model = CLIP4STR(config)
    ours, unused = convert_state(state, model, str(path))
    model.load_state_dict(ours)
    return model.eval(), {"unused": unused, "source": str(path)}
