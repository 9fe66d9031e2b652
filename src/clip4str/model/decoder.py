"""PARSeq's two-stream (query + content) decoder: layers, stack, token embedding and head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clip4str.model import onednn
from clip4str.model.dropout import Dropout, dropout

KV = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Multi-head attention with `nn.MultiheadAttention`'s parameter names, computed with fused SDPA.

    Keys and values of a fixed memory can be projected once (`project_kv`) and reused at every step.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.scale = (dim // heads) ** -0.5  # a constant: shape arithmetic would turn symbolic under torch.compile
        self.weights: torch.Tensor | None = None  # head-averaged attention of the last call, when recording
        self.record = False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def packable_weights(self) -> list[torch.Tensor]:
        """The keys-and-values rows of the projection, which `project_kv` multiplies in one `onednn.linear`
        (`onednn.pack_linears`): a decoder's memory is projected through it once per read."""
        # Detached (same storage and version counter): a view with autograd history would make the module
        # impossible to deep-copy.
        self._kv_weight = self.in_proj_weight.detach()[self.in_proj_weight.shape[1]:]
        return [self._kv_weight]

    def project_kv(self, x: torch.Tensor) -> KV:
        """Project keys and values of `x`: two (B, H, L, D/H) tensors."""
        dim = self.in_proj_weight.shape[1]
        weight, registered = self.in_proj_weight[dim:], self.__dict__.get("_kv_weight")
        if registered is not None and registered.data_ptr() != weight.data_ptr():
            # The parameter's data was replaced (`.data = ...`, a move to another device): the view would keep the
            # old storage alive. Reading goes on through the plain product until `pack_linears` runs again.
            del self._kv_weight
            registered = None
        k, v = onednn.linear(x, weight, self.in_proj_bias[dim:], registered=registered).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def query_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Project queries of `x` (B, L, D): (B, H, L, D/H)."""
        w_q, b_q = self.in_proj_weight.chunk(3)[0], self.in_proj_bias.chunk(3)[0]
        return self._heads(F.linear(x, w_q, b_q))

    def forward(self, query: torch.Tensor, kv: torch.Tensor | KV, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from `query` (B, Lq, D) over `kv` (tensor or projected pair); `mask` is additive."""
        k, v = self.project_kv(kv) if isinstance(kv, torch.Tensor) else kv
        return self.attend(self.query_heads(query), k, v, mask)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of projected heads (B, H, Lq, D/H) over (B, H, L, D/H), then the output projection."""
        if mask is not None:
            mask = mask.to(q.dtype)
        p = self.dropout if self.training else 0.0
        # Explicit softmax only when the weights are wanted (attention maps) or dropped out on CPU (the kernels'
        # own dropout draws its mask with bernoulli_, slower there than the attention itself): the fused kernel
        # is faster at every size of a read here, one query included (torch 2.14, CPU: 6 us against 12 for 81
        # keys).
        if self.record or (p and q.device.type == "cpu"):
            # Scaled first and the softmax in fp32, as SDPA does (under bf16 autocast the scores themselves are
            # bf16 here, where SDPA's math kernel keeps them in fp32: training only, at its noise level).
            scores = (q * self.scale) @ k.transpose(-1, -2)
            weights = (scores + mask if mask is not None else scores).softmax(-1, dtype=torch.float32).to(v.dtype)
            if self.record:
                self.weights = weights.mean(1).detach()
            out = dropout(weights, p, True) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    """Pre-LayerNorm two-stream layer: self-attention over the content, cross-attention over memory, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout)
        self.cross_attn = Attention(dim, heads, dropout)
        hidden = int(dim * mlp_ratio)
        self.linear1, self.linear2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_q, self.norm_c = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)

    def _stream(self, x: torch.Tensor, x_norm: torch.Tensor, content: torch.Tensor | KV, memory: torch.Tensor | KV,
                mask: torch.Tensor | None, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.finish(x + self.dropout(self.self_attn(x_norm, content, mask)), memory, memory_mask)

    def finish(self, x: torch.Tensor, memory: torch.Tensor | KV, memory_mask: torch.Tensor | None = None
               ) -> torch.Tensor:
        """The stream after its self-attention: cross-attention over memory, then the MLP."""
        x = x + self.dropout(self.cross_attn(self.norm1(x), memory, memory_mask))
        return x + self.dropout(self.linear2(self.dropout(F.gelu(self.linear1(self.norm2(x))))))

    def forward(self, query: torch.Tensor, content: torch.Tensor, memory: torch.Tensor | KV,
                query_mask: torch.Tensor | None, content_mask: torch.Tensor | None,
                update_content: bool, memory_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        content_norm = self.norm_c(content)
        query = self._stream(query, self.norm_q(query), content_norm, memory, query_mask, memory_mask)
        if update_content:
            content = self._stream(content, content_norm, content_norm, memory, content_mask)
        return query, content


class TokenEmbedding(nn.Module):
    """Token embedding scaled by sqrt(width)."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, dim)
        self.scale = math.sqrt(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.scale * self.embedding(tokens)


def additive_mask(blocked: torch.Tensor | None, padding: torch.Tensor | None) -> torch.Tensor | None:
    """Combine a (Lq, Lk) blocked mask and a (B, Lk) padding mask (True = hidden) into (B|1, 1, Lq, Lk)."""
    if blocked is None and padding is None:
        return None
    hidden = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=(blocked if blocked is not None else padding).device)
    if blocked is not None:
        hidden = hidden | blocked[None, None]
    if padding is not None:
        hidden = hidden | padding[:, None, None, :]
    return torch.zeros(hidden.shape, device=hidden.device).masked_fill_(hidden, float("-inf"))


def _forget_step_tables(module: nn.Module, *_: object) -> None:
    # `static_step.step_tables` caches tables computed from the weights in the module's __dict__.
    module.__dict__.pop("_step_tables", None)


class Decoder(nn.Module):
    """Decoder stack with position queries, token embedding, final norm and classification head."""

    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float, dropout: float,
                 num_tokens: int, num_classes: int, max_positions: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.pos_queries = nn.Parameter(torch.empty(1, max_positions, dim))
        self.text_embed = TokenEmbedding(num_tokens, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.dropout = Dropout(dropout)
        self._init_weights()
        self.register_load_state_dict_post_hook(_forget_step_tables)

    def train(self, mode: bool = True) -> Decoder:
        """Set train/eval mode; decoding's step tables are computed again afterwards."""
        _forget_step_tables(self)
        return super().train(mode)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_queries, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)

    def content(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Content stream input of `tokens` at content `positions` (broadcast): BOS at 0 is the null context,
        only the characters after it get a position."""
        pos = self.pos_queries[0]
        return self.text_embed(tokens) + torch.cat([torch.zeros_like(pos[:1]), pos[:-1]])[positions]

    def memory_kv(self, memory: torch.Tensor) -> list[KV]:
        """Keys and values of the memory for every layer, computed once for many decoding steps."""
        return [layer.cross_attn.project_kv(memory) for layer in self.layers]

    def forward(self, tgt_in: torch.Tensor, memory: torch.Tensor | list[KV], content_mask: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, query_start: int = 0, query_len: int | None = None,
                query_mask: torch.Tensor | None = None, query_repeats: int = 1,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, R * Lq, C) for position queries [query_start, query_start + Lq), repeated R times.

        Masks are boolean with True = hidden: content (L, L), query (R * Lq, L), padding (B, L),
        memory (R * Lq, M).
        """
        query_len = tgt_in.shape[1] if query_len is None else query_len
        query = self.pos_queries[:, query_start: query_start + query_len].repeat(1, query_repeats, 1)
        return self.run(tgt_in, memory, query, content_mask, padding_mask, query_mask, memory_mask)

    def run(self, tgt_in: torch.Tensor, memory: torch.Tensor | list[KV], query: torch.Tensor,
            content_mask: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
            query_mask: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for explicit position queries (1 or B, Lq, D); masks as in `forward`."""
        b, length = tgt_in.shape
        content = self.dropout(self.content(tgt_in, torch.arange(length, device=tgt_in.device)))
        query = self.dropout(query.expand(b, -1, -1))
        q_mask = additive_mask(query_mask, padding_mask)
        c_mask = additive_mask(content_mask, padding_mask) if len(self.layers) > 1 else None
        m_mask = additive_mask(memory_mask, None)
        mem = memory if isinstance(memory, list) else [memory] * len(self.layers)
        for i, layer in enumerate(self.layers):
            query, content = layer(query, content, mem[i], q_mask, c_mask, i < len(self.layers) - 1, m_mask)
        return self.head(self.norm(query))

    def forward_permutations(self, tgt_in: torch.Tensor, memory: torch.Tensor, content_masks: torch.Tensor,
                             query_masks: torch.Tensor, padding_mask: torch.Tensor,
                             perm_memory: torch.Tensor | None = None) -> torch.Tensor:
        """Training logits (B, P, L, C) for P permutations' masks (P, L, L) in one pass.

        `perm_memory` (B, P, M, D) adds memory tokens seen only by permutation p (the cross branch's text).
        """
        b, length = tgt_in.shape
        perms = query_masks.shape[0]
        if len(self.layers) > 1:  # the content stream differs per permutation: one pass each
            return torch.stack([self.forward(
                tgt_in, memory if perm_memory is None else torch.cat([memory, perm_memory[:, p]], dim=1),
                content_masks[p], padding_mask, query_mask=query_masks[p]) for p in range(perms)], dim=1)
        # With one layer the content stream is never updated, so all permutations' queries share one pass;
        # the memory mask keeps each permutation's queries on its own extra tokens.
        memory_mask = None
        if perm_memory is not None:
            extra = perm_memory.shape[2]
            owner = torch.arange(perms, device=memory.device).repeat_interleave(extra)
            row = torch.arange(perms, device=memory.device).repeat_interleave(length)
            memory_mask = torch.cat([torch.zeros(perms * length, memory.shape[1], dtype=torch.bool,
                                                 device=memory.device), row[:, None] != owner[None, :]], dim=1)
            memory = torch.cat([memory, perm_memory.flatten(1, 2)], dim=1)
        logits = self.forward(tgt_in, memory, None, padding_mask, query_len=length, query_repeats=perms,
                              query_mask=query_masks.flatten(0, 1), memory_mask=memory_mask)
        return logits.view(b, perms, length, -1)
