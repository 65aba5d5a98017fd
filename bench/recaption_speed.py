"""How close `qformer recaption` comes to the speed of the frozen models, and how it compares with transformers' BLIP-2.

One run, the same clips, the same greedy tokens, prints:
  1. end-to-end clips/s of the recaption engine (decoding in worker processes, batching, journal writes)
     without match scores (--no-match), and with them (one more LLM pass over each caption);
  2. the frozen-model floor: the vision encoder over exactly the sampled, preprocessed frames plus the
     LLM's prefill and decode of exactly the same tokens, timed alone (no I/O, no Q-Former) -- and the
     ratio of 1 to 2 (goal: at least 0.85);
  3. transformers' Blip2ForConditionalGeneration driven the usual way (decode a frame, processor,
     generate, batch_decode; one clip per call as its model card does, --hf-batch-size clips per call,
     and as many per call as the engine takes) against the recaption engine on a bridge converted from
     the same weights (Bridge.from_blip2), one frame per clip since BLIP-2 is an image model -- clips/s,
     ratios (goals: 1.5 over one clip a call, 1.2 over 8 a call) and whether the captions are identical;
  4. shots: --shots-clips world clips recaptioned one file each without --shots, and the same clips
     --per-file at a time in files with hard cuts with --shots (shot detection, then a caption per shot):
     clips/s of each.
  5. batch widths: --width-clips world clips captioned by Bridge.caption at each of --widths clips per
     call: ms per clip, and whether the captions are the same at every width;
  6. with --ray (needs the ray extra), instead of 1 to 5: the Ray engine (`qformer recaption --ray`, on a Ray of this machine's
     CPUs started once, as a cluster would be) against the local engine, each as its command runs it
     (bridge loaded, then recaption), on the same clips: clips/s end to end and after the first records,
     the ratio, the per-actor rate and the decode rate of one CPU, and from them the rate on N GPU actors.

    python -m bench.recaption_speed [--clips 16] [--repeats 2] [--bridge DIR] [--shots-clips 40] ...

Each figure is the fastest of --repeats interleaved rounds (load from other processes only adds time).

Without --bridge it uses the shipped demo bridge (demos/bridge) when present, else an untrained bridge
over the offline backbones (EfficientNet-Lite0 + SmolLM2-135M-Instruct): caption content does not
matter for speed, only that every path computes the same tokens. The BLIP-2 models are small random
ones (a ViT, a Q-Former and an OPT) built here, so the comparison measures the drivers, not the weights.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
import threading
import time
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch

from adapters.video import decode_side, read_clip
from qformer import Bridge, BridgeConfig, world
from qformer import recaption as rc
from qformer.bridge import DEFAULT_BRIDGE
from qformer.config import CAPTION_BATCH_SIZE
from qformer.shots import MIN_SHOT_S, SHOT_THRESHOLD


def write_clips(folder: Path, count: int, frames: int, size: int, fps: int = 8) -> None:
    """Clips of a coloured square moving over a gradient: cheap to write, realistic enough to decode."""
    ys, xs = np.mgrid[0:size, 0:size]
    for i in range(count):
        rng = np.random.default_rng(i)
        colour = rng.integers(0, 256, 3)
        with av.open(str(folder / f"clip_{i:03d}.mp4"), mode="w") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            for t in range(frames):
                rgb = np.stack([(xs + 7 * t + 40 * i) % 256, (ys * 2) % 256, np.full_like(xs, 60 + 9 * i % 196)], -1)
                x0 = (t * size // (2 * frames) + 8 * i) % (size - size // 4)
                rgb[size // 3 : size // 3 + size // 4, x0 : x0 + size // 4] = colour
                frame = av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")
                frame.pts, frame.time_base = t, Fraction(1, fps)
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)


def write_world(folder: Path, count: int, per_file: int) -> None:
    """count test-iid world clips as one MP4 each in folder/one, and per_file at a time one after another
    (hard cuts) in MP4s in folder/cut."""
    clips = [world.render(world.scene("test-iid", i)) for i in range(count)]
    (folder / "one").mkdir()
    (folder / "cut").mkdir()
    for i, frames in enumerate(clips):
        world.write_mp4(frames, folder / "one" / f"{i:04d}.mp4")
    for f, k in enumerate(range(0, count, per_file)):
        world.write_mp4(np.concatenate(clips[k : k + per_file]), folder / "cut" / f"{f:03d}.mp4")


def run_engine(items, out: Path, bridge, prompt: str, num_frames: int, args, shots=None, match=False) -> tuple[float, dict[str, str]]:
    """Seconds of one full recaption run (journal, workers, merge) and its captions by path (by its last shot's, with shots).
    Without match scores unless `match` (the floor and transformers' generate score nothing)."""
    start = time.perf_counter()
    summary = rc.recaption(
        items,
        str(out),
        bridge,
        "bench",
        prompts=[prompt],
        shots=shots,
        num_frames=num_frames,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        workers=args.workers,
        progress=False,
        match=match,
    )
    seconds = time.perf_counter() - start
    if summary.failed:
        raise RuntimeError(f"{summary.failed} clips failed in the benchmark run")
    return seconds, {r["path"]: r["caption"] for r in rc.read_records(str(out))}


@torch.inference_mode()
def frozen_floor(items, bridge, prompt: str, num_frames: int, args) -> tuple[float, dict[str, str]]:
    """Seconds spent in the frozen models alone on the same frames and tokens, and the captions they give.

    Decoding, preprocessing, the Q-Former and splicing happen outside the timed parts.
    """
    side = decode_side(bridge.vision)
    sampling = bridge.config.frame_sampling  # the frames the engine reads
    pixels = [bridge.vision.preprocess(read_clip(it.path, num_frames=num_frames, max_side=side, sampling=sampling).frames) for it in items]
    seconds, captions = 0.0, {}
    for i in range(0, len(items), args.batch_size):
        chunk = items[i : i + args.batch_size]
        px = torch.stack(pixels[i : i + args.batch_size])  # (B, T, 3, H, W)
        t0 = time.perf_counter()
        features = bridge.frame_features(px)  # the frozen vision encoder
        seconds += time.perf_counter() - t0
        text = bridge._prompt_batch([prompt] * len(chunk), [[] for _ in chunk])
        # An instructed bridge's Q-Former reads the prompt too; without it the tokens would differ.
        visual = bridge.visual_prompt(
            features=features, instruction_ids=text.get("instruction_ids"), instruction_mask=text.get("instruction_mask")
        )
        embeds, mask, _ = bridge._splice(visual, text["input_ids"], text["attention_mask"], text["visual_position"])
        t0 = time.perf_counter()
        ids = bridge.llm.generate(embeds, mask, max_new_tokens=args.max_new_tokens)  # the frozen LLM: prefill + decode
        seconds += time.perf_counter() - t0
        for it, caption in zip(chunk, bridge.llm.tokenizer.batch_decode(ids, skip_special_tokens=True)):
            captions[it.path] = caption.strip()
    return seconds, captions


def tiny_blip2(directory: Path):
    """A small random BLIP-2 (ViT 224 px, Q-Former with 32 queries, OPT) with its processor, saved to directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(2000)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # OPT starts with BOS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    image_token_index = len(vocab)  # the processor adds "<image>" next
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, image_size=224, patch_size=16
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536, encoder_hidden_size=384, vocab_size=1000
        ).to_dict(),
        text_config=OPTConfig(
            hidden_size=512,
            num_hidden_layers=6,
            num_attention_heads=8,
            ffn_dim=2048,
            vocab_size=image_token_index + 1,
            word_embed_proj_dim=512,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ).to_dict(),
        num_query_tokens=32,
        image_token_index=image_token_index,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # transformers starts the queries at zero (every image would get one caption), and random logits
        # are nearly flat; spread both so captions differ per clip and greedy choices are clear-cut.
        model.query_tokens.normal_()
        model.language_model.get_input_embeddings().weight.mul_(10)
    model.generation_config.pad_token_id = 0
    processor = Blip2Processor(BlipImageProcessor(size={"height": 224, "width": 224}), tokenizer, num_query_tokens=32)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_token_index
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


@torch.inference_mode()
def transformers_usual_way(items, model, processor, args, batch_size: int) -> tuple[float, dict[str, str]]:
    """Decode one frame per clip in this process, then processor -> generate -> batch_decode, batch_size clips per call."""
    start = time.perf_counter()
    captions = {}
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        frames = [read_clip(it.path, num_frames=1).frames[0] for it in chunk]
        inputs = processor(images=frames, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        for it, caption in zip(chunk, processor.batch_decode(ids, skip_special_tokens=True)):
            captions[it.path] = caption.strip()
    return time.perf_counter() - start, captions


def best_of(repeats: int, *runs):
    """Run each timed function in turn, `repeats` rounds, interleaved so load from other processes hits all alike.

    Returns per function (fastest seconds, captions of the first round, all seconds): noise only ever adds time.
    """
    times = [[] for _ in runs]
    captions = [None for _ in runs]
    for _ in range(repeats):
        for k, run in enumerate(runs):
            seconds, got = run()
            times[k].append(seconds)
            captions[k] = got if captions[k] is None else captions[k]
    return [(min(t), c, t) for t, c in zip(times, captions)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--clip-frames", type=int, default=16, help="frames in each written clip")
    p.add_argument("--size", type=int, default=128, help="side of the written clips, pixels")
    p.add_argument("--num-frames", type=int, help="frames sampled per clip (default: the bridge's)")
    p.add_argument("--batch-size", type=int, default=CAPTION_BATCH_SIZE, help="clips per call of the engine and the floor")
    p.add_argument("--hf-batch-size", type=int, default=8, help="clips per call of transformers' batched generate")
    p.add_argument("--widths", default="8,16,32", help="clips per call compared in section 5 (empty: skip it)")
    p.add_argument("--width-clips", type=int, default=32, help="world clips captioned at each width")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="rounds of each measurement; the fastest counts")
    p.add_argument("--bridge", help="bridge directory (default: demos/bridge if present, else untrained offline backbones)")
    p.add_argument("--skip-blip2", action="store_true", help="only the end-to-end / floor comparison")
    p.add_argument("--shots-clips", type=int, default=40, help="world clips for the --shots comparison (0: skip it)")
    p.add_argument("--per-file", type=int, default=10, help="world clips one after another in each file of the --shots comparison")
    p.add_argument("--ray", action="store_true", help="compare `qformer recaption --ray` with the local engine (section 6 alone)")
    p.add_argument("--ray-actors", type=int, help="with --ray: actors holding the bridge (default 1 without GPUs)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads of the model process (default: torch's choice); 1 keeps "
        "figures steady when other processes share the cores, where threads spinning at barriers wait for each other",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "clips").mkdir()
        write_clips(tmp / "clips", args.clips, args.clip_frames, args.size)
        items = rc.discover([str(tmp / "clips")])
        n = len(items)
        runs = iter(range(1_000_000))  # a fresh output file per engine run: each run does all the work
        engine = lambda bridge, prompt, frames, todo=items, shots=None, match=False: run_engine(  # noqa: E731
            todo, tmp / f"run{next(runs)}.jsonl", bridge, prompt, frames, args, shots, match
        )

        bridge_dir = args.bridge or (str(DEFAULT_BRIDGE) if DEFAULT_BRIDGE.is_dir() else None)
        bridge = Bridge.from_pretrained(bridge_dir) if bridge_dir else Bridge(BridgeConfig())
        bridge.eval()
        num_frames = args.num_frames or bridge.config.num_frames
        prompt = bridge.config.caption_prompt
        print(
            f"bridge: {bridge_dir or 'untrained, ' + bridge.config.vision + ' + ' + bridge.config.llm}; "
            f"{n} clips of {args.clip_frames} frames {args.size}x{args.size}, {num_frames} sampled per clip, "
            f"batch {args.batch_size}, {args.max_new_tokens} new tokens at most, {args.workers} decode workers"
        )
        if args.ray:
            ray_dir = bridge_dir or str(tmp / "untrained")
            if not bridge_dir:  # the actors load the bridge from a directory
                bridge.save_pretrained(ray_dir)
            ray_against_local(items, tmp, ray_dir, prompt, num_frames, args)
            return
        engine(bridge, prompt, num_frames, items[:2])  # first-call allocations
        (e2e_s, e2e_captions, e2e_all), (floor_s, floor_captions, floor_all), (scored_s, _, scored_all) = best_of(
            args.repeats,
            partial(engine, bridge, prompt, num_frames),
            partial(frozen_floor, items, bridge, prompt, num_frames, args),
            partial(engine, bridge, prompt, num_frames, match=True),
        )
        print(f"end-to-end recaption:       {n / e2e_s:7.3f} clips/s (best {e2e_s:.2f} s of {_list(e2e_all)}; --no-match)")
        print(
            f"frozen-model floor:         {n / floor_s:7.3f} clips/s (best {floor_s:.2f} s of {_list(floor_all)}: "
            "vision encoder + LLM prefill/decode)"
        )
        print(f"end-to-end / floor:         {floor_s / e2e_s:7.3f}   (goal >= 0.85)")
        print(f"same greedy tokens:         {e2e_captions == floor_captions}")
        print(
            f"with match scores:          {n / scored_s:7.3f} clips/s (best {scored_s:.2f} s of {_list(scored_all)}; "
            f"{scored_s / e2e_s:.2f}x the time of --no-match)"
        )
        if args.shots_clips:
            write_world(tmp, args.shots_clips, args.per_file)
            one, cut = rc.discover([str(tmp / "one")]), rc.discover([str(tmp / "cut")])
            (one_s, _, one_all), (cut_s, _, cut_all) = best_of(
                args.repeats,
                partial(engine, bridge, prompt, num_frames, one),
                partial(engine, bridge, prompt, num_frames, cut, (SHOT_THRESHOLD, MIN_SHOT_S)),
            )
            m = args.shots_clips
            print(f"{m} world clips (2 s, 128 px), one file each, without --shots: {m / one_s:7.3f} clips/s (best of {_list(one_all)})")
            print(
                f"the same clips, {args.per_file} per file, with --shots:          {m / cut_s:7.3f} clips/s (best of {_list(cut_all)}; "
                f"{cut_s / one_s:.2f}x the time)"
            )
        del bridge

        if not args.skip_blip2:
            model, processor = tiny_blip2(tmp / "blip2")
            ours = Bridge.from_blip2(tmp / "blip2").eval()
            transformers_usual_way(items[:2], model, processor, args, 1)  # warm up both
            engine(ours, "", 1, items[:2])
            widths = list(dict.fromkeys([1, args.hf_batch_size, args.batch_size]))
            (ours_s, ours_captions, ours_all), *hf = best_of(
                args.repeats,
                lambda: engine(ours, "", 1),
                *[partial(transformers_usual_way, items, model, processor, args, w) for w in widths],
            )
            print(
                f"BLIP-2 (random ViT-S/16 224 px, Q-Former 6x384, OPT 6x512), 1 frame per clip, {args.max_new_tokens} new tokens at most:"
            )
            print(f"  recaption engine, {args.batch_size} clips per call: {n / ours_s:7.3f} clips/s (best of {_list(ours_all)})")
            goals = {1: " (goal >= 1.5)", 8: " (goal >= 1.2)"}
            for w, (hf_s, hf_captions, hf_all) in zip(widths, hf):
                print(
                    f"  transformers, {w:2d} clips per call: {n / hf_s:7.3f} clips/s (best of {_list(hf_all)})   "
                    f"engine/transformers {hf_s / ours_s:5.2f}x{goals.get(w, '')}   identical captions: {ours_captions == hf_captions}"
                )
        if args.widths:
            batch_widths(args, bridge_dir)
    print(f"load average at the end {os.getloadavg()[0]:.2f} (other processes on these cores make every figure noisier)")


def batch_widths(args, bridge_dir: str | None) -> None:
    """Section 5: the bench's bridge captioning the same world clips at several batch widths."""
    bridge = Bridge.from_pretrained(bridge_dir) if bridge_dir else Bridge(BridgeConfig()).eval()
    clips = [world.render(world.scene("test-iid", i)) for i in range(args.width_clips)]
    widths = [int(w) for w in args.widths.split(",")]
    bridge.caption(clips[:2], batch_size=2)  # first-call allocations
    results = best_of(args.repeats, *[partial(lambda w: timed(bridge.caption, clips, batch_size=w), w) for w in widths])
    print(f"{args.width_clips} world clips captioned by Bridge.caption, by clips per call:")
    for w, (seconds, captions, all_s) in zip(widths, results):
        print(
            f"  {w:3d} per call: {1000 * seconds / len(clips):6.1f} ms a clip (best of {_list(all_s)})   "
            f"same captions as {widths[0]} per call: {captions == results[0][1]}"
        )


def timed(run, *a, **kw):
    """(seconds, result) of one call, as best_of takes them."""
    start = time.perf_counter()
    result = run(*a, **kw)
    return time.perf_counter() - start, result


def watched(run, out: Path) -> tuple[float, float]:
    """(seconds of run(), clips/s after its first records): out is watched as it grows, one record a clip."""
    first: list[tuple[float, int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.02) and not first:
            lines = out.read_bytes().count(b"\n") if out.exists() else 0
            if lines:
                first.append((time.perf_counter(), lines))

    watcher = threading.Thread(target=watch)
    start = time.perf_counter()
    watcher.start()
    try:
        run()
    finally:
        end = time.perf_counter()
        stop.set()
        watcher.join()
    total = out.read_bytes().count(b"\n")
    t0, lines = first[0] if first else (end, total)
    return end - start, (total - lines) / (end - t0) if end > t0 else math.nan


def ray_against_local(items, tmp: Path, bridge_dir: str, prompt: str, num_frames: int, args) -> None:
    """Section 6: the Ray engine against the local engine on the same clips, each as its command runs it."""
    import ray

    from qformer.ray_recaption import recaption_on_ray

    n = len(items)
    common = dict(prompts=[prompt], num_frames=num_frames, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False)

    def local(out: Path) -> None:
        bridge = Bridge.from_pretrained(bridge_dir)
        rc.recaption(items, str(out), bridge, "bench", workers=args.workers, **common)

    def on_ray(out: Path) -> None:
        recaption_on_ray(items, str(out), bridge_dir, "bench", actors=args.ray_actors, **common)

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    try:
        rounds = [
            (
                watched(partial(local, tmp / f"local{r}.jsonl"), tmp / f"local{r}.jsonl"),
                watched(partial(on_ray, tmp / f"ray{r}.jsonl"), tmp / f"ray{r}.jsonl"),
            )
            for r in range(args.repeats)
        ]
    finally:
        ray.shutdown()
    # The best round of each: load from other processes only ever slows a round.
    local_s, ray_s = (min(r[k][0] for r in rounds) for k in (0, 1))
    local_rate, ray_rate = (max(r[k][1] for r in rounds) for k in (0, 1))
    same = {r["path"]: r["caption"] for r in rc.read_records(str(tmp / "local0.jsonl"))} == {
        r["path"]: r["caption"] for r in rc.read_records(str(tmp / "ray0.jsonl"))
    }
    actors = args.ray_actors or 1
    # One CPU's decoding rate: what decode tasks each give the actors.
    vision = Bridge.from_pretrained(bridge_dir).vision
    decoded = rc.DecodedItems(items[:20], vision.preprocess, num_frames, None, decode_side(vision))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for k in range(len(decoded)):
        decoded[k]
    decode_rate = len(decoded) / (time.perf_counter() - t0)
    print(f"--ray against the local engine, {n} clips, {os.cpu_count()} CPUs, {actors} actor(s), load average {os.getloadavg()[0]:.2f}:")
    print(f"  local engine:  {n / local_s:7.3f} clips/s end to end (bridge load included), {local_rate:7.3f} after the first records")
    print(f"  --ray:         {n / ray_s:7.3f} clips/s end to end (actors start, load the bridge), {ray_rate:7.3f} after the first records")
    print(
        f"  --ray / local: {local_s / ray_s:7.3f} end to end, {ray_rate / local_rate:.3f} after the first records (goal >= 0.8)   same captions: {same}"
    )
    per_actor = ray_rate / actors
    print(
        f"  per actor {per_actor:.3f} clips/s; one CPU decodes {decode_rate:.1f} clips/s. On N GPU actors, each at least as fast as "
        f"this CPU one: >= N x {per_actor:.3f} clips/s (N=8: {8 * per_actor:.2f}, N=64: {64 * per_actor:.1f}), needing "
        f"N x {per_actor / decode_rate:.2f} decode CPUs at this actor rate"
    )


def _list(seconds: list[float]) -> str:
    return "[" + ", ".join(f"{s:.2f}" for s in seconds) + "] s"


if __name__ == "__main__":
    main()
