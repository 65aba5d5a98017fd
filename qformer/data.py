"""Training data: manifests, datasets saved to disk, webdataset shards, weighted mixing, a frozen-feature cache.

A source is a list of samples, each an image or a video and a caption or a question with its answer (a
question row may also hold its clip's caption, which `train.py --caption-first` puts before the question):
  - a manifest: JSONL, CSV or Parquet with a column `image` or `video` (paths relative to the manifest)
    and `caption`, or `question` and `answer`; optionally `negatives`, captions that do NOT fit the clip
    (a list, or in CSV a JSON array), which stage 1 uses besides its in-batch negatives;
  - a directory written by `datasets.Dataset.save_to_disk` with the same columns (images may be
    datasets Image features);
  - webdataset tar shards (a .tar file, a directory of them, or a glob): members grouped by key, one
    image or video member and a .txt caption or a .json with caption or question/answer. Members are
    indexed once and read by offset, so shards may sit on any mounted disk.
Several sources are mixed batch by batch with weights (as LAVIS's MultiIterLoader does), so every batch
holds one kind of sample.

A sample that cannot be read comes back as an error naming it; the training loop reports and skips it.
"""

from __future__ import annotations

import bisect
import csv
import glob
import hashlib
import json
import math
import os
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from adapters.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Clip, ClipError, as_clip, read_clip

MEDIA_COLUMNS = ("image", "video")


@dataclass
class Example:
    name: str  # how reports name the sample: its file, shard:member or directory[row]
    caption: str | None
    question: str | None
    answer: str | None
    negatives: tuple[str, ...] = ()  # captions that do not fit the clip


def _text_fields(row: dict, name: str) -> Example:
    caption, question, answer = (_clean(row.get(k)) for k in ("caption", "question", "answer"))
    return Example(name, caption, question, answer, _negatives(row.get("negatives"), caption, name))


def _negatives(value, caption: str | None, name: str) -> tuple[str, ...]:
    """A row's `negatives`: a list of captions (CSV holds it as a JSON array), none of them its own caption."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{name}: negatives must be a list of captions (a JSON array in CSV), not {value!r:.60}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name}: negatives must be a list of captions, not {value!r:.60}")
    negatives = tuple(v.strip() for v in value if v.strip())
    if caption is not None and caption in negatives:
        raise ValueError(f"{name}: its caption {caption!r} is among its own negatives")
    return negatives


def _clean(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    value = str(value).strip()
    return value or None


def _check_columns(columns: set[str], where: str) -> None:
    """Fail before any compute when a source cannot give media and text."""
    missing = []
    if not columns & set(MEDIA_COLUMNS):
        missing.append("an 'image' or 'video' column (file paths)")
    if "caption" not in columns and not {"question", "answer"} <= columns:
        missing.append("a 'caption' column, or 'question' and 'answer' columns")
    if missing:
        raise ValueError(f"{where}: needs {' and '.join(missing)}; it has columns {sorted(columns)}")


def _file_identity(path: str) -> str:
    """What the feature cache keys a file by: the file itself (symlinks resolved), and a change of content
    (size or mtime) makes a new key."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ClipError(f"{path}: cannot access: {e.strerror}") from None
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


class ManifestSource:
    """Rows of a JSONL, CSV or Parquet file; media paths are relative to the manifest's directory."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.rows = _read_table(self.path)
        if not self.rows:
            raise ValueError(f"{path}: the manifest has no rows")
        _check_columns(set().union(*(r.keys() for r in self.rows)), str(path))

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, i: int) -> Example:
        return _text_fields(self.rows[i], self.media_path(i) or f"{self.path}[{i}]")

    def media_path(self, i: int) -> str | None:
        media = next((_clean(self.rows[i].get(k)) for k in MEDIA_COLUMNS if _clean(self.rows[i].get(k))), None)
        return None if media is None else str(self.path.parent / media)

    def identity(self, i: int) -> str:
        return _file_identity(self._media(i))

    def load(self, i: int, num_frames: int, fps: float | None, sampling: str = "centres", max_side: int | None = None) -> Clip:
        return read_clip(self._media(i), num_frames=num_frames, fps=fps, sampling=sampling, max_side=max_side)

    def _media(self, i: int) -> str:
        path = self.media_path(i)
        if path is None:
            raise ClipError(f"{self.path} row {i}: no image or video")
        return path


def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e.msg}); a manifest has one JSON object per line") from None
        return rows
    if suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unknown manifest type {suffix!r}; use .jsonl, .csv or .parquet, a save_to_disk directory or .tar shards")


class DiskSource:
    """A `datasets` Dataset written by save_to_disk. Images may be Image features or paths (relative to it)."""

    def __init__(self, path: str):
        import datasets

        self.path = Path(path)
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{path}: a DatasetDict with splits {list(ds)}; pass one split's directory, e.g. {path}/{next(iter(ds))}")
        _check_columns(set(ds.column_names), str(path))
        self.ds = ds
        self.media_column = next(k for k in MEDIA_COLUMNS if k in ds.column_names)
        # Text columns alone, so listing examples never decodes an image.
        self.text = ds.select_columns([c for c in ("caption", "question", "answer", "negatives") if c in ds.column_names])

    def __len__(self) -> int:
        return len(self.ds)

    def example(self, i: int) -> Example:
        return _text_fields(self.text[i], f"{self.path}[{i}]")

    def identity(self, i: int) -> str:
        # The fingerprint changes whenever the dataset's content does.
        return f"{self.path.resolve()}:{self.ds._fingerprint}:{i}"

    def load(self, i: int, num_frames: int, fps: float | None, sampling: str = "centres", max_side: int | None = None) -> Clip:
        try:
            media = self.ds[i][self.media_column]
        except Exception as e:  # datasets decodes images on access; a corrupt one raises from PIL
            raise ClipError(f"{self.path}[{i}]: cannot decode {self.media_column}: {e}") from None
        if media is None:
            raise ClipError(f"{self.path}[{i}]: no {self.media_column}")
        if isinstance(media, str):
            return read_clip(self.path / media, num_frames=num_frames, fps=fps, sampling=sampling, max_side=max_side)
        return as_clip(media, num_frames=num_frames, fps=fps, sampling=sampling, max_side=max_side)


class TarSource:
    """webdataset tar shards, indexed once: key -> (shard, media member, offset, size) and its text."""

    def __init__(self, spec: str):
        shards = sorted(glob.glob(os.path.join(spec, "*.tar"))) if os.path.isdir(spec) else sorted(glob.glob(spec))
        if not shards:
            raise ValueError(f"{spec}: no .tar shards found")
        self.spec = spec
        self.items: list[tuple[str, str, int, int, Example]] = []
        for shard in shards:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(shard) as tar:
                for m in tar:
                    if m.isfile():
                        # webdataset: the key is the path up to the first dot of the file name.
                        directory, base = os.path.split(m.name)
                        key, _, ext = base.partition(".")
                        groups.setdefault(os.path.join(directory, key), {})[ext.lower()] = m
                for key, members in groups.items():
                    media = next((m for ext, m in members.items() if f".{ext}" in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS), None)
                    name = f"{shard}:{key}"
                    fields = {}
                    if "json" in members:
                        fields = json.loads(tar.extractfile(members["json"]).read())
                    if "txt" in members:
                        fields["caption"] = tar.extractfile(members["txt"]).read().decode()
                    if media is not None:
                        self.items.append((shard, media.name, media.offset_data, media.size, _text_fields(fields, name)))
        if not self.items:
            raise ValueError(f"{spec}: no sample in these shards has an image or video member")

    def __len__(self) -> int:
        return len(self.items)

    def example(self, i: int) -> Example:
        return self.items[i][4]

    def identity(self, i: int) -> str:
        shard, member, _, _, _ = self.items[i]
        return f"{_file_identity(shard)}:{member}"

    def load(self, i: int, num_frames: int, fps: float | None, sampling: str = "centres", max_side: int | None = None) -> Clip:
        shard, member, offset, size, ex = self.items[i]
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        # The decoders read files; a temporary one with the member's suffix, named in errors as the member.
        with tempfile.NamedTemporaryFile(suffix=Path(member).suffix) as tmp:
            tmp.write(data)
            tmp.flush()
            try:
                return read_clip(tmp.name, num_frames=num_frames, fps=fps, sampling=sampling, max_side=max_side)
            except ClipError as e:
                raise ClipError(str(e).replace(tmp.name, ex.name)) from None


def open_source(spec: str):
    """A source from a manifest file, a save_to_disk directory, or tar shards (file, directory, glob)."""
    path = Path(spec)
    if spec.endswith(".tar") or any(c in spec for c in "*?[") or (path.is_dir() and any(path.glob("*.tar"))):
        return TarSource(spec)
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            raise ValueError(f"{spec}: a directory that is neither a save_to_disk dataset nor holds .tar shards")
        return DiskSource(spec)
    if not path.exists():
        raise ValueError(f"{spec}: no such data file or directory")
    return ManifestSource(spec)


def parse_data_arg(arg: str) -> tuple[str, float]:
    """'PATH' or 'PATH:WEIGHT' -> (path, weight)."""
    path, _, weight = arg.rpartition(":")
    try:
        w = float(weight)
    except ValueError:
        return arg, 1.0
    if not path or w <= 0:
        raise ValueError(f"--data {arg}: the weight after ':' must be a positive number")
    return path, w


class ClipDataset(Dataset):
    """All sources end to end. An item is a dict: the texts, and `pixels` (T, 3, H, W), or `features`
    (T, N, D) when a feature cache is given, or `error` (a message naming the sample)."""

    def __init__(
        self,
        sources: list,
        num_frames: int,
        fps: float | None,
        preprocess: Callable,
        cache: FeatureCache | None = None,
        sampling: str = "centres",
        max_side: int | None = None,
    ):
        self.sources = sources
        self.starts = [0]
        for s in sources:
            self.starts.append(self.starts[-1] + len(s))
        self.num_frames, self.fps, self.sampling, self.max_side = num_frames, fps, sampling, max_side
        self.preprocess = preprocess
        self.cache = cache

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, i: int) -> tuple:
        k = bisect.bisect_right(self.starts, i) - 1
        return self.sources[k], i - self.starts[k]

    def cache_key(self, i: int) -> str:
        source, j = self.locate(i)
        return self.cache.key(source.identity(j))

    def __getitem__(self, i: int) -> dict:
        source, j = self.locate(i)
        try:
            ex = source.example(j)
        except ValueError as e:  # a row whose text fields are wrong (e.g. its negatives): reported, not a crash
            return {"index": i, "name": str(e).partition(":")[0], "error": str(e)}
        item = {"index": i, "name": ex.name, "caption": ex.caption, "question": ex.question, "answer": ex.answer}
        item["negatives"] = ex.negatives
        if (ex.question is None) != (ex.answer is None):
            return item | {"error": f"{ex.name}: a question without its answer or an answer without its question"}
        if ex.caption is None and ex.question is None:
            return item | {"error": f"{ex.name}: no caption and no question/answer"}
        try:
            if self.cache is not None:
                key = self.cache_key(i)
                if key in self.cache:
                    return item | {"features": self.cache.get(key)}
            clip = source.load(j, self.num_frames, self.fps, self.sampling, self.max_side)
            if self.cache is not None:
                return item | {"error": f"{ex.name}: not in the feature cache {self.cache.directory} (changed since it was filled?)"}
            return item | {"pixels": self.preprocess(clip.frames)}
        except ClipError as e:
            return item | {"error": str(e)}


def collate(items: list[dict]) -> dict:
    """Stack the readable items; unreadable ones are listed under `bad` as (name, message).

    Clips shorter than the longest in the batch (an image is a one-frame clip) repeat their last frame.
    """
    good = [it for it in items if "error" not in it]
    batch = {
        "bad": [(it["name"], it["error"]) for it in items if "error" in it],
        "names": [it["name"] for it in good],
        "captions": [it["caption"] for it in good],
        "questions": [it["question"] for it in good],
        "answers": [it["answer"] for it in good],
        "negatives": [it.get("negatives", ()) for it in good],
    }
    if good:
        kind = "features" if "features" in good[0] else "pixels"
        T = max(it[kind].shape[0] for it in good)
        batch[kind] = torch.stack([it[kind][torch.arange(T).clamp(max=len(it[kind]) - 1)] for it in good])
    return batch


class MixedBatchSampler(Sampler):
    """Batches of indices, each batch from one source picked with probability proportional to its weight.

    An epoch has as many batches as the sources fill (sum of ceil(size / batch_size)); with one source it
    is one shuffled pass. The order depends only on (seed, epoch), so a resumed run sees the same batches.
    The caller sets `epoch`; it has no set_epoch on purpose, since accelerate's loaders would call that with
    their own count of passes, which restarts at 0 in a resumed run.
    """

    def __init__(self, sizes: list[int], weights: list[float], batch_size: int, seed: int):
        self.sizes, self.weights = sizes, torch.tensor(weights, dtype=torch.float64)
        self.starts = [sum(sizes[:k]) for k in range(len(sizes))]
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.drop_last = False  # read by accelerate when it shards batches across processes
        self.num_batches = sum(math.ceil(n / batch_size) for n in sizes)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        picks = torch.multinomial(self.weights, self.num_batches, replacement=True, generator=g).tolist()
        if len(self.sizes) == 1:
            picks = [0] * self.num_batches
        queues: list[list[int]] = [[] for _ in self.sizes]
        for k in picks:
            if not queues[k]:
                queues[k] = torch.randperm(self.sizes[k], generator=g).tolist()
            batch, queues[k] = queues[k][: self.batch_size], queues[k][self.batch_size :]
            yield [self.starts[k] + j for j in batch]


class FeatureCache:
    """Frozen vision features on disk, one (T, N, D) tensor per sample, in safetensors shards.

    A sample's key hashes the identity of its source (path, size, mtime, or dataset fingerprint) with
    `spec` (vision encoder, layer, resolution, frames, fps), so changing either makes a new entry rather
    than reading a stale one. Shards are written whole to a temporary name and renamed, so a killed run
    leaves complete shards or none.
    """

    def __init__(self, directory: str | os.PathLike, spec: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.index: dict[str, Path] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the shard headers (other processes may have written shards)."""
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            if shard not in self.index.values():
                with safe_open(str(shard), framework="pt") as f:
                    self.index.update(dict.fromkeys(f.keys(), shard))

    def key(self, identity: str) -> str:
        return hashlib.sha1(f"{self.spec}\n{identity}".encode()).hexdigest()

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.index[key]), framework="pt") as f:
            return f.get_tensor(key)

    def write(self, features: dict[str, torch.Tensor]) -> None:
        name = hashlib.sha1("".join(sorted(features)).encode()).hexdigest()[:16]
        final = self.directory / f"shard-{name}.safetensors"
        tmp = self.directory / f".tmp-{name}-{os.getpid()}"
        save_file({k: v.contiguous().cpu() for k, v in features.items()}, str(tmp))
        os.replace(tmp, final)
        self.index.update(dict.fromkeys(features, final))


@torch.no_grad()
def fill_cache(
    dataset: ClipDataset,
    encode: Callable[[torch.Tensor], torch.Tensor],
    cache: FeatureCache,
    indices: list[int],
    batch_size: int,
    num_workers: int,
    shard_size: int = 512,
    device: torch.device | str = "cpu",
) -> int:
    """Encode the samples at `indices` that the cache lacks; returns how many were added.

    encode: (n, 3, H, W) pixels -> (n, N, D) features. Frames of several samples are encoded together
    (clips of different lengths and images alike). Unreadable samples are left out; training reports them.
    """
    raw = ClipDataset(
        dataset.sources, dataset.num_frames, dataset.fps, dataset.preprocess, sampling=dataset.sampling, max_side=dataset.max_side
    )
    todo, seen = [], set()
    for i in indices:
        try:
            key = dataset.cache_key(i)
        except ClipError:
            continue  # unreadable: training names it
        # Many rows share one clip (several questions about it): encode each clip once.
        if key not in cache and key not in seen:
            seen.add(key)
            todo.append(i)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(raw, todo), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    pending: dict[str, torch.Tensor] = {}
    added = 0
    progress = tqdm(total=len(todo), desc="caching frozen features", unit="clip", disable=not todo)
    for items in loader:
        progress.update(len(items))
        items = [it for it in items if "error" not in it]
        if not items:
            continue
        frames = torch.cat([it["pixels"] for it in items]).to(device)  # (sum T, 3, H, W)
        feats = torch.cat([encode(chunk) for chunk in frames.split(batch_size * 4)]).float().cpu()  # (sum T, N, D)
        for it, f in zip(items, feats.split([len(it["pixels"]) for it in items])):
            pending[dataset.cache_key(it["index"])] = f.clone()
        if len(pending) >= shard_size:
            cache.write(pending)
            added, pending = added + len(pending), {}
    if pending:
        cache.write(pending)
        added += len(pending)
    progress.close()
    return added
