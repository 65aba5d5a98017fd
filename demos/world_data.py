"""Write training manifests for the demo bridge: generated-world clips and the easy-VQA training set.

    python -m demos.world_data OUT [--clips 5000] [--first 0] [--split train] [--objects N]

OUT/clips/NNNNNN.mp4       world clips of the split (WORLD.md), H.264
OUT/world_captions.jsonl   {"video", "caption", "negatives"}, one row per clip; negatives: the caption with one
                           slot changed, once per object's size, colour, shape and motion and once the
                           background (qformer/world/negatives.py), for training a scorer's ITM and ITC
OUT/world_vqa.jsonl        {"video", "question", "answer", "caption"}, one row per WORLD.md question
OUT/easy_captions.jsonl    {"image", "caption"}: "a blue rectangle", for the easy-VQA training images whose
                           questions say both the colour and the shape of their one shape
OUT/easy_vqa.jsonl         {"image", "question", "answer"[, "caption"]}, the easy-VQA training split

A question row's caption is its clip's, so a bridge trained with --caption-first learns to answer with its
own caption of the clip before it in the chat.

The clips are the split's scenes FIRST to FIRST + CLIPS - 1, so a second directory written with --first
past the end of the first holds only scenes the first lacks. Existing clips are kept, so a rerun (or a
larger --clips) only writes what is missing. With --objects N only the scenes among them with N objects
are written (two-object clips are where a bridge mixes up which object has which colour, shape or motion).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
from pathlib import Path

from tqdm import tqdm

from bench.quality import EASY_VQA_SHAPES, easy_vqa_kind
from qformer import world
from qformer.world.negatives import one_slot_changes


def write_jsonl(path: Path, rows) -> int:
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    os.replace(tmp, path)  # a killed run never leaves a half manifest
    return n


def world_rows(out: Path, split: str, n: int, first: int = 0, objects: int | None = None):
    clips = out / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    captions, vqa = [], []
    for i in tqdm(range(first, first + n), desc=f"world {split} clips", unit="clip"):
        s = world.scene(split, i)
        if objects is not None and len(s.objects) != objects:
            continue
        rel = f"clips/{split}-{i:06d}.mp4"
        if not (out / rel).exists():
            tmp = out / (rel + ".tmp.mp4")
            world.write_mp4(world.render(s), tmp)
            os.replace(tmp, out / rel)
        caption = world.caption(s)
        # Drawn from the scene's own seed, so a rerun writes the same negatives.
        negatives = [c for _, c in one_slot_changes(s, random.Random(f"{split}-{i}"))]
        captions.append({"video": rel, "caption": caption, "negatives": negatives})
        vqa += [{"video": rel, "question": q, "answer": a, "caption": caption} for q, a in world.questions(s)]
    return captions, vqa


@functools.cache
def easy_colours() -> str:
    """easy-VQA's colour names as a regex alternation: its answers that are neither a shape nor yes/no."""
    import easy_vqa

    return "|".join(a for a in easy_vqa.get_answers() if a not in (*EASY_VQA_SHAPES, "yes", "no"))


def easy_facts(question: str, answer: str) -> dict[str, str]:
    """What one easy-VQA question and answer say about the image's one shape: its colour, its shape, or both."""
    colours, shapes = easy_colours(), "|".join(EASY_VQA_SHAPES)
    if m := re.fullmatch(rf"what is the ({colours}) shape\?", question):
        return {"colour": m[1], "shape": answer}
    if m := re.fullmatch(rf"what (?:color is|is the color of) the ({shapes})\?", question):
        return {"colour": answer, "shape": m[1]}
    if re.fullmatch(r"what (?:color is|is the color of) the shape\?", question):
        return {"colour": answer}
    if re.fullmatch(r"what shape (?:is in the image|does the image contain|is present)\?", question):
        return {"shape": answer}
    if answer in ("yes", "no") and (m := re.search(rf"\b({colours}|{shapes})\b", question)):
        if (answer == "yes") == (easy_vqa_kind(question, answer) == "yes/no"):  # it is there
            return {("shape" if m[1] in EASY_VQA_SHAPES else "colour"): m[1]}
    return {}


def easy_vqa_rows():
    """(caption rows, question rows) of the easy-VQA training split; a question row carries its image's
    caption where the image's questions tell it."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    facts: dict[int, dict[str, str]] = {}
    for q, a, i in zip(questions, answers, image_ids):
        facts.setdefault(i, {}).update(easy_facts(q, a))
    caption = {i: f"a {f['colour']} {f['shape']}" for i, f in facts.items() if len(f) == 2}
    captions = [{"image": paths[i], "caption": c} for i, c in sorted(caption.items())]
    vqa = [
        {"image": paths[i], "question": q, "answer": a} | ({"caption": caption[i]} if i in caption else {})
        for q, a, i in zip(questions, answers, image_ids)
    ]
    return captions, vqa


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--clips", type=int, default=5000)
    ap.add_argument("--first", type=int, default=0, help="index of the first scene (default 0)")
    ap.add_argument("--split", default="train", choices=world.SPLITS)
    ap.add_argument("--objects", type=int, choices=(1, 2), help="keep only the scenes with this many objects")
    args = ap.parse_args(argv)
    if args.first < 0:
        ap.error(f"--first must be 0 or more, not {args.first}")
    out = Path(args.out)
    captions, vqa = world_rows(out, args.split, args.clips, args.first, args.objects)
    print(f"world_captions.jsonl: {write_jsonl(out / 'world_captions.jsonl', captions)} rows")
    print(f"world_vqa.jsonl: {write_jsonl(out / 'world_vqa.jsonl', vqa)} rows")
    easy_captions, easy_vqa = easy_vqa_rows()
    print(f"easy_captions.jsonl: {write_jsonl(out / 'easy_captions.jsonl', easy_captions)} rows")
    print(f"easy_vqa.jsonl: {write_jsonl(out / 'easy_vqa.jsonl', easy_vqa)} rows")


if __name__ == "__main__":
    main()
