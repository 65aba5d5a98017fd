"""What the frozen-feature cache (train.py --cache-features) saves per epoch, as ratios measured in one run.

The same clips (world clips written as MP4), the same batches, two ways of getting the Q-Former its input:
  1. no cache: decode and sample the clip, preprocess, run the frozen vision encoder -- every epoch;
  2. cache:    read the (T, N, D) features from the safetensors shards (filled once, timed separately).
Each way is timed alone (input only) and with a stage-1 training step of a MiniLM-sized Q-Former
(ITC + ITM + ITG, forward and backward) on top, and the ratios no-cache / cache are printed. The two
ways take turns for --repeats rounds and each keeps its best epoch: a single epoch of each, one after
the other, is unfair to whichever runs second (training epochs slow down after the first).

    python -m bench.feature_cache [--clips 32] [--frames 4] [--resolution 128] [--batch-size 8] [--workers 2] [--repeats 3]

Uses the offline EfficientNet-Lite0. Decoding runs in DataLoader workers in both paths, as in train.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import av
import torch
from torch.utils.data import DataLoader

from adapters.vision import load_vision
from qformer import QFormerConfig
from qformer.data import ClipDataset, FeatureCache, MixedBatchSampler, collate, fill_cache, open_source
from qformer.losses import Stage1Objective
from qformer.model import QFormer, QFormerHeads
from qformer.world import caption, render, scene


def write_clips(root: Path, n: int) -> str:
    rows = []
    for i in range(n):
        s = scene("train", i)
        path = root / f"clip{i:03d}.mp4"
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=8)
            stream.width, stream.height, stream.pix_fmt = 128, 128, "yuv420p"
            for frame in render(s):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        rows.append({"video": path.name, "caption": caption(s)})
    (root / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "clips.jsonl")


def epoch(dataset, vision, batch_size, workers, step=None) -> float:
    """Seconds for one pass: batches of features (from the cache or the encoder), plus `step` when given."""
    sampler = MixedBatchSampler([len(dataset)], [1.0], batch_size, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    start = time.perf_counter()
    for batch in loader:
        if "features" in batch:
            features = batch["features"]
        else:
            px = batch["pixels"]  # (B, T, 3, H, W)
            features = vision.encode(px.flatten(0, 1)).view(*px.shape[:2], -1, vision.width)
        if step is not None:
            step(features)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="rounds in which the two ways take turns; the best epoch of each counts")
    args = p.parse_args()

    torch.manual_seed(0)
    vision = load_vision("efficientnet-lite0", resolution=args.resolution)
    cfg = QFormerConfig(vision_width=vision.width, dropout=0.0)
    objective = Stage1Objective(QFormer(cfg), QFormerHeads(cfg)).train()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    text = torch.randint(1000, cfg.vocab_size, (args.batch_size, 16))

    def step(features):
        ids = text[: len(features)]
        loss = objective(features, ids, torch.ones_like(ids), torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = open_source(write_clips(root, args.clips))
        cache = FeatureCache(root / "cache", f"efficientnet-lite0|res={args.resolution}|frames={args.frames}")
        plain = ClipDataset([source], args.frames, None, vision.preprocess)
        cached = ClipDataset([source], args.frames, None, vision.preprocess, cache)

        start = time.perf_counter()
        fill_cache(cached, vision.encode, cache, list(range(len(cached))), args.batch_size, args.workers)
        fill_s = time.perf_counter() - start
        epoch(plain, vision, args.batch_size, args.workers)  # warm-up: page cache, lazy inits
        # and a training epoch: the first one is faster than all later ones, so it would favour either way
        epoch(plain, vision, args.batch_size, args.workers, step)
        times = {key: [] for key in ("no cache input", "cache input", "no cache train", "cache train")}
        for r in range(args.repeats):
            ways = [("no cache", plain), ("cache", cached)][:: 1 if r % 2 == 0 else -1]  # who goes first alternates
            for name, dataset in ways:
                times[f"{name} input"].append(epoch(dataset, vision, args.batch_size, args.workers))
            for name, dataset in ways:
                times[f"{name} train"].append(epoch(dataset, vision, args.batch_size, args.workers, step))
        no_cache_input, cache_input, no_cache_train, cache_train = (min(times[k]) for k in times)

    n = args.clips
    print(
        f"{n} clips x {args.frames} frames, EfficientNet-Lite0 at {args.resolution} px, batch {args.batch_size}, {args.workers} workers, "
        f"{torch.get_num_threads()} threads; best of {args.repeats} epochs each"
    )
    print(f"  fill the cache once:              {fill_s:7.2f} s  ({n / fill_s:6.1f} clips/s)")
    print(f"  input per epoch, no cache:        {no_cache_input:7.2f} s  ({n / no_cache_input:6.1f} clips/s)")
    print(f"  input per epoch, cache:           {cache_input:7.2f} s  ({n / cache_input:6.1f} clips/s)")
    print(f"  stage-1 epoch, no cache:          {no_cache_train:7.2f} s  ({n / no_cache_train:6.1f} clips/s)")
    print(f"  stage-1 epoch, cache:             {cache_train:7.2f} s  ({n / cache_train:6.1f} clips/s)")
    print("  every epoch (s): " + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)}" for k, v in times.items()))
    print(f"speed-up of the cache: input x{no_cache_input / cache_input:.1f}, stage-1 training epoch x{no_cache_train / cache_train:.2f}")


if __name__ == "__main__":
    main()
