"""Keep the captions that fit their clips (BLIP's CapFilt): the records of a recaption output whose `match`
score, the scorer's probability that the caption describes its clip, is at least a threshold.

A record without a score (an error record, or one written by a bridge without a scorer or before records
carried `match`) is never kept: nothing says its caption fits.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from . import recaption as rc


@dataclass
class Filtered:
    kept: list[dict]
    dropped: int  # records not kept, unscored ones included
    unscored: int  # records without a match score

    def line(self, min_match: float) -> str:
        return f"kept {len(self.kept)}, dropped {self.dropped} ({self.unscored} without a match score) at --min-match {min_match:g}"


def filter_records(path: str, min_match: float) -> Filtered:
    """The records of the recaption output `path` (JSONL or Parquet) whose match is at least min_match.
    ValueError when the file holds no record or none has a score: filtering it would keep nothing."""
    records = rc.read_records(path)
    scored = [r for r in records if r.get("match") is not None]
    if not scored:
        what = f"none of its {len(records)} records has" if records else "it holds no record, so none has"
        raise ValueError(
            f"{path}: {what} a match score (error records have none, nor records written before match scores); nothing to filter by"
        )
    kept = [r for r in scored if r["match"] >= min_match]
    return Filtered(kept, len(records) - len(kept), len(records) - len(scored))


def write_kept(records: list[dict], source: str, out: str | None) -> None:
    """Write records to out atomically (JSONL, or Parquet for .parquet), or to stdout as JSONL when out is None.
    ValueError when out is the source: the output a rerun of recaption resumes from must stay whole."""
    if out is None:
        sys.stdout.buffer.write(b"".join(rc._encode(r) for r in records))
        sys.stdout.flush()
        return
    if os.path.exists(out) and os.path.samefile(out, source):
        raise ValueError(f"{out}: is the file being filtered; write the kept records to another --out")
    rc._write_atomic(out, records)
