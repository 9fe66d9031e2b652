"""The CLIP4STR module: CLIP image encoder -> image decoder -> CLIP text encoder -> cross-modal decoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clip4str.cascade import confident_rows
from clip4str.charset import CharsetAdapter, DecodedText, Tokenizer, caption_updates, pass_memories
from clip4str.draft import ctc_drafts
from clip4str.model import ctc
from clip4str.model.decoder import Decoder
from clip4str.model.greedy import cached_greedy, recomputing_greedy
from clip4str.model.loss import LossOutput, permutation_loss
from clip4str.model.peft import build_peft
from clip4str.model.permutations import (
    causal_masks,
    cloze_query_mask,
    generate_permutations,
)
from clip4str.model.refine import Refined, refine_context, table_refine
from clip4str.model.static_step import step_tables
from clip4str.model.towers import (
    build_clip,
    clip_bpe_tokenizer,
    encode_image_tokens,
    encode_text_tokens,
    freeze_image_tower,
    freeze_text_tower,
)
from clip4str.model_config import DECODE_MODES, ModelConfig


@dataclass
class DecodeOutput:
    """Logits of the final prediction and of the image branch; `*_lengths` = valid positions per row."""

    logits: torch.Tensor
    lengths: torch.Tensor
    image_logits: torch.Tensor
    image_lengths: torch.Tensor


class CLIP4STR(nn.Module):
    """CLIP4STR as a pure module: `forward` computes the permutation loss, `decode` predicts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = Tokenizer(config.charset)
        self.caption_adapter = CharsetAdapter(config.caption_charset)
        self.clip = build_clip(config.clip)
        self.clip.logit_scale.requires_grad_(False)  # only the zero-shot ranking uses it
        self.provenance: dict = {}
        self.train_image_tokens = encode_image_tokens  # training's image tower (train.compile_encoder compiles it)

        def decoder() -> Decoder:
            return Decoder(config.embed_dim, config.decoder_heads, config.decoder_depth, config.decoder_mlp_ratio,
                           config.dropout, len(self.tokenizer), self.tokenizer.num_classes,
                           config.max_label_length + 1)

        self.image_decoder = decoder()
        # Joint CTC (as in attention-based speech recognition) gives the image tower a per-column character
        # signal while the decoders' attention still has to find where each character is; training only.
        self.ctc_head = nn.Linear(config.embed_dim, self.tokenizer.num_classes) if config.ctc_weight > 0 else None
        self.cross_decoder = decoder() if config.cross_branch else None
        self.image_peft, self.text_peft = build_peft(config.peft, self.clip, config.adapter_ratio,
                                                     config.lst_reduction)
        if config.peft != "none":  # parameter-efficient tuning: the whole CLIP is frozen
            self.clip.requires_grad_(False)
            self._frozen = [self.clip]
        else:
            self._frozen = freeze_text_tower(self.clip, config.text_freeze_layers) + \
                freeze_image_tower(self.clip.visual, config.image_freeze_layers)

    def train(self, mode: bool = True) -> CLIP4STR:
        """Set train/eval mode; frozen tower parts always stay in eval mode."""
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    # -- encoders -------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> image tokens (B, N, D)."""
        h, w = self.config.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, h, w):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected a float tensor of shape (B, 3, {h}, {w}), got {got}; "
                             "prepare images with clip4str.data.transforms.preprocess")
        if images.shape[0] == 0:
            raise ValueError("empty batch: give at least one image")
        if self.image_peft is not None:
            return self.image_peft(self.clip.visual, images)
        return (self.train_image_tokens if self.training else encode_image_tokens)(self.clip.visual, images)

    def encode_text(self, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        """Captions -> CLIP text features of every token (B, context, D)."""
        ids = clip_bpe_tokenizer(self.config.text_context_length)(list(captions)).to(device)
        features = encode_text_tokens(self.clip, ids)
        return self.text_peft(features) if self.text_peft is not None else features

    def captions(self, logits: torch.Tensor, lengths: torch.Tensor | None = None) -> list[str]:
        """Greedy strings of image-branch logits, cut at EOS and mapped to the caption charset."""
        return self.tokenizer.captions(logits.argmax(-1).tolist(), None if lengths is None else lengths.tolist(),
                                       self.caption_adapter)

    def cross_memories(self, image_tokens: torch.Tensor, passes: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """[image tokens ; text tokens] for each pass of captions; image tokens detached so the cross loss never
        trains the image tower. One text-encoder call reads the first pass and every caption a later pass changed
        (at small batches a batch costs little more than a row); a pass that changes nothing gets the same tensor."""
        texts, rows = caption_updates(passes)
        text = self.encode_text(texts, image_tokens.device).to(image_tokens.dtype)
        first = torch.cat([image_tokens.detach(), text[: len(rows[0])]], dim=1)
        return pass_memories(first, text, rows, image_tokens.shape[1], torch.clone)

    # -- training -------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: Sequence[str] | torch.Tensor, perms: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> LossOutput:
        """Permutation language modelling loss of both branches (the cross branch gets the true context)."""
        tgt = labels if isinstance(labels, torch.Tensor) else self.tokenizer.encode(labels)
        if len(tgt) != len(images):
            raise ValueError(f"{len(images)} images but {len(tgt)} labels")
        # Checked where the labels were made (the host, for strings): on a GPU a check of device values waits for it.
        if (tgt[:, 1] == self.tokenizer.eos_id).any():
            raise ValueError("a label is empty after dropping characters outside the charset")
        lengths = ctc.label_lengths(tgt, self.tokenizer) if self.ctc_head is not None else None
        tgt = tgt.to(images.device)
        memory = self.encode_image(images)
        if perms is None:
            cfg = self.config
            perms = generate_permutations(tgt.shape[1] - 2, cfg.num_permutations, cfg.perm_forward,
                                          cfg.perm_mirrored, generator, images.device)
        return permutation_loss(self, memory, tgt, perms, lengths)

    # -- decoding -------------------------------------------------------------------------------------
    def decode(self, images: torch.Tensor, mode: str | None = None, refine_iters: int | None = None,
               max_length: int | None = None, early_exit: bool = True, kv_cache: bool = True,
               guard: bool = True, compiled: bool = False, rescore: bool = True, draft: bool = True,
               cascade: bool = True) -> DecodeOutput:
        """Predict logits for preprocessed images; every row is decoded as if it were alone in the batch.

        mode: 'ar' (greedy autoregressive) or 'nar' (one pass); refine_iters: cloze refinement passes per
        branch; max_length caps the label length; early_exit stops AR decoding once every row emitted EOS;
        kv_cache=False recomputes the whole prefix at every AR step and refines without the step tables (the
        reference's way; for benchmarks/tests);
        guard: rows that run away are read by the CTC head instead, where the model has one (`ctc.guard_runaways`);
        compiled: the AR step through `torch.compile` (`static_step.compiled_decoding_step`; the same readings,
        logits within rounding);
        rescore: where the final, image-branch and CTC readings differ, give the one both decoders and the CTC
        head score highest (`clip4str.rescore`; AR mode, models with a CTC head);
        draft: AR decoding of one-layer decoders checks a draft in one pass and steps only from where it is wrong
        (the CTC reading for the image branch, the image branch's for the cross branch; `greedy.check_draft`):
        the same readings, a pass instead of a step per character where the draft is right;
        cascade: in AR mode, rows whose image-branch reading equals the CTC head's with at least the config's
        `cascade_confidence` skip the cross branch (`clip4str.cascade`; models that set it and have a CTC head).
        """
        mode = self.config.decode_mode if mode is None else mode
        refine_iters = self.config.refine_iters if refine_iters is None else refine_iters
        if mode not in DECODE_MODES:
            raise ValueError(f"mode must be one of {DECODE_MODES}, got {mode!r}")
        limit = self.config.max_label_length if max_length is None else min(max_length, self.config.max_label_length)
        steps = limit + 1
        memory = self.encode_image(images)
        rescore = rescore and mode == "ar"
        draft = draft and mode == "ar" and kv_cache
        cascade = cascade and mode == "ar" and self.cross_decoder is not None and \
            self.config.cascade_confidence is not None
        log_probs = None
        if self.ctc_head is not None and (guard or rescore or draft or cascade):
            log_probs = ctc.column_log_probs(self.ctc_head, memory, self.clip.visual.grid_size).detach().cpu().numpy()
        # Keys and values of a memory are projected once per decoder and reused by its passes.
        img_kv = self.image_decoder.memory_kv(memory)
        img_draft = None
        if draft and log_probs is not None:
            img_draft = torch.from_numpy(ctc_drafts(log_probs, self.tokenizer.eos_id)).to(memory.device)
        # A right draft's check also gives the first refinement (`greedy.check_draft`): one pass instead of two.
        refine = refine_iters > 0
        img_logits, img_len, ahead = self._first_pass(self.image_decoder, img_kv, steps, mode, early_exit, None,
                                                      kv_cache, compiled, img_draft, refine)
        # The image branch never reads the cross branch, so all its passes come first.
        img_passes = [(img_logits, img_len)]
        for _ in range(refine_iters):
            img_logits, img_len = self._refine(self.image_decoder, img_kv, img_logits, img_len, steps, kv_cache, ahead)
            img_passes.append((img_logits, img_len))
            ahead = None
        rows = torch.arange(len(images), device=memory.device)
        if cascade and log_probs is not None:
            top_probs, top_ids = img_logits.detach().float().softmax(-1).max(-1)
            sure = confident_rows(top_ids.cpu().numpy(), top_probs.cpu().numpy(), img_len.cpu().numpy(), log_probs,
                                  self.tokenizer.eos_id, self.config.cascade_confidence)
            rows = rows[torch.from_numpy(~sure).to(memory.device)]
        logits, lengths = img_logits, img_len
        if len(rows):
            every = len(rows) == len(images)

            def part(t: torch.Tensor) -> torch.Tensor:
                return t if every else t[rows]

            kv = img_kv if every else [(part(k), part(v)) for k, v in img_kv]
            final = (part(img_logits), part(img_len))
            cross = None
            if self.cross_decoder is not None:
                *final, cross_kv = self._cross_branch(part(memory), [(part(x), part(n)) for x, n in img_passes],
                                                      steps, mode, early_exit, kv_cache, compiled, draft, refine)
                cross = (self.cross_decoder, cross_kv)
            if log_probs is not None and rescore:
                final = ctc.joint_rescore((*final, part(img_logits), part(img_len)), [(self.image_decoder, kv), cross],
                                          log_probs if every else log_probs[rows.cpu().numpy()], limit,
                                          self.tokenizer)
            logits, lengths = final if every else _merge_rows(img_logits, img_len, rows, *final)
        if log_probs is not None and guard:
            logits, lengths = ctc.guard_runaways(logits, lengths, lambda: log_probs, self.tokenizer.eos_id)
        return DecodeOutput(logits, lengths, img_logits, img_len)

    def _cross_branch(self, memory: torch.Tensor, img_passes: list[tuple[torch.Tensor, torch.Tensor]], steps: int,
                      mode: str, early_exit: bool, kv_cache: bool, compiled: bool, draft: bool, refine: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The cross branch's logits, lengths and memory keys/values over image `memory`, given the image branch's
        (logits, lengths) after its first pass and each refinement: its first pass reads the captions of the
        image branch's first pass, each refinement those of the image branch's refinement of the same rank."""
        (first, first_len), *refined = img_passes
        passes = [self.captions(first, first_len)] + [self.captions(img_logits) for img_logits, _ in refined]
        cross_mem, *later = self.cross_memories(memory, passes)
        cross_kv = self.cross_decoder.memory_kv(cross_mem)
        logits, lengths, ahead = self._first_pass(self.cross_decoder, cross_kv, steps, mode, early_exit, first_len,
                                                  kv_cache, compiled, first.argmax(-1) if draft else None, refine)
        for new_mem in later:
            if new_mem is not cross_mem:  # a refinement computed ahead held for the old memory only
                cross_mem, cross_kv, ahead = new_mem, self.cross_decoder.memory_kv(new_mem), None
            logits, lengths = self._refine(self.cross_decoder, cross_kv, logits, lengths, steps, kv_cache, ahead)
            ahead = None
        return logits, lengths, cross_kv

    def _first_pass(self, decoder: Decoder, memory: torch.Tensor | list, steps: int, mode: str, early_exit: bool,
                    budget: torch.Tensor | None, kv_cache: bool = True, compiled: bool = False,
                    draft: torch.Tensor | None = None, refine: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, Refined | None]:
        """Greedy (AR) or one-pass (NAR) logits and lengths over `memory` (tokens, or `decoder.memory_kv`'s), and
        the first refinement computed ahead or None; `draft` and `refine` as `greedy.cached_greedy`'s."""
        kv = decoder.memory_kv(memory) if isinstance(memory, torch.Tensor) else memory
        b, device = kv[0][0].shape[0], kv[0][0].device
        tok = self.tokenizer
        if mode == "nar":
            bos = torch.full((b, 1), tok.bos_id, dtype=torch.long, device=device)
            return decoder(bos, kv, query_len=steps), torch.full((b,), steps, device=device), None
        # The cross branch decodes as many steps as the image branch took for that row (the reference).
        stops_at_eos = budget is None
        budget = torch.full((b,), steps, device=device) if budget is None else budget
        ahead = None
        if kv_cache:
            logits, ahead = cached_greedy(decoder, kv, steps, early_exit, budget, tok, compiled, draft, refine)
        else:
            logits = recomputing_greedy(decoder, kv, steps, early_exit, budget, tok)
        lengths = budget.clamp(max=logits.shape[1])
        if early_exit and stops_at_eos:
            # A row alone stops right after its first EOS: that is its length.
            is_eos = logits.argmax(-1) == tok.eos_id
            first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, logits.shape[1])
            lengths = torch.minimum(lengths, first)
        return logits, lengths, ahead

    def _refine(self, decoder: Decoder, memory_kv: list, logits: torch.Tensor, lengths: torch.Tensor,
                steps: int, tables: bool = True, ahead: Refined | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        ctx, padding = refine_context(logits.argmax(-1), lengths, tok.bos_id, tok.eos_id)
        if tables and len(decoder.layers) == 1:  # the content stream is never updated: layer 0's tables serve
            out = table_refine(decoder, memory_kv, ctx, padding, steps, tok.eos_id, step_tables(decoder, steps),
                               ahead)
        else:
            content_mask, _ = causal_masks(ctx.shape[1], logits.device)
            out = decoder(ctx, memory_kv, content_mask, padding, query_len=steps,
                          query_mask=cloze_query_mask(steps, ctx.shape[1], logits.device))
        return out, torch.full((ctx.shape[0],), out.shape[1], device=logits.device)

    @torch.inference_mode()
    def read(self, images: torch.Tensor, **decode_options: object) -> list[DecodedText]:
        """Preprocessed images -> text, confidence and per-character probabilities for each image."""
        out = self.decode(images, **decode_options)
        return self.tokenizer.decode(out.logits.float().softmax(-1), out.lengths.tolist())


def _merge_rows(logits: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor, part_logits: torch.Tensor,
                part_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, lengths) with `rows` replaced by a part's; positions past a row's length are unspecified."""
    width = max(logits.shape[1], part_logits.shape[1])
    out = F.pad(logits, (0, 0, 0, width - logits.shape[1])) if width > logits.shape[1] else logits.clone()
    out[rows, :part_logits.shape[1]] = part_logits.to(out.dtype)
    lengths = lengths.clone()
    lengths[rows] = part_lengths.to(lengths.dtype)
    return out, lengths
