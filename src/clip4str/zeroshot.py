"""Zero-shot word ranking with CLIP towers: which candidate word does the image show?"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from clip4str.data.transforms import ImageInput, preprocess
from clip4str.model.towers import clip_bpe_tokenizer
from clip4str.model_config import OPENAI_MEAN, OPENAI_STD

DEFAULT_TEMPLATE = 'a photo of the word "{}".'


@torch.inference_mode()
def rank_words(clip: CLIP, image: ImageInput, candidates: Sequence[str], template: str = DEFAULT_TEMPLATE,
               mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> list[tuple[str, float]]:
    """Softmax over image-text similarities of `template` filled with each candidate, best first."""
    if not candidates:
        raise ValueError("give at least one candidate word")
    if "{}" not in template:
        raise ValueError(f"the template {template!r} needs a {{}} where the word goes")
    clip = clip.eval()
    size = clip.visual.image_size
    device = next(clip.parameters()).device
    x = preprocess(image, size, mean, std).to(device)
    ids = clip_bpe_tokenizer(clip.positional_embedding.shape[0])([template.format(c) for c in candidates])
    image_features = F.normalize(clip.encode_image(x), dim=-1)
    text_features = F.normalize(clip.encode_text(ids.to(device)), dim=-1)
    probs = (clip.logit_scale.exp() * image_features @ text_features.T).softmax(-1)[0]
    return sorted(zip(candidates, probs.tolist(), strict=True), key=lambda item: -item[1])
