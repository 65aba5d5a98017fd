"""Recaption a data set: one caption per clip, shot or image and prompt, at the speed of the frozen models, never losing work.

    INPUT... --discover--> sorted unique items --shard i/n--> this process's items, minus those already done
      --DataLoader workers: [shot detection] + read_clip + vision.preprocess--> (T, 3, H, W) per shot, or an error
      --main process: batches of shots with the same shape--> Bridge.answer_pixels, every prompt --> captions
      --> append-only JSONL journal (one line per record, fsynced per batch) --> merged output file

An item is a file, or a span [start, end) of one when its manifest row has `start` and `end` columns
(seconds). With shots (--shots) each item is cut at its scene changes (qformer/shots.py) and each shot is
captioned; without, the item is one shot. Every shot is decoded and encoded once (vision encoder and,
unless it reads the prompt, the Q-Former), then the LLM answers each prompt about it.

Output records (JSONL, or Parquet when the file name ends in .parquet), one per (item, shot, prompt):
    path, shot, start_s, end_s, caption, num_frames, duration_s, error (null, or what was wrong), bridge,
    prompt, num_beams, shot_threshold, min_shot_s (both null without shots), match (how well the caption
    describes its shot, in (0, 1]: Bridge.match_features, the caption scored as the shot's caption on the
    features it was written from; null for an error; records written before scores have no match field)
followed by the manifest row's other columns under their own names (`source_NAME` when NAME is a record
field). start_s and end_s are seconds from the start of the file; without shots they are the span, or 0
and the clip's duration. An item that cannot be read gets one error record per prompt (shot 0).

The key of a record is (path, span, shot, prompt), the span being the row's start and end (carried in the
record as its `start` and `end` columns). Exactly once, through kills: each process appends complete lines
to its own journal and fsyncs them per batch. On start it cuts a torn last line (a kill mid-write) off its
journal and skips every item whose records are all in any journal of the same output: one per prompt, or
with shots every shot 0..k of each prompt, the last ending where the item ends. A partly recorded item is
decoded again and only its missing records are made. --retry-failed also takes again the items whose
records are errors; a later caption replaces the error in the merged output. A process holds an exclusive
lock on its journal, so two runs can never write the same one.

Journals of output FILE:
    FILE                               unsharded JSONL output: the journal is the output itself
    FILE.journal.jsonl                 unsharded Parquet output
    FILE.shard-<i>-of-<n>.jsonl        shard i of n (--shard i/n, or each process of `accelerate launch`)

What --out may name: a new or empty file, or an output of this tool made with the same settings (Settings:
bridge, --num-beams, shot detection, and prompts among this run's; a run with more prompts adds the new
ones). A journal is cut at its torn tail and the merge replaces FILE, so anything else (a clip, a manifest
or any other input, another table, a binary file, a directory) would be destroyed: it is refused, by
reading only, before a model loads (check_output), and the same goes for each journal of FILE.

Merge: every process, after its last record, reads all journals of FILE; if together they hold every
record of every input it writes FILE atomically (temporary file + os.replace), one record per (item, shot,
prompt), in sorted order. So the last shard to finish writes the merged file, on one machine or many
sharing a file system, with no barrier to hang on when a process dies; rerunning any shard's command after
a crash redoes only the merge. Two shards finishing together write identical files, so either may win. An
unsharded JSONL journal is the output itself, rewritten only when a retry left replaced records in it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import glob
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ClipError, decode_side, read_clip

from .config import CAPTION_BATCH_SIZE, MAX_NEW_TOKENS
from .shots import detect_cuts, shot_spans

MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
# Columns of a manifest or datasets directory that may name the clips, in order of preference.
MEDIA_COLUMNS = ("video", "video_path", "image", "image_path", "clip", "path", "file", "file_name", "filename")
# The output record, field -> Parquet type; JSONL lines carry the same fields in the same order.
RECORD_SCHEMA = {
    "path": "string",
    "shot": "int32",
    "start_s": "float64",
    "end_s": "float64",
    "caption": "string",
    "num_frames": "int32",
    "duration_s": "float64",
    "error": "string",
    "bridge": "string",
    "prompt": "string",
    "num_beams": "int32",
    "shot_threshold": "float64",
    "min_shot_s": "float64",
    "match": "float64",
}
# A manifest column whose name is a record field is carried under this prefix.
CLASH_PREFIX = "source_"
# Decoding processes beside the model: enough to keep it fed, not so many that they fight it for the cores.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Item:
    """One input. `path` is the record's key: an absolute file path, or DIR#ROW for bytes stored in a datasets directory."""

    path: str
    # Found wrong while listing the inputs (a symlink loop, a folder that cannot be listed).
    error: str | None = None
    # (datasets directory, column, row) when the clip's bytes live inside a datasets directory.
    blob: tuple[str, str, int] | None = None
    # [start, end) seconds to caption, from a manifest row's start and end (end inf: to the clip's end); None: all.
    span: tuple[float, float] | None = None
    # The manifest row's other columns, as its records carry them (see carried_columns).
    columns: dict | None = None

    @property
    def order(self) -> tuple:
        """Sort key; the whole file before its spans."""
        return (self.path, self.span is not None, self.span or (0.0, 0.0))


def discover(inputs: Iterable[str]) -> list[Item]:
    """Folders (recursive), files, manifests (.jsonl/.csv/.parquet) and datasets directories -> sorted unique items.

    A path that does not exist is kept as an item (its record says so). A manifest that cannot be read or
    names no clips raises ValueError: that is a mistake in the command, better reported before any model loads.
    """
    found: dict[tuple, Item] = {}
    for arg in inputs:
        for item in _expand(arg):
            found.setdefault((item.path, item.span), item)
    return sorted(found.values(), key=lambda item: item.order)


def _expand(arg: str) -> Iterator[Item]:
    path = os.path.abspath(arg)
    if os.path.isdir(path):
        yield from (_dataset_items(path) if _is_dataset_dir(path) else _walk(path))
    elif path.lower().endswith(MANIFEST_SUFFIXES) and os.path.isfile(path):
        yield from _manifest_items(path)
    else:
        yield Item(path)


def _walk(root: str) -> Iterator[Item]:
    """Media files under root, following symlinked folders once each; a link back to an ancestor is an error record."""
    visited = {os.path.realpath(root)}
    stack = [(root, (os.path.realpath(root),))]  # (folder, real paths of the folder and its ancestors)
    while stack:
        folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield Item(folder, error=f"{folder}: cannot list folder: {e.strerror}")
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError as e:
                if e.errno == errno.ELOOP:
                    yield Item(entry.path, error=f"{entry.path}: symlink loop ({e.strerror})")
                continue
            if is_dir:
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    yield Item(entry.path, error=f"{entry.path}: symlink loop (points back to {real}); not followed")
                elif real not in visited:  # a second link to a folder already listed adds nothing
                    visited.add(real)
                    stack.append((entry.path, ancestors + (real,)))
            elif os.path.splitext(entry.name)[1].lower() in MEDIA_EXTENSIONS:
                yield Item(entry.path)


def _media_column(columns: Sequence[str], source: str) -> str:
    for name in MEDIA_COLUMNS:
        if name in columns:
            return name
    raise ValueError(
        f"{source}: no column naming the clips; expected one of {', '.join(MEDIA_COLUMNS)}, found {', '.join(columns) or 'none'}"
    )


def _manifest_items(manifest: str) -> Iterator[Item]:
    """Rows of a manifest; relative paths are relative to the manifest's folder (as in Hugging Face metadata
    files). A row's start and end make its span; its columns but the clip's travel with its records."""
    base = os.path.dirname(manifest)
    try:
        column, rows = _manifest_rows(manifest)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{manifest}: cannot read this manifest: {e}") from None
    for n, row in enumerate(rows, 1):
        value = row.get(column)
        if isinstance(value, dict):  # a Hugging Face Image/Video feature: {"bytes", "path"}
            value = value.get("path")
        if not isinstance(value, str) or not value:
            raise ValueError(f"{manifest}: row {n} has no clip path ({value!r})")
        try:
            span = row_span(row.get("start"), row.get("end"))
        except ValueError:
            raise ValueError(
                f"{manifest}: row {n}: start and end must be seconds, got {row.get('start')!r} and {row.get('end')!r}"
            ) from None
        if span is not None and not 0 <= span[0] < span[1]:
            raise ValueError(f"{manifest}: row {n}: the span from {span[0]:g} s to {span[1]:g} s is empty or negative")
        columns = carried_columns({k: v for k, v in row.items() if k != column})
        yield Item(os.path.normpath(os.path.join(base, value)), span=span, columns=columns)


def row_span(start, end) -> tuple[float, float] | None:
    """A manifest row's start and end (seconds: numbers, or the strings a CSV holds) as a span; None when
    the row gives neither. A missing start is 0, a missing end the clip's end (inf). ValueError: not numbers."""
    start, end = (None if v is None or v == "" else float(v) for v in (start, end))
    if start is None and end is None:
        return None
    return (start or 0.0, math.inf if end is None else end)


def carried_columns(row: dict) -> dict:
    """A manifest row's columns as records carry them: a name that is a record field gets CLASH_PREFIX, and
    a value JSON cannot hold (a date, bytes) becomes its text, so journals and Parquet hold the same."""
    return {(CLASH_PREFIX + k if k in RECORD_SCHEMA else k): json.loads(json.dumps(v, default=str)) for k, v in row.items()}


def _manifest_rows(manifest: str) -> tuple[str, list[dict]]:
    """(the column naming the clips, the rows)."""
    lower = manifest.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(manifest)
        return _media_column(table.column_names, manifest), table.to_pylist()
    if lower.endswith(".csv"):
        import csv

        with open(manifest, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return _media_column(list(rows[0]) if rows else [], manifest), rows
    rows = []
    with open(manifest, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"line {n} is not a JSON object")
                rows.append(row)
    return _media_column(sorted({k for r in rows for k in r}), manifest), rows


def _is_dataset_dir(path: str) -> bool:
    """A directory written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))
    )


def _dataset_items(path: str) -> Iterator[Item]:
    """Clips named or embedded in a datasets directory: a path column, or Image/Video features (bytes or path)."""
    import datasets
    import pyarrow.compute as pc
    import pyarrow.types as pt

    loaded = datasets.load_from_disk(path)
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, part in splits:
        where = os.path.join(path, split) if split else path
        column = _media_column(part.column_names, where)
        values = part.data.table.column(column).combine_chunks()  # memory-mapped: no clip bytes are read here
        if pt.is_struct(values.type):
            paths = values.field("path").to_pylist()
            embedded = pc.is_valid(values.field("bytes")).to_pylist()
        else:
            paths, embedded = values.to_pylist(), [False] * len(values)
        for row, (value, has_bytes) in enumerate(zip(paths, embedded)):
            if has_bytes:
                yield Item(f"{where}#{row}", blob=(where, column, row))
            elif value:
                yield Item(os.path.normpath(os.path.join(where, value)))
            else:
                yield Item(f"{where}#{row}", error=f"{where}: row {row} holds neither bytes nor a path in column {column!r}")


# ---------------------------------------------------------------- decoding (in worker processes)


@dataclass
class Shot:
    start_s: float  # seconds from the start of the file
    end_s: float
    pixels: torch.Tensor  # (T, 3, H, W), preprocessed for the vision encoder
    num_frames: int


@dataclass
class Sample:
    item: Item
    duration_s: float | None
    shots: list[Shot]  # in order; empty when the item could not be read
    error: str | None


class DecodedItems(torch.utils.data.Dataset):
    """Decode, sample and preprocess one item per call (each of its shots when `shots` is (threshold,
    min_shot_s)); every failure becomes a Sample with its error."""

    def __init__(
        self,
        items: Sequence[Item],
        preprocess: Callable,
        num_frames: int | None,
        fps: float | None,
        max_side: int | None,
        sampling: str = "centres",
        shots: tuple[float, float] | None = None,
    ):
        self.items, self.preprocess = items, preprocess
        self.num_frames, self.fps, self.max_side, self.sampling = num_frames, fps, max_side, sampling
        self.shots = shots

    def _read_file(self, path: str, start_s: float, end_s: float):
        end = None if math.isinf(end_s) else end_s
        return read_clip(
            path, num_frames=self.num_frames, fps=self.fps, max_side=self.max_side, sampling=self.sampling, start_s=start_s, end_s=end
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        item = self.items[i]
        if item.error is not None:
            return Sample(item, None, [], item.error)
        try:
            with self._file(item) as path:
                try:
                    return self._decode(item, path)
                except ClipError as e:  # PyAV and Pillow read a temporary file; errors name the item
                    raise ClipError(str(e).replace(path, item.path)) from None
        except ClipError as e:
            return Sample(item, None, [], str(e))
        except Exception as e:  # noqa: BLE001 -- a decoder bug on one file must not end the data set's run
            return Sample(item, None, [], f"{item.path}: {type(e).__name__}: {e}")

    def _decode(self, item: Item, path: str) -> Sample:
        start, end = item.span or (0.0, math.inf)
        spans = [(start, end)]
        if self.shots is not None:
            try:
                cuts = detect_cuts(path, *self.shots, start_s=start, end_s=None if math.isinf(end) else end)
            except Exception as e:  # noqa: BLE001 -- said below, for the item
                self._read_file(path, start, end)  # a file that cannot be read at all says why (ClipError)
                raise ClipError(f"{path}: shot detection failed: {type(e).__name__}: {e}") from None
            spans = shot_spans(cuts, start, end)
        shots, duration = [], None
        for shot_start, shot_end in spans:
            clip = self._read_file(path, shot_start, shot_end)
            duration = clip.duration_s
            pixels = self.preprocess(clip.frames)  # (T, 3, H, W)
            shots.append(Shot(shot_start, min(shot_end, duration), pixels, len(clip.frames)))
        return Sample(item, duration, shots, None)

    @contextlib.contextmanager
    def _file(self, item: Item) -> Iterator[str]:
        """A path to the item's bytes: its file, or a temporary copy of bytes stored in a datasets directory."""
        if item.blob is None:
            yield item.path
            return
        where, column, row = item.blob
        cell = _dataset_table(where).column(column)[row].as_py()
        suffix = os.path.splitext(cell.get("path") or "")[1] or ".bin"
        with tempfile.NamedTemporaryFile(suffix=suffix) as f:
            f.write(cell["bytes"])
            f.flush()
            yield f.name


@functools.lru_cache(maxsize=8)
def _dataset_table(where: str):
    import datasets

    return datasets.load_from_disk(where).data.table


def _keep(sample: Sample) -> Sample:
    """collate_fn: samples travel one by one; the main process batches them by shape."""
    return sample


def _close_in_worker(fds: tuple[int, ...], worker_id: int) -> None:
    for fd in fds:
        os.close(fd)


def _loader(dataset: DecodedItems, workers: int, batch_size: int, journal: Journal | None = None) -> torch.utils.data.DataLoader:
    kwargs = {}
    if workers > 0:
        # Fork shares the already loaded vision adapter with the workers instead of pickling it;
        # out-of-order delivery keeps a slow clip (an hour of video) from stalling the others;
        # each worker keeps a batch ready so the model never waits.
        context = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
        kwargs = dict(multiprocessing_context=context, prefetch_factor=max(2, batch_size), in_order=False)
        if journal is not None and context == "fork":
            # A forked worker inherits the journal's descriptor and with it the lock; after a kill -9 of the
            # main process the orphaned worker would hold the lock for seconds and refuse an immediate rerun.
            kwargs["worker_init_fn"] = functools.partial(_close_in_worker, (journal.fd,))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_keep, **kwargs)


# ---------------------------------------------------------------- journals and output


def _encode(record: dict) -> bytes:
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 (os.fsdecode's surrogates): escape it
        return (json.dumps(record) + "\n").encode("ascii")


def _parse(data: bytes, source: str) -> list[dict]:
    """Records of the complete lines in data (a trailing piece without its newline is a write in progress)."""
    lines = data[: data.rfind(b"\n") + 1].splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: line {n} is not a JSON record ({e}); the file was changed by something else") from None
    return records


def journal_path(out: str, shard: tuple[int, int]) -> str:
    i, n = shard
    if n > 1:
        return f"{out}.shard-{i}-of-{n}.jsonl"
    return f"{out}.journal.jsonl" if out.lower().endswith(".parquet") else out


def _journals(out: str) -> list[str]:
    """Every journal of this output that exists (see the module docstring)."""
    paths = sorted(glob.glob(glob.escape(out) + ".shard-*-of-*.jsonl"))
    paths += [p for p in (f"{out}.journal.jsonl", out) if not p.lower().endswith(".parquet") and os.path.isfile(p)]
    return paths


def read_records(path: str) -> list[dict]:
    """Records of a JSONL or Parquet output (or journal), ignoring a torn last line."""
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, "rb") as f:
        return _parse(f.read(), path)


class OutputBusy(RuntimeError):
    """Another process holds the journal this run would write."""


# ---------------------------------------------------------------- what --out may name


# How every encoded record begins (_encode): the mark of a first record torn by a kill.
RECORD_START = b'{"path": '
# Fields of the records this tool wrote before match scores; before shots (and before num_beams): a record of whole clips.
_BEFORE_MATCH = set(RECORD_SCHEMA) - {"match"}
_BEFORE_SHOTS = _BEFORE_MATCH - {"shot", "start_s", "end_s", "shot_threshold", "min_shot_s"}
OLDER_FIELD_SETS = (_BEFORE_SHOTS, _BEFORE_SHOTS - {"num_beams"})


@dataclass(frozen=True)
class Settings:
    """What decides the captions of an output, recorded in each record: a rerun must use the same, or one
    output would hold two kinds of captions. Its prompts may grow: a rerun with one more adds its records."""

    bridge: str  # the bridge directory, absolute, or a hub id
    prompts: tuple[str, ...]
    num_beams: int = 1
    shot_threshold: float | None = None  # None: no shot detection
    min_shot_s: float | None = None

    def describe(self) -> str:
        shots = (
            "no --shots"
            if self.shot_threshold is None
            else f"--shots --shot-threshold {self.shot_threshold:g} --min-shot-s {self.min_shot_s:g}"
        )
        prompts = ", ".join(map(repr, self.prompts))
        return f"bridge {self.bridge!r}, prompt{'s' if len(self.prompts) > 1 else ''} {prompts}, --num-beams {self.num_beams} and {shots}"


# Names that say a file holds clips or a table of them, never records.
FOREIGN_SUFFIXES = tuple(MEDIA_EXTENSIONS) + (".csv",)


def check_output(out: str, inputs: Sequence[str], items: Sequence[Item], shard: tuple[int, int], settings: Settings | None) -> None:
    """Refuse, by reading only, an --out this run would destroy: its journals are appended to and cut, and
    the merge replaces it, so each must be new, empty, or this tool's output of the same settings.

    Every journal this run would read or write is checked, against the INPUT arguments and the items too:
    a manifest or a clip given as --out would otherwise be overwritten. settings None (a bridge whose config,
    and so its caption prompt, is not on this machine yet) leaves them to recaption(), still before anything
    is written.
    """
    targets = list(dict.fromkeys([out, journal_path(out, shard), *_journals(out)]))
    _refuse_inputs(targets, [*inputs, *(item.path for item in items)])
    if out.lower().endswith(FOREIGN_SUFFIXES):
        raise ValueError(f"{out}: --out names a clip, image or CSV file; records go to a .jsonl or .parquet file")
    for path in targets:
        first = _first_output_record(path)
        if first is not None and settings is not None:
            # Every record: the first holds one prompt of several.
            _check_same_settings(read_records(path), path, settings)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a path with a NUL byte
        return None
    return st.st_dev, st.st_ino


def _refuse_inputs(targets: Sequence[str], sources: Iterable[str]) -> None:
    """A target that is one of the sources, by path (as given or with links resolved) or by inode (a hard link)."""
    by_name = {os.path.abspath(t): t for t in targets} | {os.path.realpath(t): t for t in targets}
    by_inode = {ident: t for t in targets if (ident := _identity(t)) is not None}
    for source in sources:
        target = by_name.get(os.path.abspath(source)) or (by_inode and by_inode.get(_identity(source)))
        if target:
            raise ValueError(f"{target}: is one of the inputs ({source}); recaption would overwrite it, choose another --out")


def _first_output_record(path: str) -> dict | None:
    """The first record of an existing output or journal; None when there is none yet. ValueError when path
    is not this tool's output: a directory, another kind of file, a table or lines of other fields."""
    if not os.path.lexists(path):
        return None
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; --out must name a file")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: is not a regular file (a device, a pipe or a broken link); --out must name a file")
    if os.path.getsize(path) == 0:
        return None
    if path.lower().endswith(".parquet"):
        return _first_parquet_record(path)
    chunks = []
    with open(path, "rb") as f:
        # Up to the first newline, or a NUL byte that says the file is binary: a clip is not read whole.
        while chunk := f.read(1 << 16):
            chunks.append(chunk)
            if b"\n" in chunk or b"\0" in chunk:
                break
    return _first_journal_record(path, b"".join(chunks))


def _first_journal_record(path: str, data: bytes) -> dict | None:
    """The first record of a JSONL journal from its first bytes (through the first newline); None when there
    is none yet (an empty file, or a first record torn by a kill). ValueError when they are not a journal of this tool."""
    end = data.find(b"\n")
    line = data if end < 0 else data[:end]
    what = f"{path}: is not an output of qformer recaption"
    if b"\0" in line:  # JSON text never holds a NUL byte
        raise ValueError(f"{what} (a binary file); refusing to write to it, choose another --out")
    if end < 0:
        if data[: len(RECORD_START)] == RECORD_START[: len(data)]:  # nothing yet, or a first record torn by a kill
            return None
        raise ValueError(f"{what} (no complete line, and it does not begin as a record); refusing to write to it, choose another --out")
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"{what} (its first line is not a JSON object); refusing to write to it, choose another --out")
    _check_fields(set(record), what)
    return record


def _first_parquet_record(path: str) -> dict | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    what = f"{path}: is not an output of qformer recaption"
    try:
        table = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{what} (not a Parquet file: {e}); refusing to replace it, choose another --out") from None
    schema = table.schema_arrow
    _check_fields(set(schema.names), what)
    wrong = [
        f"{name}: {schema.field(name).type}"
        for name in schema.names
        if name in RECORD_SCHEMA and schema.field(name).type != getattr(pa, RECORD_SCHEMA[name])()
    ]
    if wrong:
        raise ValueError(f"{what} (columns of other types: {', '.join(wrong)}); refusing to replace it, choose another --out")
    return next((batch.to_pylist()[0] for batch in table.iter_batches(batch_size=1) if batch.num_rows), None)


def _check_fields(fields: set[str], what: str) -> None:
    """A record's fields (match aside: older records have none), then any carried columns; or a record of
    before shots, exactly."""
    if not (_BEFORE_MATCH <= fields or fields in OLDER_FIELD_SETS):
        raise ValueError(
            f"{what} (its fields are {', '.join(sorted(fields))}; a record's are {', '.join(RECORD_SCHEMA)}); "
            "refusing to write to it, choose another --out"
        )


class Journal:
    """This process's append-only JSONL journal: locked, torn tail cut, one write and fsync per batch."""

    def __init__(self, path: str):
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        created = not os.path.exists(path)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise OutputBusy(f"{path}: another recaption process is writing this file; wait for it or choose another --out") from None
        data = _read_all(self.fd)
        try:
            _first_journal_record(path, data)  # a file of another kind must not be cut below
        except ValueError:
            os.close(self.fd)
            raise
        complete = data.rfind(b"\n") + 1
        if complete < len(data):  # a record torn by a kill: drop it, its item is done again
            os.ftruncate(self.fd, complete)
            os.fsync(self.fd)
        if created:  # make the new file's name durable too
            dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)

    def append(self, records: list[dict]) -> None:
        data = b"".join(_encode(r) for r in records)
        while data:
            written = os.write(self.fd, data)
            data = data[written:]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def record_key(record: dict) -> tuple:
    """(path, span, shot, prompt): what a record is of. The span is the manifest row's, carried in its start
    and end columns; records from before shots are of whole clips (shot 0)."""
    return (record["path"], row_span(record.get("start"), record.get("end")), record.get("shot", 0), record["prompt"])


def _recorded(out: str) -> tuple[dict[tuple, dict], int]:
    """(record_key -> record over every journal of out, how many records they hold). A caption replaces an
    error (--retry-failed); otherwise the first record of a key wins (they are identical)."""
    done: dict[tuple, dict] = {}
    count = 0
    for path in _journals(out):
        for record in read_records(path):
            count += 1
            key = record_key(record)
            if key not in done or (done[key]["error"] is not None and record["error"] is None):
                done[key] = record
    return done, count


def _by_item(done: dict[tuple, dict]) -> dict[tuple, list[dict]]:
    """(path, span, prompt) -> that item's records for that prompt, by shot."""
    groups: dict[tuple, list[dict]] = {}
    for (path, span, _, prompt), record in sorted(done.items(), key=lambda kv: kv[0][2]):
        groups.setdefault((path, span, prompt), []).append(record)
    return groups


def _complete(records: list[dict], item: Item, shots: bool, retry: bool) -> bool:
    """Whether an item's records for one prompt are all there: an error (unless it is to be retried), one
    record of the whole item, or with shots every shot 0..k, the last ending where the item ends."""
    if not records:
        return False
    if any(r["error"] is not None for r in records):
        return not retry
    if not shots:
        return True
    last = records[-1]
    return [r["shot"] for r in records] == list(range(len(records))) and last["end_s"] == min(item_end(item), last["duration_s"])


def item_end(item: Item) -> float:
    """Where the item's span ends (inf: at the clip's end); the last shot ends at min(this, duration)."""
    return item.span[1] if item.span else math.inf


def _write_atomic(out: str, records: list[dict]) -> None:
    """Write the whole output to a temporary file in the same folder, fsync it, and rename it over out."""
    folder = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".", suffix=".tmp", dir=folder)
    try:
        if out.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            os.close(fd)
            pq.write_table(_table(records), tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(b"".join(_encode(r) for r in records))
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _table(records: list[dict]):
    """Records as an Arrow table: the record fields with their RECORD_SCHEMA types, then each carried column
    with the type Arrow infers from its values (int64, double, string, lists, structs); a column whose
    values have no common type (JSONL rows holding 1 in one and "a" in another) holds their JSON text."""
    import pyarrow as pa

    columns = {name: pa.array([r.get(name) for r in records], getattr(pa, kind)()) for name, kind in RECORD_SCHEMA.items()}
    for name in dict.fromkeys(k for r in records for k in r if k not in RECORD_SCHEMA):
        values = [r.get(name) for r in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string())
    return pa.table(columns)


def merge(items: Sequence[Item], out: str, prompts: Sequence[str], shots: bool) -> int:
    """Write out from all its journals if they hold every record of every item; returns how many items
    still lack one. Records go in item order, then shot, then prompt (in the order given)."""
    done, count = _recorded(out)
    groups = _by_item(done)
    order = {prompt: i for i, prompt in enumerate(prompts)}
    merged, missing = [], 0
    for item in items:
        per_prompt = [groups.get((item.path, item.span, prompt), []) for prompt in prompts]
        if not all(_complete(records, item, shots, retry=False) for records in per_prompt):
            missing += 1
            continue
        merged += sorted((r for records in per_prompt for r in records), key=lambda r: (r.get("shot", 0), order[r["prompt"]]))
    # An unsharded JSONL journal already is the output, unless a retry left replaced records in it.
    if missing == 0 and (_journals(out) != [out] or count > len(done)):
        _write_atomic(out, merged)
    return missing


# ---------------------------------------------------------------- the run


@dataclass
class Summary:
    done: int  # captions recorded in this run
    failed: int  # error records written in this run
    skipped: int  # inputs all of whose records an earlier run wrote
    seconds: float
    missing: int  # inputs of other shards not recorded yet (0: the merged output is written)
    inputs: int = 0  # inputs finished in this run

    @property
    def clips_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0

    def count(self, records: list[dict]) -> None:
        self.failed += sum(r["error"] is not None for r in records)
        self.done += sum(r["error"] is None for r in records)

    def line(self) -> str:
        text = f"done {self.done}, failed {self.failed}, {self.clips_per_s:.2f} clips/s"
        if self.skipped:
            text += f", {self.skipped} already done"
        if self.missing:
            text += f", {self.missing} inputs of other shards still to do before the merge"
        return text


@dataclass
class _Unit:
    """One shot of a decoded item, and the prompts still to answer about it."""

    sample: Sample
    index: int
    shot: Shot
    prompts: list[str]


# The pieces of a run, shared by this engine and the Ray engine (qformer/ray_recaption.py).


def frames_to_read(config, num_frames: int | None, fps: float | None) -> int:
    """The frames to sample per clip for a bridge config: num_frames (default the bridge's), or with fps
    at most what the Q-Former reads: what its temporal embedding covers, or its tubelets' frames (more
    would be decoded for nothing). ValueError: more than the Q-Former takes."""
    max_frames = config.qformer.tubelet_frames or config.qformer.max_frames
    if fps is not None:
        return num_frames or max_frames
    num_frames = num_frames or config.num_frames
    if num_frames > max_frames:
        raise ValueError(f"--num-frames {num_frames}: this bridge's Q-Former takes at most {max_frames} frames per clip")
    return num_frames


@contextlib.contextmanager
def open_journal(out: str, items: Sequence[Item], shard: tuple[int, int], settings: Settings) -> Iterator[Journal]:
    """This process's journal of out, once out is known to be safe to write (check_output)."""
    check_output(out, (), items, shard, settings)
    journal = Journal(journal_path(out, shard))
    try:
        yield journal
    finally:
        journal.close()


def pending_items(
    items: Sequence[Item], out: str, prompts: Sequence[str], shots: bool, retry_failed: bool, shard: tuple[int, int] = (0, 1)
) -> tuple[list[tuple[Item, frozenset]], int]:
    """(this shard's items whose records are not all in out's journals, each with the (shot, prompt) pairs
    already recorded and kept; how many of its items are done). An error to retry is not kept."""
    groups = _by_item(_recorded(out)[0])
    i, n = shard
    mine = items[i::n]
    pending = []
    for item in mine:
        per_prompt = {p: groups.get((item.path, item.span, p), []) for p in prompts}
        if all(_complete(records, item, shots, retry_failed) for records in per_prompt.values()):
            continue
        kept = frozenset(
            (r.get("shot", 0), p) for p, records in per_prompt.items() for r in records if not (retry_failed and r["error"] is not None)
        )
        pending.append((item, kept))
    return pending, len(mine) - len(pending)


def progress_bar(total: int, progress: bool):
    """The bar both engines show: inputs finished, on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, unit="clip", file=sys.stderr, disable=not progress, dynamic_ncols=True)


def make_record(
    settings: Settings, item: Item, prompt: str, shot: int, start_s, end_s, caption, num_frames, duration_s, error, match=None
) -> dict:
    fields = (item.path, shot, start_s, end_s, caption, num_frames, duration_s, error)
    fields += (settings.bridge, prompt, settings.num_beams, settings.shot_threshold, settings.min_shot_s, match)
    return dict(zip(RECORD_SCHEMA, fields)) | (item.columns or {})


def error_records(sample: Sample, recorded: frozenset, settings: Settings) -> list[dict]:
    """The records of an item that could not be read: one per prompt not yet recorded, shot 0 over its span."""
    item = sample.item
    start_s, end_s = item.span or (0.0, math.inf)
    end_s = None if math.isinf(end_s) else end_s
    return [
        make_record(settings, item, p, 0, start_s, end_s, None, None, None, sample.error)
        for p in settings.prompts
        if (0, p) not in recorded
    ]


def shot_units(sample: Sample, recorded: frozenset, prompts: Sequence[str]) -> list[_Unit]:
    """A decoded item's shots, each with its prompts not yet recorded (none: a killed run recorded it whole)."""
    return [_Unit(sample, k, shot, [p for p in prompts if (k, p) not in recorded]) for k, shot in enumerate(sample.shots)]


def caption_units(bridge, units: Sequence[_Unit], settings: Settings, max_new_tokens: int, match: bool = True) -> list[list[dict]]:
    """Answer every prompt of units of one shape in one batch, and score each answer (unless not `match`):
    each unit's records."""
    pixels = torch.stack([u.shot.pixels for u in units])  # (B, T, 3, H, W)
    rows = [j for j, u in enumerate(units) for _ in u.prompts]
    questions = [p for u in units for p in u.prompts]
    # The frozen features once, for the captions and their match scores.
    features = bridge.frame_features(pixels.to(bridge.projection.weight.device))  # (B, T, N, Dv)
    texts = bridge.answer_pixels(
        pixels, questions, max_new_tokens=max_new_tokens, num_beams=settings.num_beams, rows=rows, features=features
    )
    matches = iter(bridge.match_features(features[rows], texts).tolist() if match else [None] * len(texts))
    texts = iter(texts)
    return [
        [
            make_record(
                settings,
                u.sample.item,
                p,
                u.index,
                u.shot.start_s,
                u.shot.end_s,
                next(texts),
                u.shot.num_frames,
                u.sample.duration_s,
                None,
                next(matches),
            )  # fmt: skip
            for p in u.prompts
        ]
        for u in units
    ]


def recaption(
    items: Sequence[Item],
    out: str,
    bridge,
    bridge_name: str,
    prompts: Sequence[str] | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    batch_size: int = CAPTION_BATCH_SIZE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    num_beams: int = 1,
    workers: int = DEFAULT_WORKERS,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    shots: tuple[float, float] | None = None,
    retry_failed: bool = False,
    match: bool = True,
) -> Summary:
    """Caption this shard's items not yet recorded in out, append their records, and merge when all are done.

    prompts: one record per prompt (default: the bridge's caption prompt). num_frames / fps as in
    adapters.video.read_clip, capped as frames_to_read says. bridge_name goes into every record (the
    bridge directory). num_beams > 1 decodes by beam search (Bridge.caption).
    shots (threshold, min_shot_s): cut each item at its scene changes (qformer/shots.py) and caption each
    shot. retry_failed: take again the items whose records are errors. batch_size counts shots; the LLM
    answers batch_size x len(prompts) rows at once. match False: records' match is null (scoring is one more
    pass of the LLM over each caption).
    """
    prompts = tuple(dict.fromkeys(prompts or [bridge.config.caption_prompt]))
    num_frames = frames_to_read(bridge.config, num_frames, fps)
    threshold, min_shot_s = shots or (None, None)
    settings = Settings(bridge_name, prompts, num_beams, threshold, min_shot_s)
    with open_journal(out, items, shard, settings) as journal:
        pending, skipped = pending_items(items, out, prompts, shots is not None, retry_failed, shard)
        recorded = {(item.path, item.span): kept for item, kept in pending}
        summary = Summary(done=0, failed=0, skipped=skipped, seconds=0.0, missing=0)
        start = time.perf_counter()
        bar = progress_bar(len(pending), progress)
        units_left: dict[tuple, int] = {}  # (path, span) -> shots of the item still to write

        def finished(item: Item, units: int = 1) -> None:
            key = (item.path, item.span)
            units_left[key] -= units
            if units_left[key] == 0:
                summary.inputs += 1
                bar.update(1)

        def write(records: list[dict]) -> None:
            journal.append(records)
            summary.count(records)
            bar.set_postfix(failed=summary.failed, refresh=False)

        def caption(batch: list[_Unit]) -> None:
            write(failures + [r for records in caption_units(bridge, batch, settings, max_new_tokens, match) for r in records])
            failures.clear()
            for u in batch:
                finished(u.sample.item)

        # Shots wait in buckets of one shape (frame count and size) until a bucket fills a batch. With many
        # shapes (fps sampling) the fullest bucket goes early, so at most ~2 batches of shots wait in memory.
        buckets: dict[tuple, list[_Unit]] = {}
        failures: list[dict] = []
        waiting = 0
        bridge.eval()
        sampling = bridge.config.frame_sampling
        todo = [item for item, _ in pending]
        dataset = DecodedItems(todo, bridge.vision.preprocess, num_frames, fps, decode_side(bridge.vision), sampling, shots)
        with torch.inference_mode():
            for sample in _loader(dataset, min(workers, len(pending)), batch_size, journal):
                item = sample.item
                kept = recorded[(item.path, item.span)]
                if sample.error is not None:
                    units_left[(item.path, item.span)] = 1
                    failures.extend(error_records(sample, kept, settings))
                    finished(item)
                    if len(failures) >= batch_size:
                        write(failures)
                        failures.clear()
                    continue
                units = shot_units(sample, kept, prompts)
                units_left[(item.path, item.span)] = len(units)
                finished(item, sum(not u.prompts for u in units))  # shots a killed run recorded whole
                for unit in units:
                    if not unit.prompts:
                        continue
                    bucket = buckets.setdefault(tuple(unit.shot.pixels.shape), [])
                    bucket.append(unit)
                    waiting += 1
                    if len(bucket) == batch_size or waiting >= 2 * batch_size:
                        key = max(buckets, key=lambda k: len(buckets[k]))
                        full = buckets.pop(key)
                        waiting -= len(full)
                        caption(full)
            for batch in buckets.values():
                caption(batch)
            if failures:
                write(failures)
        bar.close()
        summary.seconds = time.perf_counter() - start
        # Before the lock goes: an unsharded JSONL output that a retry rewrites is this journal.
        summary.missing = merge(items, out, prompts, shots is not None)
    return summary


def _check_same_settings(records: Iterable[dict], out: str, settings: Settings) -> None:
    """Resuming with another bridge, decoding, shot detection or prompts would mix two kinds of captions in
    one output: refuse. Records written before num_beams or shots were recorded were greedy, of whole clips."""
    ours = (settings.bridge, settings.num_beams, settings.shot_threshold, settings.min_shot_s)
    for r in records:
        theirs = Settings(r.get("bridge"), (r.get("prompt"),), r.get("num_beams") or 1, r.get("shot_threshold"), r.get("min_shot_s"))
        if (theirs.bridge, theirs.num_beams, theirs.shot_threshold, theirs.min_shot_s) != ours or r.get("prompt") not in settings.prompts:
            raise ValueError(
                f"{out}: already holds captions made with {theirs.describe()}; this run uses {settings.describe()}. "
                "Rerun with those, or write to another --out"
            )


def configured_prompt(bridge_dir: str) -> str | None:
    """The bridge's caption prompt, read from its config without loading a model; None when the config is not
    on this machine (a hub id not downloaded yet). A transformers checkpoint directory's is empty: no text."""
    from .bridge import read_config

    if not Path(bridge_dir).is_dir():
        return None
    return read_config(bridge_dir).caption_prompt


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return i, n
