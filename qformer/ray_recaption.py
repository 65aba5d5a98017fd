"""Recaption on Ray Data: the local engine's inputs, records and exactly-once output, over many machines.

    driver: discover + pending_items --> rows (one per input not yet recorded)
      --map, CPU tasks: DecodedItems' decode, shot detection and preprocess--> one decoded Sample per row
      --map_batches, a pool of actors each holding the bridge (one GPU each, or CPUs)--> the input's records
      --> driver: appended to the same journal as the local engine's, then the same merge

Only the driver writes, so the journal's guarantees hold whatever else dies: Ray retries a failed task and
restarts a dead actor, and their records reach the journal only through the driver; a dead driver leaves a
journal that a rerun of the same command resumes (recaption.py: torn tail cut, recorded inputs skipped).
The driver loads the vision encoder once to get its preprocessing (Preprocess, picklable) and never the LLM.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adapters.video import decode_side
from adapters.vision import load_vision

from . import recaption as rc
from .bridge import local_source, read_config
from .config import CAPTION_BATCH_SIZE, MAX_NEW_TOKENS

# The version pyproject.toml's `ray` extra pins, named in the error when Ray is missing.
RAY_REQUIREMENT = "ray[data]==2.60.0"
# Memory a decode task reserves (bytes): its worker process (Python, torch, PyAV: Ray measured 374 MB) and
# the preprocessed shots of one input.
DECODE_MEMORY = 512 * 2**20


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError(f"--ray needs Ray Data, which is not installed: pip install 'qformer[ray]' (or '{RAY_REQUIREMENT}')") from None
    return ray


@dataclass(frozen=True)
class Captioning:
    """What the actors need besides the bridge: the same for every batch."""

    bridge_dir: str
    llm_kwargs: dict | None
    settings: rc.Settings
    max_new_tokens: int
    batch_size: int
    match: bool


def decode_row(row: dict, decoding: dict) -> dict:
    """A CPU task: one input's Sample (its shots preprocessed, or its error), pickled for the actors.
    decoding: DecodedItems' arguments but the items."""
    sample = rc.DecodedItems([pickle.loads(row["item"])], **decoding)[0]
    return {"sample": pickle.dumps(sample), "recorded": row["recorded"]}


class Captioner:
    """An actor holding the bridge: a batch of decoded inputs -> each input's records, as JSON text."""

    def __init__(self, captioning: Captioning, threads: int | None):
        from .bridge import Bridge

        if threads:  # CPU actors: their share of the cores
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray shows each actor only its own GPU
        self.bridge = Bridge.from_pretrained(captioning.bridge_dir, llm_kwargs=captioning.llm_kwargs).to(device).eval()
        self.captioning = captioning

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c = self.captioning
        records: list[list[dict]] = []
        shapes: dict[tuple, list[tuple[int, rc._Unit]]] = {}  # shape -> (input, unit): the LLM batches one shape
        for i, (blob, recorded) in enumerate(zip(batch["sample"], batch["recorded"])):
            sample = pickle.loads(blob)
            kept = frozenset((shot, prompt) for shot, prompt in json.loads(recorded))
            records.append(rc.error_records(sample, kept, c.settings) if sample.error is not None else [])
            for unit in rc.shot_units(sample, kept, c.settings.prompts):
                if unit.prompts:
                    shapes.setdefault(tuple(unit.shot.pixels.shape), []).append((i, unit))
        with torch.inference_mode():
            for pairs in shapes.values():
                for k in range(0, len(pairs), c.batch_size):
                    chunk = pairs[k : k + c.batch_size]
                    for (i, _), made in zip(
                        chunk, rc.caption_units(self.bridge, [u for _, u in chunk], c.settings, c.max_new_tokens, c.match)
                    ):
                        records[i] += made
        return {"records": np.array([json.dumps(r, ensure_ascii=False) for r in records], dtype=object)}


def recaption_on_ray(
    items: Sequence[rc.Item],
    out: str,
    bridge_dir: str,
    bridge_name: str,
    address: str | None = None,
    actors: int | None = None,
    prompts: Sequence[str] | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    batch_size: int = CAPTION_BATCH_SIZE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    num_beams: int = 1,
    shots: tuple[float, float] | None = None,
    retry_failed: bool = False,
    match: bool = True,
    llm_kwargs: dict | None = None,
    progress: bool = True,
) -> rc.Summary:
    """recaption.recaption's work as a Ray Data pipeline; the same arguments, records and output.

    address None starts a Ray on this machine for the run (all its CPUs) and shuts it down after; "auto"
    or HOST:PORT joins a running cluster. actors: bridge actors (default: one per GPU of the cluster, or
    one without GPUs). Each GPU actor takes one GPU; without GPUs each takes a share of the CPUs, and the
    CPUs left decode.
    """
    ray = import_ray()
    config = read_config(local_source(bridge_dir))
    prompts = tuple(dict.fromkeys(prompts or [config.caption_prompt]))
    num_frames = rc.frames_to_read(config, num_frames, fps)
    threshold, min_shot_s = shots or (None, None)
    settings = rc.Settings(bridge_name, prompts, num_beams, threshold, min_shot_s)
    with rc.open_journal(out, items, (0, 1), settings) as journal:
        pending, skipped = rc.pending_items(items, out, prompts, shots is not None, retry_failed)
        summary = rc.Summary(done=0, failed=0, skipped=skipped, seconds=0.0, missing=0)
        start = time.perf_counter()
        if pending:
            vision = load_vision(config.vision, config.vision_layer, config.vision_resolution)
            decoding = dict(
                preprocess=vision.preprocessor,
                num_frames=num_frames,
                fps=fps,
                max_side=decode_side(vision),
                sampling=config.frame_sampling,
                shots=shots,
            )
            del vision
            captioning = Captioning(bridge_dir, llm_kwargs, settings, max_new_tokens, batch_size, match)
            started = not ray.is_initialized()
            if started:
                ray.init(
                    address=address or "local",  # "local": a new Ray even when this machine runs one already
                    num_cpus=None if address else os.cpu_count(),
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                )
            try:
                _run(ray, pending, decoding, captioning, actors, journal, summary, progress)
            finally:
                if started:
                    ray.shutdown()
        summary.seconds = time.perf_counter() - start
        summary.missing = rc.merge(items, out, prompts, shots is not None)
    return summary


def _run(
    ray, pending, decoding: dict, captioning: Captioning, actors: int | None, journal: rc.Journal, summary: rc.Summary, progress: bool
) -> None:
    """Build the pipeline and append each batch of records it yields, as it comes."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the bar is ours: inputs recorded, as the local engine shows
    context.print_on_execution_start = False
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    actors = actors or max(1, gpus)
    # Without GPUs, the actors reserve half the CPUs between them, so that decode tasks are always scheduled,
    # but each runs the models on threads for its whole share of the cores: decoding needs little (one CPU
    # decodes about 200 clips/s), and on one thread an actor of a 2-core machine captioned 7.0 clips/s, on two
    # 10.8 (python -m bench.recaption_speed --ray --clips 200).
    actor_cpus = 1 if gpus else max(1, cpus // (2 * actors))
    actor_threads = None if gpus else max(1, cpus // actors)
    rows = [{"item": pickle.dumps(item), "recorded": json.dumps(sorted(kept))} for item, kept in pending]
    # Blocks of one model batch: decoded samples stream to the actors batch by batch, not in one lump.
    dataset = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / captioning.batch_size))
    # Each decode task reserves room for one input's preprocessed shots. Resources unlike the actors' also keep
    # Ray Data from fusing decoding into them (it fuses tasks into an actor pool of the same resources), so
    # decoding stays in tasks that scale with the CPUs.
    dataset = dataset.map(decode_row, fn_kwargs={"decoding": decoding}, num_cpus=1, memory=DECODE_MEMORY)
    dataset = dataset.map_batches(
        Captioner,
        fn_constructor_args=(captioning, actor_threads),
        batch_size=captioning.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        num_cpus=actor_cpus,
    )  # Ray Data restarts an actor that dies (its machine, out of memory) and retries its batch, without limit
    bar = rc.progress_bar(len(rows), progress)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        per_input = [json.loads(text) for text in batch["records"]]
        records = [r for made in per_input for r in made]
        journal.append(records)
        summary.count(records)
        summary.inputs += len(per_input)
        bar.update(len(per_input))
        bar.set_postfix(failed=summary.failed, refresh=False)
    bar.close()
