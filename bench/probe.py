"""What does a bridge's Q-Former keep of a clip, and what of it reaches the LLM? Probes of the first object's slots.

    python -m bench.probe [--bridge DIR ...] [--train 1500] [--test 500] [--json FILE]

For world clips (WORLD.md), a linear classifier is fitted to predict the first object's colour, motion,
size and shape from (a) the frozen vision features, each frame mean-pooled and the frames kept in
order, (b) each bridge's query outputs (with its caption prompt as the instruction when it is
instructed) and (c) its visual prompt, the queries projected into the LLM. Fitted on the first N
`train` clips, scored on the first M `test-iid` clips; colour and motion also on one-object clips alone.
A slot the features carry but the queries do not is lost in the Q-Former; one the queries carry but
the captions get wrong (bench/quality.py) is lost between projection and LLM. A bridge that has its
stage-1 heads also gets (d): its ITG head's own reading of the slots, teacher-forced on the captions,
and (e): how alike its ITC text features are for captions that differ in one slot alone.

The linear probe standardises every input dimension, so it finds a slot however faint its direction.
The LLM gets no such help: the last row per bridge classifies the visual prompt by the nearest class
mean, as it is, which succeeds only where the slot is a large part of how prompts differ.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters.video import as_clip
from qformer import Bridge, world
from qformer.bridge import DEFAULT_BRIDGE

SLOTS = {"colour": list(world.COLOURS), "motion": list(world.MOTIONS), "size": list(world.SIZES), "shape": list(world.SHAPES)}


@torch.no_grad()
def frame_features(bridge: Bridge, scenes, batch_size: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(scenes), batch_size):
        px = torch.stack(
            [
                bridge.vision.preprocess(
                    as_clip(world.render(s), num_frames=bridge.config.num_frames, sampling=bridge.config.frame_sampling).frames
                )
                for s in scenes[i : i + batch_size]
            ]
        )
        out.append(bridge.frame_features(px.to(bridge.projection.weight.device)))
    return torch.cat(out)  # (n, T, N, Dv)


@torch.no_grad()
def query_outputs(bridge: Bridge, features: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    Q = bridge.config.qformer.num_queries
    out = []
    for i in range(0, len(features), batch_size):
        f = features[i : i + batch_size]
        ids = mask = None
        if bridge.config.instruct:
            enc = bridge.qformer_tokenizer([bridge.config.caption_prompt] * len(f), return_tensors="pt")
            ids, mask = enc["input_ids"].to(f.device), enc["attention_mask"].to(f.device)
        out.append(bridge.qformer(f, ids, mask, mode="bidirectional")[:, :Q].flatten(1))
    return torch.cat(out)  # (n, Q * D)


def nearest_class_mean(x_train, y_train, x_test, classes: int) -> torch.Tensor:
    """The class whose mean training input is closest (Euclidean, no standardising) to each test input."""
    means = torch.stack(
        [x_train[y_train == k].mean(0) if (y_train == k).any() else torch.full_like(x_train[0], float("inf")) for k in range(classes)]
    )
    return torch.cdist(x_test, means).argmin(1)


@torch.no_grad()
def visual_prompt(bridge: Bridge, queries: torch.Tensor) -> torch.Tensor:
    """query_outputs' rows through the bridge's projection: what the LLM is given, (n, Q * Dl)."""
    Q = bridge.config.qformer.num_queries
    return bridge.projection(queries.view(len(queries), Q, -1)).flatten(1)


@torch.no_grad()
def itg_words(bridge: Bridge, scenes, features: torch.Tensor, single: torch.Tensor, batch_size: int = 32) -> dict[str, float]:
    """The stage-1 ITG head, teacher-forced on each clip's caption: how often it predicts every word of the
    first object's size, colour, shape and motion phrase. Chance here means the queries never carried
    the slot to where stage 1 could use it."""
    tok, Q = bridge.qformer_tokenizer, bridge.config.qformer.num_queries
    rows, spans = [], []
    for s in scenes:
        caption = world.caption(s)
        full = tok(caption)["input_ids"]
        words = caption.split()  # "a", size, colour, shape, then the motion phrase's one or two words
        motion_words = len(world.MOTION_PHRASES[s.objects[0].motion].split())
        head = tok(caption, add_special_tokens=False)["input_ids"][:2]
        at = next(k for k in range(len(full)) if full[k : k + 2] == head)  # where the caption starts, after [CLS]

        def end(k, at=at, words=words):  # token position where the first k words end
            return at + len(tok(" ".join(words[:k]), add_special_tokens=False)["input_ids"])

        span = {
            slot: range(end(k), end(k + n))
            for slot, k, n in (("size", 1, 1), ("colour", 2, 1), ("shape", 3, 1), ("motion", 4, motion_words))
        }
        rows.append(full)
        spans.append(span)
    right = {slot: [] for slot in SLOTS}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tok.pad({"input_ids": chunk}, return_tensors="pt")
        hidden = bridge.qformer(features[i : i + batch_size], enc["input_ids"], enc["attention_mask"], mode="causal")
        pred = bridge.heads.lm_logits(hidden[:, Q:], bridge.qformer.embeddings.word).argmax(-1)  # word t+1 at t
        for j, span in enumerate(spans[i : i + batch_size]):
            for slot in SLOTS:
                right[slot].append(all(int(pred[j, t - 1]) == chunk[j][t] for t in span[slot]))
    scores = {}
    for slot, hits in right.items():
        hits = torch.tensor(hits)
        scores[slot] = float(hits.float().mean())
        if slot in ("colour", "motion"):
            scores[f"{slot}, one object"] = float(hits[single].float().mean())
    return {k: scores[k] for k in ("colour", "colour, one object", "motion", "motion, one object", "size", "shape")}


@torch.no_grad()
def text_feature_similarity(bridge: Bridge) -> dict[str, float]:
    """Mean cosine between the ITC text features of captions that differ in one slot alone. Near 1 means
    ITC's text side cannot tell those captions apart, so ITC teaches the queries to ignore that slot."""
    base = dict(size="large", colour="red", shape="circle", motion="left", background="white")
    values = {
        "colour": world.COLOURS,
        "motion": ("left", "right", "up", "down"),
        "size": world.SIZES,
        "shape": world.SHAPES,
        "background": world.BACKGROUNDS,
    }
    tok = bridge.qformer_tokenizer
    scores = {}
    for slot, options in values.items():
        captions = [("a {size} {colour} {shape} moves {motion} on a {background} background").format(**{**base, slot: v}) for v in options]
        enc = tok(captions, return_tensors="pt", padding=True)
        hidden = bridge.qformer(None, enc["input_ids"], enc["attention_mask"], mode="unimodal", use_queries=False)
        feats = F.normalize(bridge.heads.text_proj(hidden[:, 0]), dim=-1)
        n = len(captions)
        scores[slot] = float(((feats @ feats.t()).sum() - n) / (n * n - n))
    return scores


def labels(scenes) -> dict[str, torch.Tensor]:
    return {slot: torch.tensor([values.index(getattr(s.objects[0], slot)) for s in scenes]) for slot, values in SLOTS.items()}


def linear_probe(x_train, y_train, x_test, classes: int, steps: int = 300) -> torch.Tensor:
    """Multinomial logistic regression on standardised inputs; returns the test predictions."""
    torch.manual_seed(0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_train.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            (F.cross_entropy(x_train @ w + b, y_train) + 1e-3 * w.pow(2).sum()).backward()
            opt.step()
    return (x_test @ w + b).argmax(1)


def probe_all(x_train, x_test, y_train, y_test, single, classify=linear_probe) -> dict[str, float]:
    scores = {}
    for slot, values in SLOTS.items():
        right = classify(x_train, y_train[slot], x_test, len(values)) == y_test[slot]
        scores[slot] = float(right.float().mean())
        if slot in ("colour", "motion"):
            scores[f"{slot}, one object"] = float(right[single].float().mean())
    return scores


def print_table(rows: dict[str, dict[str, float]], columns: list[str]) -> None:
    """One line of scores per row, under the column names."""
    width = max(len(name) for name in rows)
    print(f"{'':{width}}  " + "  ".join(f"{c:>18}" for c in columns))
    for name, scores in rows.items():
        print(f"{name:{width}}  " + "  ".join(f"{scores[c]:>18.3f}" for c in columns))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bridge", action="append", help="bridge directory or hub id; repeat to compare (default: the shipped one)")
    ap.add_argument("--train", type=int, default=1500, help="world `train` clips the probes are fitted on")
    ap.add_argument("--test", type=int, default=500, help="world `test-iid` clips they are scored on")
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.train < 2 or args.test < 1:
        ap.error("--train needs at least 2 clips and --test at least 1")
    t0 = time.time()
    specs = args.bridge or [str(DEFAULT_BRIDGE)]
    bridges = {spec: Bridge.from_pretrained(spec).eval() for spec in specs}
    train_scenes = [world.scene("train", i) for i in range(args.train)]
    test_scenes = [world.scene("test-iid", i) for i in range(args.test)]
    y_train, y_test = labels(train_scenes), labels(test_scenes)
    single = torch.tensor([len(s.objects) == 1 for s in test_scenes])

    results, features, text_similarity = {}, {}, {}
    for spec, bridge in bridges.items():
        c = bridge.config
        key = (c.vision, c.vision_layer, c.vision_resolution, c.num_frames)
        if key not in features:  # bridges over the same frozen features share them, and their row
            features[key] = frame_features(bridge, train_scenes), frame_features(bridge, test_scenes)
            f_train, f_test = features[key]
            layer = "" if c.vision_layer is None else f" layer {c.vision_layer}"
            results[f"features {c.vision}{layer} (frames mean-pooled, in order)"] = probe_all(
                f_train.mean(2).flatten(1), f_test.mean(2).flatten(1), y_train, y_test, single
            )
        q_train, q_test = (query_outputs(bridge, f) for f in features[key])
        results[f"queries of {spec}"] = probe_all(q_train, q_test, y_train, y_test, single)
        p_train, p_test = (visual_prompt(bridge, q) for q in (q_train, q_test))
        results[f"visual prompt of {spec}"] = probe_all(p_train, p_test, y_train, y_test, single)
        results[f"visual prompt of {spec}, nearest class mean"] = probe_all(p_train, p_test, y_train, y_test, single, nearest_class_mean)
        if (
            bridge.heads is not None and bridge.qformer_tokenizer is not None
        ):  # stage-1 heads (trained in stage 1 only, so exact for a stage-1 bridge)
            results[f"ITG head of {spec}, teacher-forced words"] = itg_words(bridge, test_scenes, features[key][1], single)
            text_similarity[f"ITC text feature of {spec}"] = text_feature_similarity(bridge)

    print(
        f"probes of the first object's slots (linear unless said): fitted on {args.train} world train clips, scored on {args.test} test-iid clips"
    )
    print_table(results, list(next(iter(results.values()))))
    if text_similarity:
        print("\nmean cosine between captions that differ only in this slot (1: the text side cannot tell them apart)")
        print_table(text_similarity, list(next(iter(text_similarity.values()))))
    print(f"time: {time.time() - t0:.0f} s")
    results.update(text_similarity)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
