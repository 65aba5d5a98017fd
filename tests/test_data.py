"""Training data: manifest formats, save_to_disk datasets, webdataset shards, mixing, the feature cache."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from qformer.data import ClipDataset, FeatureCache, MixedBatchSampler, collate, open_source, parse_data_arg

ROWS = [
    {"image": "img/a.png", "caption": "a red square"},
    {"image": "img/b.png", "caption": "a blue circle"},
    {"image": "img/c.png", "caption": "a green square"},
]


def _png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 10, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _preprocess(frames):
    return torch.from_numpy(np.asarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W), no resizing


@pytest.fixture
def images(tmp_path):
    (tmp_path / "img").mkdir()
    for i, name in enumerate("abc"):
        (tmp_path / "img" / f"{name}.png").write_bytes(_png_bytes(40 * i))
    return tmp_path


def _write(root, fmt, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / f"manifest.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifests_read_alike_with_paths_relative_to_the_manifest(images, fmt, monkeypatch):
    monkeypatch.chdir("/")  # relative to the manifest, not to the working directory
    ds = ClipDataset([open_source(_write(images, fmt, ROWS))], 4, None, _preprocess)
    assert len(ds) == 3
    item = ds[1]
    assert item["caption"] == "a blue circle" and item["name"] == str(images / "img" / "b.png")
    assert item["pixels"].shape == (1, 3, 8, 10) and item["pixels"].max() == 40


def test_missing_columns_are_named_before_any_decoding(images):
    path = _write(images, "jsonl", [{"picture": "img/a.png", "caption": "x"}])
    with pytest.raises(ValueError, match=r"needs an 'image' or 'video' column .* it has columns \['caption', 'picture'\]"):
        open_source(path)
    path = _write(images, "csv", [{"image": "img/a.png", "question": "what ?"}])
    with pytest.raises(ValueError, match="a 'caption' column, or 'question' and 'answer' columns"):
        open_source(path)
    with pytest.raises(ValueError, match="unknown manifest type '.txt'"):
        (images / "m.txt").write_text("x")
        open_source(str(images / "m.txt"))


def test_an_unreadable_sample_is_an_error_item_naming_it(images):
    (images / "img" / "b.png").write_bytes(b"not an image at all")
    ds = ClipDataset([open_source(_write(images, "jsonl", ROWS + [{"image": "img/gone.png", "caption": "x"}]))], 4, None, _preprocess)
    batch = collate([ds[i] for i in range(4)])
    assert batch["names"] == [str(images / "img" / n) for n in ("a.png", "c.png")]
    assert [name for name, _ in batch["bad"]] == [str(images / "img" / n) for n in ("b.png", "gone.png")]
    assert "no such file" in batch["bad"][1][1]
    assert batch["pixels"].shape == (2, 1, 3, 8, 10)


def test_a_question_row_may_hold_its_clip_s_caption_but_not_half_a_question(images):
    rows = [
        {"image": "img/a.png", "caption": "a red square", "question": "what color is it ?", "answer": "red"},
        {"image": "img/b.png", "caption": "a blue circle", "question": "what color is it ?"},
        {"image": "img/c.png", "caption": "a green square", "answer": "green"},
    ]
    ds = ClipDataset([open_source(_write(images, "jsonl", rows))], 4, None, _preprocess)
    batch = collate([ds[i] for i in range(3)])
    assert (batch["captions"], batch["questions"], batch["answers"]) == (["a red square"], ["what color is it ?"], ["red"])
    assert [m for _, m in batch["bad"]] == [
        f"{images / 'img' / n}: a question without its answer or an answer without its question" for n in ("b.png", "c.png")
    ]


def test_save_to_disk_datasets_with_image_features_and_questions(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(np.full((6, 6, 3), v, np.uint8)) for v in (10, 200)],
            "question": ["what color ?"] * 2,
            "answer": ["black", "white"],
        },
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}),
    )
    ds.save_to_disk(tmp_path / "vqa")
    data = ClipDataset([open_source(str(tmp_path / "vqa"))], 4, None, _preprocess)
    item = data[1]
    assert (item["question"], item["answer"], item["caption"]) == ("what color ?", "white", None)
    assert item["pixels"].shape == (1, 3, 6, 6) and item["pixels"].min() == 200
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "dict")
    with pytest.raises(ValueError, match="pass one split's directory"):
        open_source(str(tmp_path / "dict"))


def test_webdataset_shards_are_indexed_and_read_by_offset(tmp_path):
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s}.tar", "w") as tar:
            for k in range(3):
                key = f"s{s}/{k:04d}"
                add(tar, f"{key}.png", _png_bytes(10 * (3 * s + k)))
                if k == 2:
                    add(tar, f"{key}.json", json.dumps({"question": "what ?", "answer": f"n{k}"}).encode())
                else:
                    add(tar, f"{key}.txt", f"caption {s} {k}".encode())
            add(tar, "s9/broken.jpg", b"\xff\xd8 truncated jpeg")
            add(tar, "s9/broken.txt", b"never readable")
    source = open_source(str(tmp_path))
    ds = ClipDataset([source], 4, None, _preprocess)
    assert len(ds) == 8
    items = [ds[i] for i in range(8)]
    good = [it for it in items if "error" not in it]
    assert [it["caption"] for it in good if it["caption"]] == ["caption 0 0", "caption 0 1", "caption 1 0", "caption 1 1"]
    assert [(it["question"], it["answer"]) for it in good if it["question"]] == [("what ?", "n2")] * 2
    assert [int(it["pixels"].max()) for it in good] == [0, 10, 20, 30, 40, 50]
    bad = [it for it in items if "error" in it]
    assert len(bad) == 2 and all(it["error"].startswith(f"{tmp_path / f'shard-{s}.tar'}:s9/broken") for s, it in enumerate(bad))
    # A glob of shards is a source too.
    assert len(open_source(str(tmp_path / "shard-1.tar"))) == 4


def test_clips_of_different_lengths_share_a_batch_by_repeating_their_last_frame():
    items = [
        {"name": "a", "caption": "x", "question": None, "answer": None, "pixels": torch.arange(3.0).view(3, 1, 1, 1)},
        {"name": "b", "caption": "y", "question": None, "answer": None, "pixels": torch.full((1, 1, 1, 1), 7.0)},
    ]
    batch = collate(items)
    assert batch["pixels"].flatten(1).tolist() == [[0, 1, 2], [7, 7, 7]]


def test_mixing_follows_the_weights_one_source_per_batch_and_depends_only_on_seed_and_epoch():
    sampler = MixedBatchSampler([100, 300], [3.0, 1.0], batch_size=4, seed=0)
    assert len(sampler) == 25 + 75
    counts = Counter()
    for epoch in range(20):
        sampler.epoch = epoch
        for batch in sampler:
            sources = {i >= 100 for i in batch}
            assert len(sources) == 1 and len(batch) <= 4
            counts[sources.pop()] += 1
    assert counts[False] / sum(counts.values()) == pytest.approx(0.75, abs=0.03)
    sampler.epoch = 3
    first = list(sampler)
    sampler.epoch = 4
    assert list(sampler) != first
    sampler.epoch = 3
    assert list(sampler) == first
    # One source: each epoch is one shuffled pass over it.
    single = MixedBatchSampler([10], [1.0], batch_size=4, seed=1)
    flat = [i for b in single for i in b]
    assert sorted(flat) == list(range(10)) and [len(b) for b in single] == [4, 4, 2]


def test_data_weights_parse():
    assert parse_data_arg("a/b.jsonl") == ("a/b.jsonl", 1.0)
    assert parse_data_arg("a/b.jsonl:2.5") == ("a/b.jsonl", 2.5)
    with pytest.raises(ValueError, match="positive number"):
        parse_data_arg("a/b.jsonl:0")


def test_feature_cache_keys_follow_content_and_spec_and_shards_are_atomic(images, tmp_path):
    source = open_source(_write(images, "jsonl", ROWS))
    cache = FeatureCache(tmp_path / "cache", "enc-a|res=32")
    ds = ClipDataset([source], 4, None, _preprocess, cache)
    key = ds.cache_key(0)
    assert FeatureCache(tmp_path / "other", "enc-b|res=32").key(source.identity(0)) != key  # another encoder
    # The same files reached through a symlinked folder are the same samples.
    (tmp_path / "linked").symlink_to(images, target_is_directory=True)
    linked = open_source(str(tmp_path / "linked" / "manifest.jsonl"))
    assert cache.key(linked.identity(0)) == key
    cache.write({key: torch.ones(1, 2, 3)})
    assert sorted(p.name.startswith("shard-") for p in (tmp_path / "cache").iterdir()) == [True]
    assert torch.equal(ds[0]["features"], torch.ones(1, 2, 3))
    # Another process's shards appear after refresh; a temporary file of a killed writer is ignored.
    other = FeatureCache(tmp_path / "cache", "enc-a|res=32")
    other.write({ds.cache_key(1): torch.zeros(1, 2, 3)})
    (tmp_path / "cache" / ".tmp-deadbeef-123").write_bytes(b"half a shard")
    assert ds.cache_key(1) not in cache
    cache.refresh()
    assert ds.cache_key(1) in cache and len(cache) == 2
    # Touching the file changes its identity: the stale entry is not used.
    st = os.stat(images / "img" / "a.png")
    os.utime(images / "img" / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ds.cache_key(0) != key
    assert "not in the feature cache" in ds[0]["error"]
