"""Write training manifests for the demo bridge: generated-world clips and the easy-VQA training set.

    python demos/world_data.py OUT [--clips 5000] [--split train]

OUT/clips/NNNNNN.mp4       world clips of the split (WORLD.md), H.264
OUT/world_captions.jsonl   {"video", "caption"}, one row per clip
OUT/world_vqa.jsonl        {"video", "question", "answer"}, one row per WORLD.md question
OUT/easy_vqa.jsonl         {"image", "question", "answer"}, the easy-VQA training split

Existing clips are kept, so a rerun (or a larger --clips) only writes what is missing.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tqdm import tqdm

from qformer import world


def write_jsonl(path: Path, rows) -> int:
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    os.replace(tmp, path)  # a killed run never leaves a half manifest
    return n


def world_rows(out: Path, split: str, n: int):
    clips = out / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    captions, vqa = [], []
    for i in tqdm(range(n), desc=f"world {split} clips", unit="clip"):
        s = world.scene(split, i)
        rel = f"clips/{split}-{i:06d}.mp4"
        if not (out / rel).exists():
            tmp = out / (rel + ".tmp.mp4")
            world.write_mp4(world.render(s), tmp)
            os.replace(tmp, out / rel)
        captions.append({"video": rel, "caption": world.caption(s)})
        vqa += [{"video": rel, "question": q, "answer": a} for q, a in world.questions(s)]
    return captions, vqa


def easy_vqa_rows():
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    return [{"image": paths[i], "question": q, "answer": a} for q, a, i in zip(questions, answers, image_ids)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--clips", type=int, default=5000)
    ap.add_argument("--split", default="train", choices=world.SPLITS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    captions, vqa = world_rows(out, args.split, args.clips)
    print(f"world_captions.jsonl: {write_jsonl(out / 'world_captions.jsonl', captions)} rows")
    print(f"world_vqa.jsonl: {write_jsonl(out / 'world_vqa.jsonl', vqa)} rows")
    print(f"easy_vqa.jsonl: {write_jsonl(out / 'easy_vqa.jsonl', easy_vqa_rows())} rows")


if __name__ == "__main__":
    main()
