"""Text-to-clip search with a scorer: ITC ranks, and ITM may re-rank the best of them (BLIP-2's retrieval).

ITC compares a text with every clip at the cost of one dot product per query (clip features computed once,
in an index); ITM reads clip and text together at the cost of a Q-Former pass per pair, so it re-ranks only
the `rerank` best candidates by ITC. Whether it helps depends on the scorer's ITM: the default bridge's
stayed at chance, and its scorer ranks best by ITC alone (bench/README.md, matching).
"""

from __future__ import annotations

import torch

from .scorer import Scorer, similarity

# Candidates ITM re-ranks per query when asked to: enough to hold the right clip when ITC ranks it near the top.
RERANK = 16


def rank(
    scorer: Scorer, embeddings: torch.Tensor, features: torch.Tensor | None, text: str, top: int = 10, rerank: int = RERANK
) -> list[tuple[int, float]]:
    """The `top` clips best described by `text`, best first, as (clip index, score).

    embeddings (N, Q, E): the clips' ITC features (Scorer.embed_features); features (N, T, N', Dv): their
    frozen features, for ITM to re-rank the `rerank` best by ITC (None or rerank 0: ITC alone). A re-ranked
    clip's score is ITM's probability that the text describes it; the others' the ITC cosine.
    """
    sims = similarity(embeddings, scorer.embed_texts([text]))[:, 0]  # (N,)
    order = sims.argsort(descending=True).tolist()
    k = min(rerank, len(order)) if features is not None else 0
    if not k:
        return [(i, float(sims[i])) for i in order[:top]]
    head = order[:k]
    probs = scorer.match_features(features[head], [text] * k).tolist()
    reranked = sorted(zip(head, probs), key=lambda p: -p[1])
    return (reranked + [(i, float(sims[i])) for i in order[k:]])[:top]
