"""bench.decoding: every way of decoding it compares gives the tokens transformers' generate gives."""

from __future__ import annotations

import pytest

from bench import decoding


@pytest.mark.slow
def test_every_way_and_layout_decodes_the_same_tokens(capsys):
    decoding.main(["--llm", "blip2-opt", "--rows", "2", "--new-tokens", "3", "--prompt-len", "5", "--repeats", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "ms a clip" in line]
    assert len(lines) == 8  # 2 and 8 rows x 2 layouts x 2 caches
    assert all(line.endswith("same tokens: True") for line in lines)
