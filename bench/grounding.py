"""Does a bridge look at the clip? Caption loss on the right clips against the same clips paired wrongly,
and how much the visual prompt varies from clip to clip.

    python -m bench.grounding [--bridge DIR] [--split test-iid] [--clips 64] [--json FILE]

A stage-2 run can learn to erase the clip: the visual prompt collapses to one constant and the LLM writes
well-formed captions from its prior alone. Such a bridge scores the same caption loss whether each world
caption is paired with its own clip or with the next clip's, and its prompt hardly varies across clips.
Printed: both losses and their gap (nats per caption token; 0 = the clip is ignored), and the visual
prompt's spread across clips relative to its size (0 = one constant prompt), for the projected prompt
and for the Q-Former's query outputs before the projection.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.probe import frame_features
from qformer import Bridge, world
from qformer.bridge import DEFAULT_BRIDGE


def spread(x: torch.Tensor) -> float:
    """Standard deviation across clips (dim 0), averaged over every other index, over the RMS of x."""
    return float(x.std(dim=0).mean() / x.pow(2).mean().sqrt())


@torch.no_grad()
def measure(bridge: Bridge, split: str, clips: int, batch_size: int) -> dict:
    if clips < 2:
        raise ValueError(f"--clips {clips}: pairing a caption with another clip needs at least 2 clips")
    bridge.eval()
    scenes = [world.scene(split, i) for i in range(clips)]
    captions = [world.caption(s) for s in scenes]
    features = frame_features(bridge, scenes, batch_size)  # (N, T, P, Dv)
    wrong = features.roll(1, dims=0)  # caption i with clip i-1: same clips, same captions, wrong pairs

    prompt = bridge.config.caption_prompt
    totals = {"right": 0.0, "wrong": 0.0}
    tokens = 0
    prompts, queries = [], []
    Q = bridge.config.qformer.num_queries
    for i in range(0, clips, batch_size):
        batch = bridge.answer_batch([prompt] * len(captions[i : i + batch_size]), captions[i : i + batch_size])
        n = int((batch["labels"][:, 1:] != -100).sum())
        for name, feats in (("right", features), ("wrong", wrong)):
            out = bridge(**batch, features=feats[i : i + batch_size], return_logits=False)
            totals[name] += float(out.loss) * n
        tokens += n
        hidden = bridge.qformer(
            features[i : i + batch_size], batch.get("instruction_ids"), batch.get("instruction_mask"), mode="bidirectional"
        )[:, :Q]
        queries.append(hidden)
        prompts.append(bridge.projection(hidden))
    right, wrong_loss = totals["right"] / tokens, totals["wrong"] / tokens
    return {
        "split": split,
        "clips": clips,
        "caption_loss_right_clip": right,
        "caption_loss_wrong_clip": wrong_loss,
        "gap": wrong_loss - right,
        "prompt_spread": spread(torch.cat(prompts)),
        "query_spread": spread(torch.cat(queries)),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bridge", default=str(DEFAULT_BRIDGE), help="bridge directory or hub id (default: the shipped one)")
    ap.add_argument("--split", default="test-iid", choices=world.SPLITS)
    ap.add_argument("--clips", type=int, default=64, help="the first N clips of the split")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = ap.parse_args(argv)
    bridge = Bridge.from_pretrained(args.bridge)
    try:
        r = measure(bridge, args.split, args.clips, args.batch_size)
    except ValueError as e:
        ap.error(str(e))
    r["bridge"] = args.bridge
    print(f"{args.bridge}: world {args.split}, {args.clips} clips")
    print(f"  caption loss, right clip   {r['caption_loss_right_clip']:.3f} nats/token")
    print(f"  caption loss, wrong clip   {r['caption_loss_wrong_clip']:.3f}")
    print(f"  gap (0 = clip ignored)     {r['gap']:.3f}")
    print(f"  visual prompt spread       {r['prompt_spread']:.3f}   (0 = one constant prompt)")
    print(f"  Q-Former query spread      {r['query_spread']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return r


if __name__ == "__main__":
    main()
