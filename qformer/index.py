"""An index of clips for text-to-clip search (qformer/search.py): every clip embedded once by a bridge's scorer,
written as it goes, exactly once through kills.

    INPUT... --discover (recaption's)--> items --DecodedItems workers: decode + preprocess--> (T, 3, H, W)
      --scorer's vision encoder--> features (B, T, N, Dv) --Q-Former + ITC head--> embeddings (B, Q, E)
      --> INDEX_DIR/part-<n>.safetensors

INDEX_DIR holds:
    index.json             {"bridge": the bridge directory, absolute}: search loads that bridge's scorer
    part-<n>.safetensors   one batch: "embeddings" (B, Q, E) float32, what ITC compares a text with, and
                           "features" (B, T, N, Dv) float32, the frozen features ITM re-ranks on; its metadata's
                           "entries" (JSON) name the clips, one per row in order, then the items that could
                           not be read (with their error, and no row)
    .lock                  held by the process writing the index

A part is its own journal record: written to a temporary file, fsynced and renamed into place, so its
tensors and the entries that name them appear together or not at all, and no record can point at a
missing or torn shard. A rerun takes the lock, removes the temporary file a kill left, reads the entries
of every part (the safetensors headers alone) and embeds only the items no part holds, so each clip is
in the index once. The frozen features are kept because ITM reads them with the text and search must
never load the vision encoder; with the default bridge's sizes (4 frames of 8 x 8 tokens, 80 wide, and
16 x 256 embeddings) a clip takes about 100 KB.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .scorer import Scorer

INDEX_CONFIG = "index.json"
LOCK_NAME = ".lock"
PART_GLOB = "part-*.safetensors"


def entry_key(entry: dict) -> tuple:
    """(path, span): what an entry is of, as recaption keys an item (a manifest row's start and end)."""
    return (entry["path"], None if entry["start"] is None else (entry["start"], math.inf if entry["end"] is None else entry["end"]))


def parts(directory: str | os.PathLike) -> list[Path]:
    """The index's parts in the order they were written."""
    return sorted(Path(directory).glob(PART_GLOB), key=lambda p: int(p.stem.split("-")[1]))


def read_entries(part: Path) -> list[dict]:
    from safetensors import safe_open

    with safe_open(str(part), "pt") as f:
        return json.loads((f.metadata() or {})["entries"])


# ---------------------------------------------------------------- writing


class IndexLock:
    """An exclusive lock on an index directory, so two runs never embed the same items. `fd` is what
    recaption's loader closes in its decoding workers (a worker outliving a killed run must not hold it)."""

    def __init__(self, directory: Path):
        self.fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ValueError(f"{directory}: another qformer index process is writing this index; wait for it") from None

    def close(self) -> None:
        os.close(self.fd)


def open_index(directory: str | os.PathLike, bridge: str) -> Path:
    """The index directory for `bridge`, made when new. ValueError: a directory holding other files, or an
    index of another bridge (its embeddings live in another space)."""
    d = Path(directory)
    config = d / INDEX_CONFIG
    if d.exists() and not d.is_dir():
        raise ValueError(f"{d}: is not a directory; --out names the index directory")
    if config.is_file():
        made_by = json.loads(config.read_text()).get("bridge")
        if made_by != bridge:
            raise ValueError(f"{d}: is an index of the bridge {made_by!r}, not {bridge!r}; index into another --out")
        return d
    if d.is_dir() and any(p.name != LOCK_NAME for p in d.iterdir()):
        raise ValueError(f"{d}: holds files and no {INDEX_CONFIG}, so it is no index; choose a new or empty --out")
    d.mkdir(parents=True, exist_ok=True)
    _write_atomic(config, lambda tmp: Path(tmp).write_text(json.dumps({"bridge": bridge}) + "\n"))
    return d


def _write_atomic(path: Path, write) -> None:
    """write(tmp) into a temporary file beside path, fsync it, rename it over path and make the name durable."""
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)


@dataclass
class IndexSummary:
    indexed: int  # clips embedded in this run
    failed: int  # items that could not be read, in this run
    skipped: int  # items an earlier run indexed

    def line(self) -> str:
        text = f"indexed {self.indexed}, failed {self.failed}"
        return text + (f", {self.skipped} already indexed" if self.skipped else "")


def build_index(
    items: Sequence, directory: str | os.PathLike, scorer: Scorer, bridge: str, batch_size: int, workers: int, progress: bool = True
) -> IndexSummary:
    """Embed the items no part of the index in `directory` holds, a part per batch of clips of one shape."""
    from adapters.video import decode_side

    from . import recaption as rc

    d = open_index(directory, bridge)
    lock = IndexLock(d)
    try:
        for stale in d.glob(".*.tmp"):  # a part a kill left unfinished: never renamed, so never read
            stale.unlink()
        found = parts(d)
        done = {entry_key(e) for p in found for e in read_entries(p)}
        pending = [it for it in items if entry_key(_entry(it)) not in done]
        summary = IndexSummary(0, 0, len(items) - len(pending))
        number = int(found[-1].stem.split("-")[1]) + 1 if found else 0
        failures: list[dict] = []
        buckets: dict[tuple, list] = {}

        def write(samples: list) -> None:
            nonlocal number
            tensors = {}
            if samples:
                pixels = torch.stack([s.shots[0].pixels for s in samples])  # (B, T, 3, H, W)
                features = scorer.pixel_features(pixels)  # (B, T, N, Dv)
                tensors = {"features": features.contiguous(), "embeddings": scorer.embed_features(features).contiguous()}
            entries = [_entry(s.item, s) for s in samples] + failures
            metadata = {"entries": json.dumps(entries, ensure_ascii=False)}
            from safetensors.torch import save_file

            _write_atomic(d / f"part-{number:06d}.safetensors", lambda tmp: save_file(tensors, tmp, metadata=metadata))
            number += 1
            summary.indexed += len(samples)
            summary.failed += len(failures)
            bar.update(len(entries))
            failures.clear()

        bar = rc.progress_bar(len(pending), progress)
        dataset = rc.DecodedItems(
            pending, scorer.vision.preprocess, scorer.config.num_frames, None, decode_side(scorer.vision), scorer.config.frame_sampling
        )
        with torch.inference_mode():
            for sample in rc._loader(dataset, min(workers, len(pending)), batch_size, lock):
                if sample.error is not None:
                    failures.append(_entry(sample.item, sample))
                    continue
                bucket = buckets.setdefault(tuple(sample.shots[0].pixels.shape), [])
                bucket.append(sample)
                if len(bucket) == batch_size:
                    write(buckets.pop(tuple(sample.shots[0].pixels.shape)))
            for bucket in buckets.values():
                write(bucket)
            if failures:
                write([])
        bar.close()
    finally:
        lock.close()
    return summary


def _entry(item, sample=None) -> dict:
    """What a part says of an item: its key, and with a decoded sample its span, frames and duration or its error."""
    start, end = item.span or (None, None)
    entry = {"path": item.path, "start": start, "end": None if end is None or math.isinf(end) else end}
    if sample is None:
        return entry
    if sample.error is not None:
        return entry | {"error": sample.error}
    shot = sample.shots[0]
    return entry | {"start_s": shot.start_s, "end_s": shot.end_s, "num_frames": shot.num_frames, "duration_s": sample.duration_s}


# ---------------------------------------------------------------- reading


class Index:
    """An index read for search: every clip's entry and ITC embeddings in memory; the frozen features are read
    from their parts only for the clips ITM re-ranks (StoredFeatures)."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        d = Path(directory)
        if not (d / INDEX_CONFIG).is_file():
            raise ValueError(f"{d}: no {INDEX_CONFIG}, so it is no index (make one with qformer index ... --out {d})")
        self.bridge = json.loads((d / INDEX_CONFIG).read_text())["bridge"]
        self.entries: list[dict] = []
        self.rows: list[tuple[Path, int]] = []  # each clip's part and row
        embeddings = []
        for part in parts(d):
            with safe_open(str(part), "pt") as f:
                clips = [e for e in json.loads(f.metadata()["entries"]) if "error" not in e]
                if clips:
                    embeddings.append(f.get_tensor("embeddings"))
            self.entries += clips
            self.rows += [(part, i) for i in range(len(clips))]
        if not self.entries:
            raise ValueError(f"{d}: the index holds no clip")
        self.embeddings = torch.cat(embeddings)  # (N, Q, E)
        self.features = StoredFeatures(self.rows)

    def __len__(self) -> int:
        return len(self.entries)


class StoredFeatures:
    """The frozen features of an index's clips as search.rank takes them, features[indices] -> (k, T, N, Dv),
    read from their parts when asked; a clip of fewer frames (an image) repeats its last, as
    Scorer.clip_features pads a batch."""

    def __init__(self, rows: list[tuple[Path, int]]):
        self.rows = rows

    def __getitem__(self, indices: Sequence[int]) -> torch.Tensor:
        from safetensors import safe_open

        got = []
        for i in indices:
            part, row = self.rows[i]
            with safe_open(str(part), "pt") as f:
                got.append(f.get_slice("features")[row : row + 1][0])
        T = max(len(g) for g in got)
        return torch.stack([g[torch.arange(T).clamp(max=len(g) - 1)] for g in got])
