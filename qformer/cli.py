"""The `qformer` command line.

Each subcommand is two functions: `add_<name>(subparsers)` declares its arguments and `run_<name>(args)`
does the work (returning the exit status). `main` registers them; a new subcommand is one more pair.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import chat
from . import recaption as rc
from .bridge import DEFAULT_BRIDGE, bridge_or_default
from .build import add_quantization_arguments, llm_loading
from .config import CAPTION_BATCH_SIZE, MAX_NEW_TOKENS
from .shots import MIN_SHOT_S, SHOT_THRESHOLD


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qformer", description="A Q-Former bridge between a frozen vision encoder and a frozen LLM.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_recaption(subparsers)
    add_chat(subparsers)
    add_filter(subparsers)
    add_index(subparsers)
    add_search(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, rc.OutputBusy) as e:
        # Mistakes in the command or its files: one clear line, no traceback.
        print(f"qformer {args.command}: error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- recaption


def add_recaption(subparsers) -> None:
    p = subparsers.add_parser(
        "recaption",
        help="caption every clip or image of folders, files, manifests or datasets directories",
        description=(
            "One caption per input (per shot with --shots) and prompt, written as it goes (JSONL, or Parquet for "
            "FILE.parquet). Rerunning the same command resumes: inputs already recorded are skipped, even after a kill. Under `accelerate launch` "
            "(or with --shard i/n) each process takes every n-th input and writes FILE.shard-i-of-n.jsonl; the "
            "last process to finish merges them into FILE."
        ),
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="folders (searched recursively), clip or image files, manifests (.jsonl/.csv/.parquet with a "
        "video or image column; relative paths are relative to the manifest), datasets save_to_disk folders",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="output records: JSONL, or Parquet when FILE ends in .parquet")
    p.add_argument("--bridge", metavar="DIR", help=f"bridge directory (Bridge.save_pretrained); default {DEFAULT_BRIDGE}")
    frames = p.add_mutually_exclusive_group()
    frames.add_argument("--num-frames", type=int, metavar="N", help="frames sampled per clip (default: the bridge's)")
    frames.add_argument(
        "--fps", type=float, metavar="F", help="sample F frames per second instead (capped at the frames the bridge's Q-Former takes)"
    )
    p.add_argument("--batch-size", type=int, default=CAPTION_BATCH_SIZE, metavar="B", help="clips per model call")
    p.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="instruction given with each clip (default: the bridge's caption prompt); repeat it for one record per prompt, "
        "each clip decoded and encoded once",
    )
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, metavar="K", help="longest caption, in tokens")
    p.add_argument(
        "--num-beams",
        type=int,
        default=1,
        metavar="NB",
        help="beam search over NB beams instead of greedy decoding: slower, and more often right (README)",
    )
    p.add_argument("--shots", action="store_true", help="cut each video at its scene changes and caption each shot (PySceneDetect)")
    p.add_argument(
        "--shot-threshold",
        type=float,
        default=SHOT_THRESHOLD,
        metavar="X",
        help="with --shots: a cut where a frame changes X times more than its neighbours do (lower: more cuts)",
    )
    p.add_argument("--min-shot-s", type=float, default=MIN_SHOT_S, metavar="S", help="with --shots: the shortest shot, seconds")
    p.add_argument("--retry-failed", action="store_true", help="also take again the inputs whose records are errors")
    p.add_argument(
        "--no-match",
        action="store_true",
        help="write match null instead of scoring each caption (one more LLM pass per caption; README)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=rc.DEFAULT_WORKERS,
        metavar="W",
        help="processes decoding clips while the model runs (0: decode in the main process)",
    )
    add_quantization_arguments(p)
    p.add_argument("--shard", metavar="i/n", help="caption only every n-th input, starting at the i-th (0-based), of the sorted inputs")
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run as a Ray Data pipeline (pip install 'qformer[ray]'): CPU tasks decode, actors hold the bridge, this "
        "process writes the records; alone it starts a Ray on this machine for the run, `auto` or HOST:PORT joins a "
        "cluster (README). --workers does not apply",
    )
    p.add_argument(
        "--ray-actors", type=int, metavar="N", help="with --ray: actors holding the bridge (default: one per GPU of the cluster, or 1)"
    )
    p.set_defaults(run=run_recaption)


def run_recaption(args) -> int:
    import torch
    from accelerate import PartialState

    from .bridge import Bridge

    for name in ("num_frames", "batch_size", "max_new_tokens", "num_beams"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")
    if args.ray_actors is not None and (args.ray is None or args.ray_actors < 1):
        raise ValueError(f"--ray-actors needs --ray and at least 1, got {args.ray_actors}")
    if args.fps is not None and not args.fps > 0:
        raise ValueError(f"--fps must be positive, got {args.fps}")
    if not args.shot_threshold > 0 or not args.min_shot_s >= 0:
        raise ValueError(f"--shot-threshold must be positive and --min-shot-s 0 or more, got {args.shot_threshold} and {args.min_shot_s}")
    bridge_dir = bridge_or_default(args.bridge)
    # The record names the bridge by absolute path, so a rerun from another folder resumes the same output.
    bridge_name = os.path.abspath(bridge_dir) if os.path.isdir(bridge_dir) else bridge_dir

    # Under `accelerate launch`: this process's index, the process count and its device. Without CUDA,
    # Accelerate only counts the launched processes when told they run on the CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes > 1:
        if args.shard:
            raise ValueError("--shard and `accelerate launch` both split the inputs; use one of them")
        shard = (state.process_index, state.num_processes)
    else:
        shard = rc.parse_shard(args.shard) if args.shard else (0, 1)
    if args.ray is not None:
        from .ray_recaption import import_ray

        if shard[1] > 1:
            raise ValueError("--ray and --shard (or `accelerate launch`) both split the inputs; use one of them")
        import_ray()  # a missing Ray says so before anything is listed or loaded

    # Before loading models: a bad manifest, or an --out this run would destroy or mix into, fails in a second.
    items = rc.discover(args.inputs)
    shots = (args.shot_threshold, args.min_shot_s) if args.shots else None
    prompts = tuple(dict.fromkeys(args.prompt or [rc.configured_prompt(bridge_dir)]))
    threshold, min_shot_s = shots or (None, None)
    # None: a hub bridge's caption prompt is known once it loads; recaption() checks then, before writing.
    settings = None if None in prompts else rc.Settings(bridge_name, prompts, args.num_beams, threshold, min_shot_s)
    rc.check_output(args.out, args.inputs, items, shard, settings)
    llm_kwargs = llm_loading(args.load_in_4bit, args.load_in_8bit)
    run = dict(
        prompts=args.prompt,
        num_frames=args.num_frames,
        fps=args.fps,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        shots=shots,
        retry_failed=args.retry_failed,
        match=not args.no_match,
    )
    if args.ray is not None:
        from .ray_recaption import recaption_on_ray

        summary = recaption_on_ray(
            items, args.out, bridge_dir, bridge_name, args.ray or None, args.ray_actors, llm_kwargs=llm_kwargs, **run
        )
    else:
        bridge = Bridge.from_pretrained(bridge_dir, llm_kwargs=llm_kwargs).to(state.device)
        summary = rc.recaption(items, args.out, bridge, bridge_name, workers=args.workers, shard=shard, **run)
    prefix = f"shard {shard[0]}/{shard[1]}: " if shard[1] > 1 else ""
    print(prefix + summary.line(), flush=True)
    if shard[1] > 1 and summary.missing == 0:
        print(f"merged the records of {len(items)} inputs into {args.out}", flush=True)
    return 0


# ---------------------------------------------------------------- filter


def add_filter(subparsers) -> None:
    p = subparsers.add_parser(
        "filter",
        help="keep the records of a recaption output whose caption fits its clip (match score at least X)",
        description=(
            "Keep the records of a qformer recaption output (JSONL or Parquet) whose `match`, the scorer's probability "
            "that the caption describes its clip, is at least X; records without a score (errors, or a bridge "
            "without a scorer) are dropped. Counts go to stderr."
        ),
    )
    p.add_argument("records", metavar="OUT", help="a qformer recaption output: JSONL, or Parquet for .parquet")
    p.add_argument("--min-match", type=float, required=True, metavar="X", help="the least match score kept, from 0 to 1")
    p.add_argument("--out", metavar="KEPT", help="write the kept records here (JSONL, or Parquet for .parquet); default: JSONL on stdout")
    p.set_defaults(run=run_filter)


def run_filter(args) -> int:
    from .filtering import filter_records, write_kept

    if not 0.0 <= args.min_match <= 1.0:
        raise ValueError(f"--min-match is a probability, from 0 to 1; got {args.min_match}")
    filtered = filter_records(args.records, args.min_match)
    write_kept(filtered.kept, args.records, args.out)
    print(filtered.line(args.min_match), file=sys.stderr)
    return 0


# ---------------------------------------------------------------- index and search


def add_index(subparsers) -> None:
    p = subparsers.add_parser(
        "index",
        help="embed every clip once with a bridge's scorer, for qformer search",
        description=(
            "Embed every clip or image of the inputs (as qformer recaption finds them) with the bridge's scorer: its ITC "
            "embeddings and frozen features, written batch by batch into INDEX_DIR. Rerunning the same command resumes: "
            "clips already indexed are skipped, even after a kill. The bridge needs a scorer (the shipped default has one)."
        ),
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="folders, clip or image files, manifests, datasets directories (as recaption)"
    )
    p.add_argument("--out", required=True, metavar="INDEX_DIR", help="the index directory: new, empty, or an index of the same bridge")
    p.add_argument("--bridge", metavar="DIR", help=f"bridge directory with a scorer; default {DEFAULT_BRIDGE}")
    p.add_argument("--batch-size", type=int, default=CAPTION_BATCH_SIZE, metavar="B", help="clips per model call and per part file")
    p.add_argument("--workers", type=int, default=rc.DEFAULT_WORKERS, metavar="W", help="processes decoding clips (0: the main process)")
    p.set_defaults(run=run_index)


def needs_scorer(bridge_dir: str, command: str) -> ValueError:
    return ValueError(
        f"{bridge_dir}: qformer {command} needs a scorer, and this bridge has no scorer/ directory beside its weights and no "
        "stage-1 heads that fit its Q-Former (the shipped default bridge has one; train one: train.py --stage 1 "
        "--init-from BRIDGE --stage1-losses itc,itm --train attention, then qformer.bridge.save_scorer)"
    )


def run_index(args) -> int:
    from .bridge import load_scorer
    from .index import build_index

    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"--batch-size must be at least 1 and --workers 0 or more, got {args.batch_size} and {args.workers}")
    bridge_dir = bridge_or_default(args.bridge)
    items = rc.discover(args.inputs)
    scorer = load_scorer(bridge_dir)
    if scorer is None:
        raise needs_scorer(bridge_dir, "index")
    summary = build_index(items, args.out, scorer, os.path.abspath(bridge_dir), args.batch_size, args.workers)
    print(summary.line(), flush=True)
    return 0


def add_search(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="the clips of an index best described by a text",
        description=(
            "The clips of a qformer index best described by TEXT, best first, by the index's ITC embeddings (scores: "
            "ITC's cosine); with --rerank N the scorer's ITM re-ranks the N best (scores: ITM's probability above, "
            "the cosine below). Loads the scorer's Q-Former and the index, never the LLM or the vision encoder."
        ),
    )
    p.add_argument("index", metavar="INDEX_DIR", help="a directory written by qformer index")
    p.add_argument("text", metavar="TEXT", help="what the clips should show")
    p.add_argument("--top", type=int, default=10, metavar="K", help="how many clips to print")
    p.add_argument("--json", action="store_true", help="one JSON object per line: path, start_s, end_s, score")
    p.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="N",
        help="re-rank the N best by the scorer's ITM (BLIP-2's retrieval, for a scorer whose ITM tells captions apart; "
        "the default bridge's does not and ranks best by ITC alone: bench/README.md, matching)",
    )
    p.set_defaults(run=run_search)


def run_search(args) -> int:
    import json

    import torch

    from .bridge import load_scorer
    from .index import Index
    from .search import rank

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    # A search is a few small matmuls: a second thread does not speed them up, and its OpenMP spinning on a
    # busy machine made a cold search twice as slow here (10 s against 5 s). Restored after: main() also runs
    # in-process, and a caller's later work must not compute with one thread (other sums, other last bits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        index = Index(args.index)
        scorer = load_scorer(index.bridge)
        if scorer is None:
            raise needs_scorer(index.bridge, "search")
        if args.rerank < 0:
            raise ValueError(f"--rerank must be 0 or more, got {args.rerank}")
        found = rank(scorer, index.embeddings, index.features, args.text, top=args.top, rerank=args.rerank)
    finally:
        torch.set_num_threads(threads)
    for i, score in found:
        entry = index.entries[i]
        if args.json:
            print(json.dumps({"path": entry["path"], "start_s": entry["start_s"], "end_s": entry["end_s"], "score": score}))
        else:
            span = f" [{entry['start_s']:g}-{entry['end_s']:g} s]" if entry["start"] is not None else ""
            print(f"{score:.4f}  {entry['path']}{span}")
    return 0


# ---------------------------------------------------------------- chat


def add_chat(subparsers) -> None:
    p = subparsers.add_parser("chat", help=chat.DESCRIPTION, description=chat.DESCRIPTION)
    chat.add_arguments(p)
    p.set_defaults(run=run_chat)


def run_chat(args) -> int:
    chat.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
