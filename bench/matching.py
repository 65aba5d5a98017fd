"""How well a bridge tells a clip's caption from captions one slot wrong (Bridge.match), finds clips by text
(its scorer, qformer/scorer.py), and filters captions, on held-out world clips.

    python -m bench.matching [--bridge DIR] [--clips 200] [--search 100] [--filter 200] [--threshold 0.95] [--json FILE]

1. match: Bridge.match of each `test-iid` clip's true caption against the same caption with exactly one
   slot changed (each object's size, colour, shape and motion, and the background;
   qformer/world/negatives.py): AUROC over all of them and per changed slot.
2. search: `--search` `test-iid` clips, each one's true caption as the query: recall@1 and @5 by ITC
   alone and re-ranked by ITM (qformer/search.py), seconds per query. A retrieved clip counts when its
   caption is the query (two clips may share one caption).
3. filter: the bridge's own captions of `--filter` `test-iid` clips, scored by Bridge.match: slot accuracy
   of all of them and of those scoring at least `--threshold`, and the share kept.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict

import torch

from qformer import Bridge, world
from qformer.bridge import bridge_or_default
from qformer.search import RERANK, rank
from qformer.world.negatives import CHANGED_SLOTS, one_slot_changes

SPLIT = "test-iid"


def auroc(positives: list[float], negatives: list[float]) -> float:
    """The probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = torch.tensor(positives), torch.tensor(negatives)
    above = (pos[:, None] > neg[None]).float().sum() + 0.5 * (pos[:, None] == neg[None]).float().sum()
    return float(above / (len(pos) * len(neg)))


def features_of(bridge: Bridge, scenes, batch_size: int = 16) -> torch.Tensor:
    """(N, T, N', Dv) frozen features of the scenes' rendered clips, read as the scorer reads clips."""
    scorer = bridge.scorer
    parts = [scorer.clip_features([world.render(s) for s in scenes[i : i + batch_size]]) for i in range(0, len(scenes), batch_size)]
    return torch.cat(parts)


def match_bench(bridge: Bridge, scenes, features: torch.Tensor) -> dict:
    scores: dict[str, list[float]] = defaultdict(list)
    for k, s in enumerate(scenes):
        changed = one_slot_changes(s, random.Random(f"{SPLIT}-{k}"))
        texts = [world.caption(s)] + [c for _, c in changed]
        probs = bridge.match_features(features[k : k + 1].expand(len(texts), -1, -1, -1), texts).tolist()
        scores["true"].append(probs[0])
        for (slot, _), p in zip(changed, probs[1:]):
            scores[slot].append(p)
    wrong = [p for slot in CHANGED_SLOTS for p in scores[slot]]
    return {"auroc": auroc(scores["true"], wrong)} | {f"auroc_{slot}": auroc(scores["true"], scores[slot]) for slot in CHANGED_SLOTS}


def search_bench(bridge: Bridge, scenes, features: torch.Tensor) -> dict:
    scorer = bridge.scorer
    captions = [world.caption(s) for s in scenes]
    embeddings = scorer.embed_features(features)
    out = {}
    for name, rerank in (("itc", 0), ("itm", RERANK)):
        hits1 = hits5 = 0
        start = time.perf_counter()
        for query in captions:
            found = [captions[i] == query for i, _ in rank(scorer, embeddings, features, query, top=5, rerank=rerank)]
            hits1 += found[0]
            hits5 += any(found)
        out[name] = {
            "recall@1": hits1 / len(captions),
            "recall@5": hits5 / len(captions),
            "seconds_per_query": (time.perf_counter() - start) / len(captions),
        }
    return out


def filter_bench(bridge: Bridge, scenes, features: torch.Tensor, threshold: float) -> dict:
    preds = bridge.caption([world.render(s) for s in scenes])
    scores = bridge.match_features(features, preds).tolist()
    slots = [world.score_caption(p, world.caption(s)) for p, s in zip(preds, scenes)]
    kept = [r for r, m in zip(slots, scores) if m >= threshold]
    # Slot accuracy as bench.quality counts it: right slots over all reference slots.
    accuracy = lambda rs: sum(r["correct"] for r in rs) / sum(r["total"] for r in rs) if rs else None  # noqa: E731
    return {
        "slot_accuracy_all": accuracy(slots),
        "slot_accuracy_kept": accuracy(kept),
        "share_kept": len(kept) / len(slots),
        "threshold": threshold,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bridge", help="a bridge directory (default: the shipped demos/bridge)")
    ap.add_argument("--clips", type=int, default=200, help="test-iid clips for the match AUROC")
    ap.add_argument("--search", type=int, default=100, help="test-iid clips searched, each one's caption a query")
    ap.add_argument("--filter", type=int, default=200, help="test-iid clips captioned by the bridge and filtered (0: skip)")
    ap.add_argument("--threshold", type=float, default=0.95, help="the match score a kept caption reaches")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    with torch.no_grad():
        return run(args)


def run(args) -> dict:
    bridge = Bridge.from_pretrained(bridge_or_default(args.bridge))
    if bridge.scorer is None:
        raise SystemExit(f"{bridge.directory}: this bridge has no scorer (no stage-1 heads, no scorer/)")
    scenes = [world.scene(SPLIT, i) for i in range(max(args.clips, args.search, args.filter))]
    features = features_of(bridge, scenes)
    results = {"match": match_bench(bridge, scenes[: args.clips], features[: args.clips])}
    print("match AUROC, true caption vs one slot changed:", json.dumps(results["match"], indent=1))
    results["search"] = search_bench(bridge, scenes[: args.search], features[: args.search])
    print(f"search over {args.search} clips:", json.dumps(results["search"], indent=1))
    if args.filter:
        results["filter"] = filter_bench(bridge, scenes[: args.filter], features[: args.filter], args.threshold)
        print(f"filter of {args.filter} captions:", json.dumps(results["filter"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
