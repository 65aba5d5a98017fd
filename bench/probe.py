"""What does a bridge's Q-Former keep of a clip? Linear probes of the first object's slots.

    python bench/probe.py [--bridge DIR ...] [--train 1500] [--test 500] [--json FILE]

For world clips (WORLD.md), a linear classifier is fitted to predict the first object's colour, motion,
size and shape from (a) the frozen vision features, each frame mean-pooled and the frames kept in
order, and (b) each bridge's query outputs (with its caption prompt as the instruction when it is
instructed). Fitted on the first N `train` clips, scored on the first M `test-iid` clips; motion also
on one-object clips alone. A slot the features carry but the queries do not is lost in the Q-Former;
one the queries carry but the captions get wrong (bench/quality.py) is lost between projection and LLM.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.video import as_clip  # noqa: E402
from qformer import Bridge, world  # noqa: E402
from qformer.bridge import DEFAULT_BRIDGE  # noqa: E402

SLOTS = {"colour": list(world.COLOURS), "motion": list(world.MOTIONS), "size": list(world.SIZES), "shape": list(world.SHAPES)}


@torch.no_grad()
def frame_features(bridge: Bridge, scenes, batch_size: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(scenes), batch_size):
        px = torch.stack([bridge.vision.preprocess(as_clip(world.render(s), num_frames=bridge.config.num_frames).frames)
                          for s in scenes[i : i + batch_size]])
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


def probe_all(x_train, x_test, y_train, y_test, single) -> dict[str, float]:
    scores = {}
    for slot, values in SLOTS.items():
        right = linear_probe(x_train, y_train[slot], x_test, len(values)) == y_test[slot]
        scores[slot] = float(right.float().mean())
        if slot == "motion":
            scores["motion, one object"] = float(right[single].float().mean())
    return scores


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

    results, features = {}, {}
    for spec, bridge in bridges.items():
        c = bridge.config
        key = (c.vision, c.vision_layer, c.vision_resolution, c.num_frames)
        if key not in features:  # bridges over the same frozen features share them, and their row
            features[key] = frame_features(bridge, train_scenes), frame_features(bridge, test_scenes)
            f_train, f_test = features[key]
            results[f"features {c.vision} (frames mean-pooled, in order)"] = probe_all(
                f_train.mean(2).flatten(1), f_test.mean(2).flatten(1), y_train, y_test, single)
        f_train, f_test = features[key]
        results[f"queries of {spec}"] = probe_all(query_outputs(bridge, f_train), query_outputs(bridge, f_test), y_train, y_test, single)

    print(f"linear probes of the first object's slots: fitted on {args.train} world train clips, scored on {args.test} test-iid clips")
    columns = list(next(iter(results.values())))
    width = max(len(name) for name in results)
    print(f"{'':{width}}  " + "  ".join(f"{c:>18}" for c in columns))
    for name, scores in results.items():
        print(f"{name:{width}}  " + "  ".join(f"{scores[c]:>18.3f}" for c in columns))
    print(f"time: {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
