"""The Q-Former: learned queries that read a frozen encoder's features through cross-attention.

BERT-style post-LayerNorm blocks. Queries and (optional) text share self-attention; only the queries
cross-attend to the vision features (every `cross_attention_every`-th layer) and they have a
feed-forward of their own. Weight names are chosen so that a BERT checkpoint and transformers'
BLIP-2 / InstructBLIP Q-Former each load through one key map (see convert.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import QFormerConfig

# Self-attention patterns of BLIP-2's three stage-1 objectives (and of instructed inference):
#   "bidirectional": queries and text see each other (ITM, InstructBLIP instructions);
#   "unimodal":      queries see queries, text sees text (ITC);
#   "causal":        queries see queries, text sees all queries and earlier text (ITG).
MASK_MODES = ("bidirectional", "unimodal", "causal")


class LowRankLinear(nn.Linear):
    """nn.Linear, plus with rank > 0 a low-rank update (LoRA): x W^T + b + (x A^T) B^T. B starts at zero, so
    the update starts as nothing; A as nn.Linear draws its weight (peft's LoRA does the same)."""

    def __init__(self, in_features: int, out_features: int, rank: int = 0):
        super().__init__(in_features, out_features)
        self.lora_a = self.lora_b = None
        if rank:
            self.lora_a = nn.Parameter(torch.empty(rank, in_features))
            self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.lora_a is None else y + F.linear(F.linear(x, self.lora_a), self.lora_b)


class Attention(nn.Module):
    """Multi-head attention with BERT's post-LayerNorm residual: norm(x + out(attn(x, kv)))."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_heads
        r = cfg.attention_rank
        self.query = LowRankLinear(cfg.hidden_size, cfg.hidden_size, r)
        self.key = LowRankLinear(kv_width, cfg.hidden_size, r)
        self.value = LowRankLinear(kv_width, cfg.hidden_size, r)
        self.out = LowRankLinear(cfg.hidden_size, cfg.hidden_size, r)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        B, S, D = x.shape
        heads = lambda t: t.view(B, t.shape[1], self.num_heads, -1).transpose(1, 2)  # (B, H, *, D/H)
        q, k, v = heads(self.query(x)), heads(self.key(kv)), heads(self.value(kv))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, H, S, D/H)
        y = self.out(y.transpose(1, 2).reshape(B, S, D))
        return self.norm(x + F.dropout(y, p, self.training))


class MLP(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = cfg.hidden_act
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_out(_activation(self.act)(self.fc_in(x)))
        return self.norm(x + F.dropout(h, self.dropout, self.training))


def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported Q-Former activation {name!r}: use gelu, gelu_new or relu")


class Layer(nn.Module):
    def __init__(self, cfg: QFormerConfig, cross: bool):
        super().__init__()
        self.self_attn = Attention(cfg, cfg.hidden_size)
        self.cross_attn = Attention(cfg, token_width(cfg)) if cross else None
        self.mlp_query = MLP(cfg)
        self.mlp_text = MLP(cfg)

    def forward(self, x, self_bias, num_queries, vision):
        x = self.self_attn(x, x, self_bias)  # (B, Q+L, D)
        q, t = x[:, :num_queries], x[:, num_queries:]
        if num_queries and self.cross_attn is not None:
            q = self.cross_attn(q, vision, None)  # (B, Q, D)
        return torch.cat([self.mlp_query(q), self.mlp_text(t)], dim=1)


class TextEmbeddings(nn.Module):
    """Word + position embeddings for text; queries get no position. One LayerNorm over both."""

    def __init__(self, cfg: QFormerConfig, init: bool = True):
        super().__init__()
        # Given its weight, nn.Embedding draws none (QFormer's init=False).
        weight = lambda rows: None if init else torch.empty(rows, cfg.hidden_size)
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id, _weight=weight(cfg.vocab_size))
        self.position = nn.Embedding(cfg.max_text_len, cfg.hidden_size, _weight=weight(cfg.max_text_len))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout

    def forward(self, queries: torch.Tensor | None, input_ids: torch.Tensor | None) -> torch.Tensor:
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            L = input_ids.shape[1]
            if L > self.position.num_embeddings:
                raise ValueError(f"Q-Former text of {L} tokens is longer than its {self.position.num_embeddings} positions")
            parts.append(self.word(input_ids) + self.position.weight[:L])
        x = torch.cat(parts, dim=1)
        return F.dropout(self.norm(x), self.dropout, self.training)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig, init: bool = True):
        """init=False leaves the text embeddings, the queries and the weights _init_weights sets undrawn, for
        a Q-Former whose weights are loaded next or whose shapes alone are read. On the meta device those
        draws (normal_, randn, its scaling) run torch's Python references, whose first call imports
        torch._dynamo: about 1 s of a cold start. nn.Linear's own initialisation runs either way."""
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"Q-Former hidden size {cfg.hidden_size} is not a multiple of {cfg.num_heads} heads")
        self.config = cfg
        shape = (1, cfg.num_queries, cfg.hidden_size)
        self.query_tokens = nn.Parameter(torch.randn(shape) * 0.02 if init else torch.empty(shape))
        # Zero at the start, so an image (one frame) or an imported image bridge is unchanged by it.
        # Tubelets hold time in their channels and need none.
        self.temporal_embed = None if cfg.tubelet_frames else nn.Parameter(torch.zeros(cfg.max_frames, cfg.vision_width))
        self.vision_norm = nn.LayerNorm(cfg.vision_width) if cfg.vision_norm else nn.Identity()
        self.embeddings = TextEmbeddings(cfg, init)
        self.layers = nn.ModuleList(Layer(cfg, i % cfg.cross_attention_every == 0) for i in range(cfg.num_layers))
        if init:
            self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def vision_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, N, Dv) frame features -> (B, T*N, Dv) keys/values for cross-attention, or with tubelets
        (B, N, F*Dv): token n is place n in each of F frames."""
        B, T, N, Dv = features.shape
        cfg = self.config
        if Dv != cfg.vision_width:
            raise ValueError(f"vision features are {Dv} wide but this Q-Former expects {cfg.vision_width}")
        x = self.vision_norm(features)  # (B, T, N, Dv)
        if cfg.tubelet_frames:
            frames = cfg.tubelet_frames
            # Evenly spaced frames, by the rule adapters.video samples files with: T == frames keeps every
            # frame in order, an image (T == 1) becomes a still clip.
            picked = ((torch.arange(frames) + 0.5) * T / frames).long()
            x = x[:, picked].permute(0, 2, 1, 3).reshape(B, 1, N, frames * Dv)  # (B, 1, N, F*Dv)
        else:
            if T > cfg.max_frames:
                raise ValueError(f"clip of {T} frames: this Q-Former has temporal embeddings for at most {cfg.max_frames}")
            x = x + self.temporal_embed[:T, None, :]  # (B, T, N, Dv)
        if cfg.grid_positions:
            x = x + grid_positions(N, x.shape[-1], cfg.grid_side).to(x)
        return x.flatten(1, 2)

    def forward(
        self,
        features: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: str = "bidirectional",
        use_queries: bool = True,
    ) -> torch.Tensor:
        """Returns hidden states (B, Q+L, D): the Q query outputs first, then the L text positions.

        features: (B, T, N, Dv) frozen frame features, or None for text alone (then no queries).
        input_ids/attention_mask: (B, L) Q-Former-tokenised text, optional.
        """
        # 1. Embed queries and text.
        queries = None
        if features is not None and use_queries:
            B = features.shape[0]
            queries = self.query_tokens.expand(B, -1, -1)  # (B, Q, D)
        if queries is None and input_ids is None:
            raise ValueError("Q-Former needs vision features, text, or both")
        x = self.embeddings(queries, input_ids)  # (B, Q+L, D)
        Q = 0 if queries is None else queries.shape[1]

        # 2. Self-attention bias for the chosen mode; cross-attention sees every vision token.
        bias = self_attention_bias(Q, input_ids, attention_mask, mode, x.dtype)
        vision = self.vision_tokens(features) if features is not None else None

        # 3. The layers.
        for layer in self.layers:
            x = layer(x, bias, Q, vision)
        return x


def token_width(cfg: QFormerConfig) -> int:
    """Width of a vision token as cross-attention reads it: one frame's feature, or a tubelet of them."""
    return cfg.vision_width * max(1, cfg.tubelet_frames)


def grid_positions(n: int, width: int, units: int = 0) -> torch.Tensor:
    """(n, width) fixed sine-cosine positions of n tokens in a square grid, row by row: a quarter of the
    channels each for sin and cos of the row and of the column at geometric frequencies, the rest zero.
    Rows and columns count in a grid of `units` a side (0: this grid), so a finer grid's tokens take
    fractional places on a coarser one."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"grid positions need a square grid of vision tokens; got {n} tokens per frame")
    k = width // 4
    freqs = 10000.0 ** (-torch.arange(k, dtype=torch.float32) / max(k, 1))  # (k,)
    idx = torch.arange(n)
    scale = (units or side) / side
    rows, cols = (idx // side)[:, None] * scale * freqs, (idx % side)[:, None] * scale * freqs  # (n, k) each
    enc = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)  # (n, 4k)
    return F.pad(enc, (0, width - 4 * k))


class QFormerHeads(nn.Module):
    """BLIP-2's stage-1 heads over Q-Former outputs.

    ITC: query and [CLS]-text features projected into a small shared space, with a learned temperature.
    ITM: a two-way classifier (match / no match) over the query outputs.
    ITG: BERT's LM head over the text positions; its decoder is the word embedding matrix itself (tied),
    so it is passed in rather than owned.
    """

    def __init__(self, cfg: QFormerConfig, init: bool = True):
        """init=False: the four projections' weights are not drawn anew (as QFormer's init)."""
        super().__init__()
        D = cfg.hidden_size
        self.vision_proj = nn.Linear(D, cfg.embed_dim)
        self.text_proj = nn.Linear(D, cfg.embed_dim)
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.itm = nn.Linear(D, 2)
        self.lm_transform = nn.Linear(D, D)
        self.lm_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.lm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.act = cfg.hidden_act
        if init:
            for m in (self.vision_proj, self.text_proj, self.itm, self.lm_transform):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def lm_logits(self, hidden: torch.Tensor, word_embeddings: nn.Embedding) -> torch.Tensor:
        """(B, L, D) text hidden states -> (B, L, V) next-token logits."""
        h = self.lm_norm(_activation(self.act)(self.lm_transform(hidden)))
        return F.linear(h, word_embeddings.weight, self.lm_bias)


def self_attention_bias(Q: int, input_ids, attention_mask, mode: str, dtype) -> torch.Tensor | None:
    """Additive (B, 1, S, S) bias for S = Q + L tokens, or None when everything sees everything."""
    if mode not in MASK_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {MASK_MODES}")
    if input_ids is None:
        return None
    B, L = input_ids.shape
    device = input_ids.device
    S = Q + L
    allowed = torch.ones(S, S, dtype=torch.bool, device=device)
    if mode == "unimodal":
        allowed[:Q, Q:] = False
        allowed[Q:, :Q] = False
    elif mode == "causal":
        allowed[:Q, Q:] = False
        allowed[Q:, Q:] = torch.tril(torch.ones(L, L, dtype=torch.bool, device=device))
    allowed = allowed.expand(B, S, S)
    if attention_mask is not None:
        keys = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=device), attention_mask.bool()], dim=1)
        allowed = allowed & keys[:, None, :]
    if mode == "bidirectional" and attention_mask is None:
        return None
    bias = torch.zeros(B, 1, S, S, dtype=dtype, device=device)
    return bias.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total
