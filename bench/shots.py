"""Shot-aware recaption on the generated world: are the cuts found, and is a shot captioned as well as its clip alone?

N world clips (qformer/world) are written twice: one MP4 per clip, and --per-file at a time one after
another in MP4s with hard cuts (about a third of the cuts with the same background on both sides). One
run prints:
  1. cuts: precision, recall and F1 of the shot starts `qformer recaption --shots` records against the
     true cuts, a cut found within one frame of a true one counting (target F1 >= 0.9), overall and for
     the cuts with the same background on both sides;
  2. caption slot accuracy (WORLD.md) of the shots, each scored against the clip its middle lies in,
     against the same clips captioned one by one without --shots (target: within 0.05).

    python -m bench.shots [--clips 60] [--per-file 10] [--bridge DIR] [--split test-iid] [--json FILE]

Without --bridge: the shipped default bridge (demos/bridge).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qformer import Bridge, world
from qformer import recaption as rc
from qformer.bridge import bridge_or_default
from qformer.shots import MIN_SHOT_S, SHOT_THRESHOLD

CLIP_S = world.FRAMES / world.FPS
FRAME_S = 1 / world.FPS


def cut_scores(found: list[float], truth: list[float]) -> tuple[int, int, int]:
    """(true positives, found, true): each true cut matched at most once, by a found cut within one frame."""
    free = list(truth)
    hits = 0
    for cut in found:
        near = [t for t in free if abs(cut - t) <= FRAME_S + 1e-6]
        if near:
            free.remove(min(near, key=lambda t: abs(cut - t)))
            hits += 1
    return hits, len(found), len(truth)


def f1(hits: int, found: int, true: int) -> tuple[float, float, float]:
    precision = hits / found if found else 1.0
    recall = hits / true if true else 1.0
    return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def slot_accuracy(pairs: list[tuple[str, str]]) -> float:
    """Correct slots over all reference slots, for (caption, reference) pairs."""
    scores = [world.score_caption(caption, reference) for caption, reference in pairs]
    return sum(s["correct"] for s in scores) / sum(s["total"] for s in scores)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=60)
    p.add_argument("--per-file", type=int, default=10, help="world clips one after another in each file")
    p.add_argument("--split", default="test-iid", choices=world.SPLITS)
    p.add_argument("--bridge", help="bridge directory (default: demos/bridge)")
    p.add_argument("--shot-threshold", type=float, default=SHOT_THRESHOLD)
    p.add_argument("--min-shot-s", type=float, default=MIN_SHOT_S)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    bridge_dir = bridge_or_default(args.bridge)
    bridge = Bridge.from_pretrained(bridge_dir)
    scenes = [world.scene(args.split, i) for i in range(args.clips)]
    groups = [scenes[k : k + args.per_file] for k in range(0, len(scenes), args.per_file)]
    options = dict(batch_size=args.batch_size, workers=args.workers, progress=False)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "clips").mkdir()
        (tmp / "files").mkdir()
        for i, s in enumerate(scenes):
            world.write_mp4(world.render(s), tmp / "clips" / f"{i:04d}.mp4")
        for f, group in enumerate(groups):
            world.write_mp4(np.concatenate([world.render(s) for s in group]), tmp / "files" / f"{f:03d}.mp4")

        start = time.perf_counter()
        rc.recaption(rc.discover([str(tmp / "clips")]), str(tmp / "one.jsonl"), bridge, bridge_dir, **options)
        one_s = time.perf_counter() - start
        start = time.perf_counter()
        shots = (args.shot_threshold, args.min_shot_s)
        rc.recaption(rc.discover([str(tmp / "files")]), str(tmp / "shots.jsonl"), bridge, bridge_dir, shots=shots, **options)
        shots_s = time.perf_counter() - start
        one = rc.read_records(str(tmp / "one.jsonl"))
        cut = rc.read_records(str(tmp / "shots.jsonl"))

    by_file = {f"{f:03d}.mp4": group for f, group in enumerate(groups)}
    totals, same = np.zeros(3, int), np.zeros(3, int)
    pairs = []
    for name, group in by_file.items():
        shots_of = [r for r in cut if Path(r["path"]).name == name]
        found = [r["start_s"] for r in shots_of if r["shot"] > 0]
        truth = [k * CLIP_S for k in range(1, len(group))]
        totals += cut_scores(found, truth)
        alike = [k * CLIP_S for k in range(1, len(group)) if group[k].background == group[k - 1].background]
        near_alike = [c for c in found if any(abs(c - t) <= FRAME_S + 1e-6 for t in alike)]
        same += cut_scores(near_alike, alike)
        for r in shots_of:
            middle = (r["start_s"] + r["end_s"]) / 2
            pairs.append((r["caption"] or "", world.caption(group[min(int(middle // CLIP_S), len(group) - 1)])))
    clip_pairs = [(r["caption"] or "", world.caption(scenes[int(Path(r["path"]).stem)])) for r in one]
    cuts = f1(*totals)
    figures = {
        "clips": args.clips,
        "per_file": args.per_file,
        "split": args.split,
        "bridge": bridge_dir,
        "cut_precision": cuts[0],
        "cut_recall": cuts[1],
        "cut_f1": cuts[2],
        "same_background_cuts": int(same[2]),
        "same_background_recall": f1(*same)[1],
        "shots": len(cut),
        "shot_slot_accuracy": slot_accuracy(pairs),
        "clip_slot_accuracy": slot_accuracy(clip_pairs),
        "one_by_one_clips_per_s": args.clips / one_s,
        "shots_clips_per_s": args.clips / shots_s,
    }
    print(
        f"bridge {bridge_dir}; {args.clips} {args.split} clips, {args.per_file} per file ({len(groups)} files, "
        f"{int(totals[2])} cuts, {int(same[2])} with the same background on both sides)"
    )
    print(f"cuts within one frame:  precision {cuts[0]:.3f}  recall {cuts[1]:.3f}  F1 {cuts[2]:.3f}   (target F1 >= 0.9)")
    print(f"  same background on both sides: recall {figures['same_background_recall']:.3f}")
    gap = figures["shot_slot_accuracy"] - figures["clip_slot_accuracy"]
    print(
        f"slot accuracy: {len(cut)} shots {figures['shot_slot_accuracy']:.3f}, the clips one by one "
        f"{figures['clip_slot_accuracy']:.3f}, difference {gap:+.3f}   (target within 0.05)"
    )
    print(f"(seconds: one by one {one_s:.1f}, shots {shots_s:.1f}; load average {os.getloadavg()[0]:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
