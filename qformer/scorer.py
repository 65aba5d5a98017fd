"""A bridge's scorer: BLIP-2's stage-1 heads, to say how well a text fits a clip and to search clips by text.

    match    ITM: queries and text attend to each other over the clip; a classifier says match / no match.
             A stage-1 bridge's Bridge.match; a bridge that captions matches by its own captioning instead
             (Bridge.match_features: the scorer's ITM on a stage-2 Q-Former stayed at chance).
    embed    ITC: each of a clip's Q queries and a text's [CLS] feature projected into one space and
             L2-normalised; a clip and a text are as similar as their best-matching query (BLIP-2).

A scorer is a stage-1 Q-Former with its heads, trained for matching. A stage-1 bridge is its own scorer.
Stage 2 changes the Q-Former under the heads, so a generative bridge keeps a scorer of its own in
`scorer/` beside its weights: a bridge directory of the same vision encoder whose LLM is never loaded.
Trained from its bridge with the Q-Former frozen but for low-rank updates of its attention weights
(QFormerConfig.attention_rank; train.py --train attention), a scorer stores only what differs from the
bridge it was trained from (scorer_weights): those updates, its queries and its heads (1.9 MB in half
precision for the default bridge). The rest is read from the bridge it sits beside: that one, or a later
stage of it (the default bridge's scorer learnt on its stage 2d and reads 2e's weights; save_scorer's init).

Nothing here loads an LLM, and the vision encoder loads only when clips (not features) are scored, so a
text-to-clip search over stored features needs only the Q-Former and its tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from adapters.offline import minilm_dir
from adapters.vision import load_vision

from .config import CAPTION_BATCH_SIZE, BridgeConfig
from .model import QFormer, QFormerHeads

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# The subdirectory of a bridge directory that holds its scorer.
SCORER_DIR = "scorer"
# Texts scored or embedded in one pass of the Q-Former.
TEXT_BATCH = 64


class Scorer(nn.Module):
    """A Q-Former with its ITC and ITM heads, its tokenizer and (loaded when first needed) its vision encoder."""

    def __init__(self, config: BridgeConfig, qformer: QFormer, heads: QFormerHeads, tokenizer: Tokenizer, vision: nn.Module | None = None):
        """tokenizer: the Q-Former's, set to pad and truncate as the scorer batches text (load_tokenizer)."""
        super().__init__()
        if heads is None:
            raise ValueError("a scorer needs the stage-1 heads (ITC projections, ITM classifier); this Q-Former has none")
        self.config = config
        self.qformer, self.heads, self.tokenizer = qformer, heads, tokenizer
        self._vision = [vision]  # in a list: a shared encoder is no submodule of the scorer (not moved, not saved)

    @classmethod
    def from_state(cls, config: BridgeConfig, state: dict[str, torch.Tensor], vision: nn.Module | None = None) -> Scorer:
        """A scorer from a bridge config and its weights (`qformer.*`, `heads.*`; others are ignored). The scorer
        takes those tensors as its parameters (copies only where they are cast to the default dtype)."""
        if not config.qformer.stage1_heads:
            raise ValueError("this bridge config has no stage-1 heads (qformer.stage1_heads is false): it cannot score")
        if not config.qformer_tokenizer:
            raise ValueError("a scorer reads text with its Q-Former's tokenizer: the config names none (qformer_tokenizer)")
        # Built on the meta device without initial weights, then given the loaded ones (assign: the meta
        # tensors are replaced, not copied into): drawing or allocating weights that are overwritten next is
        # wasted time, and drawing them on the meta device imports torch._dynamo.
        with torch.device("meta"):
            qformer, heads = QFormer(config.qformer, init=False), QFormerHeads(config.qformer, init=False)
        dtype = torch.get_default_dtype()  # a module built on the CPU would have cast the loaded weights into it
        for name, module in (("qformer", qformer), ("heads", heads)):
            own = {k[len(name) + 1 :]: v.to(dtype) for k, v in state.items() if k.startswith(name + ".")}
            module.load_state_dict(own, assign=True)
        tokenizer = load_tokenizer(config.qformer_tokenizer, config.qformer.max_text_len)
        return cls(config, qformer, heads, tokenizer, vision).eval()

    # ---- inputs ------------------------------------------------------------------------------------

    @property
    def vision(self) -> nn.Module:
        """The frozen vision encoder, loaded on first use (a search over stored features never needs it)."""
        if self._vision[0] is None:
            c = self.config
            self._vision[0] = load_vision(c.vision, c.vision_layer, c.vision_resolution)
        return self._vision[0]

    @torch.no_grad()
    def clip_features(self, clips) -> torch.Tensor:
        """Frozen features (B, T, N, Dv) of clips as Bridge.caption takes them (paths, PIL images, arrays,
        adapters.video.Clip), sampled as the scorer's bridge samples them."""
        return clip_features(self.config, self.vision, clips, self.heads.itm.weight.device)

    @torch.no_grad()
    def pixel_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen features (B, T, N, Dv) of preprocessed clips (B, T, 3, H, W), as a decoding worker makes them."""
        return pixel_features(self.vision, pixels, self.heads.itm.weight.device)

    def match(self, clips, texts, batch_size: int = CAPTION_BATCH_SIZE) -> list[float]:
        """The probability by ITM that texts[i] describes clips[i], `batch_size` clips through the encoder at a time."""
        return match_clips(clips, texts, batch_size, self.clip_features, self.match_features)

    def embed_clips(self, clips, batch_size: int = CAPTION_BATCH_SIZE) -> torch.Tensor:
        """(N, Q, E) ITC features of clips, `batch_size` through the encoder at a time (embed_features)."""
        clips = list(clips)
        parts = [self.embed_features(self.clip_features(clips[i : i + batch_size])) for i in range(0, len(clips), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.config.qformer.num_queries, self.config.qformer.embed_dim)

    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer.encode_batch(list(texts))
        return {"input_ids": torch.tensor([e.ids for e in enc]), "attention_mask": torch.tensor([e.attention_mask for e in enc])}

    # ---- ITC: one space --------------------------------------------------------------------------

    @torch.no_grad()
    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, N, Dv) frozen features -> (B, Q, E): each query's ITC feature, L2-normalised."""
        Q = self.config.qformer.num_queries
        hidden = self.qformer(features.to(self.heads.itm.weight).float())[:, :Q]  # queries alone: as ITC's unimodal mask sees them
        return F.normalize(self.heads.vision_proj(hidden), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(M, E): each text's ITC feature (its [CLS] token, text alone), L2-normalised."""
        out = []
        for i in range(0, len(texts), TEXT_BATCH):
            t = self._tokens(texts[i : i + TEXT_BATCH])
            t = {k: v.to(self.heads.itm.weight.device) for k, v in t.items()}
            hidden = self.qformer(None, t["input_ids"], t["attention_mask"], mode="unimodal")[:, 0]  # (m, D)
            out.append(F.normalize(self.heads.text_proj(hidden), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.config.qformer.embed_dim)

    # ---- ITM: does this text fit this clip ---------------------------------------------------------

    @torch.no_grad()
    def match_features(self, features: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B,) probability that texts[i] describes the clip of features[i] (B, T, N, Dv)."""
        if len(features) != len(texts):
            raise ValueError(f"match: {len(features)} clips and {len(texts)} texts; give one text per clip")
        Q = self.config.qformer.num_queries
        out = []
        for i in range(0, len(texts), TEXT_BATCH):
            t = self._tokens(texts[i : i + TEXT_BATCH])
            f = features[i : i + TEXT_BATCH].to(self.heads.itm.weight)
            t = {k: v.to(f.device) for k, v in t.items()}
            hidden = self.qformer(f, t["input_ids"], t["attention_mask"], mode="bidirectional")
            out.append(self.heads.itm(hidden[:, :Q]).mean(1).softmax(-1)[:, 1])  # (m,) as Stage1Objective's ITM
        return torch.cat(out) if out else torch.zeros(0)


def match_clips(clips, texts, batch_size: int, features_of, match_features) -> list[float]:
    """match_features(features_of(clips), texts), `batch_size` clips decoded and encoded at a time."""
    clips, texts = list(clips), list(texts)
    if len(clips) != len(texts):
        raise ValueError(f"match: {len(clips)} clips and {len(texts)} texts; give one text per clip")
    out = []
    for i in range(0, len(clips), batch_size):
        out += match_features(features_of(clips[i : i + batch_size]), texts[i : i + batch_size]).tolist()
    return out


def clip_features(config: BridgeConfig, vision: nn.Module, clips, device) -> torch.Tensor:
    """Frozen features (B, T, N, Dv) of clips (paths, PIL images, arrays, adapters.video.Clip), sampled and decoded
    as the bridge of `config` captions them."""
    from adapters.video import as_clip, decode_side  # PyAV loads only when clips need decoding

    side = decode_side(vision)  # the pixels the recaptioner and the index decode
    sampling = dict(num_frames=config.num_frames, sampling=config.frame_sampling, max_side=side)
    pixels = [vision.preprocess(as_clip(it, **sampling).frames) for it in clips]
    T = max(len(p) for p in pixels)
    # An image is a one-frame clip: its frame repeats, as training batches pad clips (qformer.data.collate).
    return pixel_features(vision, torch.stack([p[torch.arange(T).clamp(max=len(p) - 1)] for p in pixels]), device)


@torch.no_grad()
def pixel_features(vision: nn.Module, pixels: torch.Tensor, device) -> torch.Tensor:
    """Frozen features (B, T, N, Dv) of preprocessed clips (B, T, 3, H, W)."""
    feats = vision.encode(pixels.flatten(0, 1).to(device))  # (B*T, N, Dv)
    return feats.float().view(*pixels.shape[:2], *feats.shape[1:])


def load_tokenizer(spec: str, max_length: int) -> Tokenizer:
    """The Q-Former tokenizer a config names ("minilm", a directory or a hub id) as the scorer batches text, with
    transformers' padding=True, truncation=True, max_length: padded to the batch's longest text, truncated at
    max_length, on the sides its config says. A directory's tokenizer.json is read by the tokenizers library
    alone (the fast tokenizer's own, so the ids are AutoTokenizer's): importing transformers for AutoTokenizer
    took 0.8 s of a cold search. Anything else is read by AutoTokenizer."""
    from tokenizers import Tokenizer

    d = Path(minilm_dir() if spec == "minilm" else spec)
    if (d / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # as transformers reads them, the latter winning
            if (d / name).is_file():
                config |= json.loads((d / name).read_text())
        pad = config.get("pad_token")
        pad = pad["content"] if isinstance(pad, dict) else pad  # older files hold it as a serialised AddedToken
        padding_side, truncation_side = config.get("padding_side", "right"), config.get("truncation_side", "right")
    else:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(d))
        tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        pad, padding_side, truncation_side = hf.pad_token, hf.padding_side, hf.truncation_side
    if pad is None or tokenizer.token_to_id(pad) is None:
        raise ValueError(f"{spec}: the Q-Former tokenizer has no pad token, and the scorer pads batches of texts")
    tokenizer.enable_truncation(max_length, direction=truncation_side)
    tokenizer.enable_padding(direction=padding_side, pad_id=tokenizer.token_to_id(pad), pad_token=pad)
    return tokenizer


def similarity(clips: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(N, M) ITC similarity of N clips (N, Q, E) and M texts (M, E): the best-matching query's cosine."""
    return torch.einsum("nqe,me->nmq", clips, texts).amax(-1)


def scorer_weights(state: dict[str, torch.Tensor], bridge_state: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    """The weights a scorer saved beside a bridge keeps: its Q-Former and heads where they differ from those of
    the bridge it was trained from, `bridge_state` (compared in the saving dtype), all of them where that has
    none. The rest (projection, LoRA) are never used to score."""
    cast = (lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v) if dtype else (lambda v: v)
    kept = {}
    for k, v in state.items():
        if not k.startswith(("qformer.", "heads.")):
            continue
        own = bridge_state.get(k)
        if own is None or own.shape != v.shape or not torch.equal(cast(own.detach().cpu()), cast(v.detach().cpu())):
            kept[k] = cast(v.detach().cpu().contiguous())
    return kept
