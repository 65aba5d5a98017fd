"""BLIP-2's stage-1 objectives: image/clip-text contrast (ITC), matching (ITM), grounded generation (ITG).

Each uses one of the Q-Former's three self-attention masks (model.MASK_MODES):
  ITC  "unimodal":      queries and text cannot see each other; compare their features.
  ITM  "bidirectional": queries and text see each other; classify the pair as matching or not.
  ITG  "causal":        text sees all queries and earlier text; predict the next word.
So the queries learn to extract what text can describe, before any LLM is involved.

Given negatives (captions known NOT to fit a clip, e.g. its caption with one slot changed) join both:
ITC compares each clip with them as extra texts, and ITM classifies each clip with one of its own, drawn
as its in-batch hard negatives are. In-batch negatives of templated captions differ in many words at once;
a scorer must also tell captions apart that differ in one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import QFormer, QFormerHeads


class Stage1Objective(nn.Module):
    """The Q-Former with its stage-1 heads; forward returns the three losses (and their sum)."""

    LOSSES = ("itc", "itm", "itg")

    def __init__(self, qformer: QFormer, heads: QFormerHeads, label_smoothing: float = 0.1, losses=LOSSES):
        super().__init__()
        unknown = set(losses) - set(self.LOSSES)
        if unknown or not losses:
            raise ValueError(f"stage-1 losses {sorted(losses)}: choose among {', '.join(self.LOSSES)}")
        self.qformer = qformer
        self.heads = heads
        # Which losses the sum trains on; all three are still reported. ITC's similarities pick ITM's hard
        # negatives even when ITC itself does not train.
        self.losses = tuple(losses)
        # BLIP-2 smooths ITC and ITG targets by 0.1.
        self.label_smoothing = label_smoothing

    def forward(
        self,
        features: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        negative_ids: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
        negative_owner: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """features (B, T, N, Dv) frozen frame features; text_ids/text_mask (B, L) Q-Former-tokenised text.

        generator draws the ITM hard negatives (a CPU generator, so a resumed run draws the same ones).
        negative_ids/negative_mask (M, L'): given negatives, each a text that does not fit the clip
        negative_owner[m] (M,) of the batch; any number per clip, none for some.
        """
        Q = self.qformer.config.num_queries
        ls = self.label_smoothing
        B = len(text_ids)

        # 1. ITC: queries vs the text's first ([CLS]) token, in one pass with the unimodal mask.
        hidden = self.qformer(features, text_ids, text_mask, mode="unimodal")  # (B, Q+L, D)
        query_feats = F.normalize(self.heads.vision_proj(hidden[:, :Q]), dim=-1)  # (B, Q, E)
        text_feat = F.normalize(self.heads.text_proj(hidden[:, Q]), dim=-1)  # (B, E)
        # The texts ITC compares each clip with: the batch's, then the given negatives (text alone, the same
        # features as in the unimodal pass, where text never sees the queries). One padded bank of ids.
        bank_ids, bank_mask = text_ids, text_mask
        if negative_ids is not None and len(negative_ids):
            negative = self.qformer(None, negative_ids, negative_mask, mode="unimodal")[:, 0]  # (M, D)
            text_feat = torch.cat([text_feat, F.normalize(self.heads.text_proj(negative), dim=-1)])  # (B+M, E)
            bank_ids, bank_mask = _padded_cat(text_ids, negative_ids, text_mask, negative_mask, self.qformer.config.pad_token_id)
        temperature = self.heads.temperature.clamp(0.001, 0.5)
        # Similarity of clip i and text j: the best-matching query (BLIP-2).
        sim_all = torch.einsum("iqe,je->ijq", query_feats, text_feat).amax(-1) / temperature  # (B, B+M)
        sim = sim_all[:, :B]  # (B, B)
        # Two samples with the same text (common in templated captions) are both right for each other's
        # clip: like BLIP-2's image ids, the target mass is shared among them and neither is a negative.
        # A given negative of one clip that is another clip's very caption is right for that clip.
        same_all = (bank_ids[:B, None] == bank_ids[None]).all(-1)  # (B, B+M); rows are padded alike
        same = same_all[:, :B]
        targets = same_all.float() / same_all.sum(1, keepdim=True)
        t2i = same.t().float() / same.t().sum(1, keepdim=True)
        itc = (F.cross_entropy(sim_all, targets, label_smoothing=ls) + F.cross_entropy(sim.t(), t2i, label_smoothing=ls)) / 2

        # 2. ITM with hard negatives: for each clip a wrong text, for each text a wrong clip, drawn with
        #    probability softmax(similarity), so pairs that ITC confuses are the ones ITM learns from.
        pos = torch.arange(len(sim))
        texts, clips = pos, pos
        if len(sim) > 1:  # one sample has no negative; its positive pair alone keeps the head in the graph
            with torch.no_grad():
                not_neg = same.cpu()
                # A row whose every other text is the same has no true negative; it draws among them and
                # the pair is labelled a match below.
                not_neg = not_neg & ~not_neg.all(1, keepdim=True) | torch.eye(len(sim), dtype=torch.bool)
                w_text = sim.detach().float().cpu().softmax(1).masked_fill(not_neg, 0)  # (B, B) per clip, over texts
                w_clip = sim.detach().float().cpu().t().softmax(1).masked_fill(not_neg, 0)  # per text, over clips
                neg_text = torch.multinomial(w_text, 1, generator=generator).squeeze(1)
                neg_clip = torch.multinomial(w_clip, 1, generator=generator).squeeze(1)
            texts = torch.cat([pos, neg_text, pos])
            clips = torch.cat([pos, pos, neg_clip])
        if len(bank_ids) > B:
            # Each clip with given negatives: one of its own, drawn by similarity as the in-batch ones are.
            with torch.no_grad():
                owner = negative_owner.cpu()
                mine = owner[None] == torch.arange(B)[:, None]  # (B, M)
                has = mine.any(1)
                w = sim_all[:, B:].detach().float().cpu().masked_fill(~mine, float("-inf")).softmax(1)[has]
                drawn = torch.multinomial(w, 1, generator=generator).squeeze(1)
            texts = torch.cat([texts, B + drawn])
            clips = torch.cat([clips, pos[has]])
        texts, clips = texts.to(sim.device), clips.to(sim.device)
        hidden = self.qformer(features[clips], bank_ids[texts], bank_mask[texts], mode="bidirectional")
        itm_logits = self.heads.itm(hidden[:, :Q]).mean(1)  # (3B + given, 2)
        matches = same_all[clips, texts].long()
        itm = F.cross_entropy(itm_logits, matches)

        # 3. ITG: next-word prediction over the text, every word seeing all queries (causal mask). Reported
        #    without a graph when it does not train (a scorer's ITC + ITM run).
        with torch.set_grad_enabled(torch.is_grad_enabled() and "itg" in self.losses):
            hidden = self.qformer(features, text_ids, text_mask, mode="causal")
            logits = self.heads.lm_logits(hidden[:, Q:], self.qformer.embeddings.word)  # (B, L, V)
            labels = text_ids.masked_fill(text_mask == 0, -100)
            itg = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=ls)

        parts = {"itc": itc, "itm": itm, "itg": itg}
        return {"loss": sum(parts[k] for k in self.losses), **parts}


def _padded_cat(a_ids, b_ids, a_mask, b_mask, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of token ids (and masks) of different lengths as one, right-padded to the longer."""
    L = max(a_ids.shape[1], b_ids.shape[1])
    pad = lambda t, value: F.pad(t, (0, L - t.shape[1]), value=value)  # noqa: E731
    return torch.cat([pad(a_ids, pad_id), pad(b_ids, pad_id)]), torch.cat([pad(a_mask, 0), pad(b_mask, 0)])
