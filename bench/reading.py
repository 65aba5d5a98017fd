"""Can a Q-Former learn to read every slot of a world clip from the frozen features, and how fast, by how
it is shown the clip? Separate frame tokens or tubelets, with or without grid positions.

    python -m bench.reading [--layer 7] [--resolution 128] [--train 3000] [--test 500] [--steps 400] [--json FILE]
                            [--num-queries 16] [--cross-attention-every 2]

A supervised proxy of what a bridge must learn, without the LLM's cost: for each variant a MiniLM-
initialised Q-Former (16 queries, cross-attention in every 2nd layer: the default bridge's; more of
either is more room to read two objects) and one linear head per slot over its query outputs learn the
background, the object count and each object's size, colour, shape and motion (objects in caption
order; "none" for a missing second object) from `train` clips, then are scored on `test-iid` clips
every 50 steps. Every variant sees the same batches. Features: EfficientNet-Lite0 block --layer at
--resolution px (the clips' own 128 by default, as the default bridge reads them; more is the clip
upsampled, so an object spans more tokens), 4 frames per clip.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from adapters.offline import minilm_dir
from adapters.video import as_clip
from adapters.vision import load_vision
from bench.probe import print_table
from qformer import QFormerConfig, world
from qformer.convert import load_bert_into_qformer, qformer_config_from_bert
from qformer.model import QFormer

# Label values of each slot; the second object's slots have one more value, "none".
SLOTS = {
    "background": tuple(world.BACKGROUNDS),
    "count": (1, 2),
    "size": tuple(world.SIZES),
    "colour": tuple(world.COLOURS),
    "shape": world.SHAPES,
    "motion": world.MOTIONS,
}
OBJECT_SLOTS = ("size", "colour", "shape", "motion")
HEADS = ["background", "count"] + [f"{s} {k}" for k in (1, 2) for s in OBJECT_SLOTS]
VARIANTS = {  # name: (tubelets, grid positions)
    "frames": (False, False),
    "frames + grid positions": (False, True),
    "tubelets": (True, False),
    "tubelets + grid positions": (True, True),
}


def classes(head: str) -> int:
    slot, *obj = head.split()
    return len(SLOTS[slot]) + (obj == ["2"])


def labels(scenes) -> torch.Tensor:
    """(n, heads) class indices."""
    rows = []
    for s in scenes:
        row = [SLOTS["background"].index(s.background), len(s.objects) - 1]
        for k in range(2):
            for slot in OBJECT_SLOTS:
                values = SLOTS[slot]
                row.append(values.index(getattr(s.objects[k], slot)) if k < len(s.objects) else len(values))
        rows.append(row)
    return torch.tensor(rows)


@torch.no_grad()
def features(vision, split: str, n: int, frames: int = 4, batch: int = 32) -> torch.Tensor:
    """(n, T, N, D) frozen features of the first n clips of a split."""
    out = []
    for start in range(0, n, batch):
        clips = [
            vision.preprocess(as_clip(world.render(world.scene(split, i)), num_frames=frames).frames)
            for i in range(start, min(n, start + batch))
        ]
        px = torch.stack(clips)  # (b, T, 3, H, W)
        f = vision.encode(px.flatten(0, 1))
        out.append(f.view(len(clips), frames, *f.shape[1:]))
    return torch.cat(out)


class Reader(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.qformer = QFormer(cfg)
        load_bert_into_qformer(self.qformer, minilm_dir())
        self.heads = nn.Linear(cfg.num_queries * cfg.hidden_size, sum(classes(h) for h in HEADS))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        q = self.qformer(x)  # (B, Q, D)
        return self.heads(q.flatten(1)).split([classes(h) for h in HEADS], dim=1)


def train_variant(cfg, x_train, y_train, x_test, y_test, steps: int, batch_size: int, seed: int, log) -> list[dict]:
    torch.manual_seed(seed)
    model = Reader(cfg)
    opt = torch.optim.AdamW(
        [{"params": model.qformer.parameters(), "lr": 3e-4}, {"params": model.heads.parameters(), "lr": 1e-3}], weight_decay=0.05
    )
    order = torch.Generator().manual_seed(seed)
    history = []
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, len(x_train), (batch_size,), generator=order)
        loss = sum(F.cross_entropy(out, y_train[idx, k]) for k, out in enumerate(model(x_train[idx])))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                outs = [model(x_test[i : i + 100]) for i in range(0, len(x_test), 100)]
            acc = {h: float((torch.cat([o[k] for o in outs]).argmax(1) == y_test[:, k]).float().mean()) for k, h in enumerate(HEADS)}
            history.append({"step": step, **acc})
            log(f"  step {step}: " + "  ".join(f"{h} {a:.2f}" for h, a in acc.items()))
    return history


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=7, help="EfficientNet-Lite0 MBConv block")
    ap.add_argument("--resolution", type=int, default=128, help="the encoder's input size in pixels")
    ap.add_argument("--train", type=int, default=3000, help="world train clips")
    ap.add_argument("--test", type=int, default=500, help="world test-iid clips")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-queries", type=int, default=16, help="the Q-Former's queries (the default bridge's: 16)")
    ap.add_argument(
        "--cross-attention-every",
        type=int,
        default=2,
        help="cross-attention in every n-th layer (the default bridge's: 2; 1 is every layer)",
    )
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), help="default: all four")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    vision = load_vision("efficientnet-lite0", args.layer, args.resolution)
    x_train, x_test = features(vision, "train", args.train), features(vision, "test-iid", args.test)
    y_train, y_test = (
        labels(world.scene("train", i) for i in range(args.train)),
        labels(world.scene("test-iid", i) for i in range(args.test)),
    )
    print(
        f"features: block {args.layer} at {args.resolution} px, {tuple(x_train.shape[1:])} per clip; {args.train} train, {args.test} test-iid clips ({time.time() - t0:.0f} s)"
    )
    choices = QFormerConfig(num_queries=args.num_queries, cross_attention_every=args.cross_attention_every, vision_width=vision.width)
    base = qformer_config_from_bert(AutoConfig.from_pretrained(minilm_dir()), choices)
    results = {}
    for name in args.variant or list(VARIANTS):
        tubelets, grid = VARIANTS[name]
        cfg = replace(base, tubelet_frames=x_train.shape[1] if tubelets else 0, grid_positions=grid)
        print(f"{name}:")
        start = time.time()
        results[name] = train_variant(cfg, x_train, y_train, x_test, y_test, args.steps, args.batch_size, args.seed, print)
        print(f"  {time.time() - start:.0f} s")

    print(
        f"\ntest-iid accuracy after {args.steps} steps (slot k: of the k-th object in the caption; chance for the first: colour 0.17, motion 0.14)"
    )
    print_table({name: history[-1] for name, history in results.items()}, HEADS)
    print(f"time: {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
