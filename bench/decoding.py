"""Greedy decoding of a frozen LLM on this CPU, several ways, on the same inputs: what makes captioning fast.

For each LLM: transformers' generate with its dynamic KV cache (as a user calls it), with its static cache,
with the static cache and a torch.compile'd forward, and the same three after LanguageModel.lay_out_for_decoding
(the frozen weights column-major, as a loaded bridge has them); each at --rows and 4x --rows rows a call.
Prints ms per clip (prefill of --prompt-len positions + --new-tokens steps), and whether the tokens are
those of the first way; first, the matrix product underneath with both layouts.

    python -m bench.decoding [--rows 8] [--new-tokens 32] [--prompt-len 48] [--repeats 3] [--compile] [--llm smollm2-135m-instruct]

--llm blip2-opt is the small random OPT of bench.recaption_speed's BLIP-2. --compile adds the compiled
ways (each first call compiles, which is reported apart: tens of seconds).
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from transformers import CompileConfig

from adapters.llm import LanguageModel, load_llm
from bench.recaption_speed import timed, tiny_blip2


def blip2_opt() -> LanguageModel:
    # The whole small BLIP-2 is built, though only its OPT runs here: drawn from the same seed in the same order,
    # the OPT has the weights that bench.recaption_speed's BLIP-2 decodes with.
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = tiny_blip2(Path(tmp))
    return LanguageModel(model.language_model, processor.tokenizer, "blip2-opt", verbatim=True)


def ways(with_compile: bool) -> dict[str, dict]:
    """generate's keyword arguments of each way."""
    compiled = CompileConfig(fullgraph=False, dynamic=False)
    compiled._compile_all_devices = True  # transformers compiles on accelerators only unless told
    found = {"dynamic cache": {}, "static cache": {"cache_implementation": "static"}}
    if with_compile:
        found["static cache + torch.compile"] = {"cache_implementation": "static", "compile_config": compiled}
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", default="smollm2-135m-instruct", help="an LLM load_llm takes, or blip2-opt")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="add the static cache with a compiled forward")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")

    sgemm(args.repeats)
    row_major = blip2_opt() if args.llm == "blip2-opt" else load_llm(args.llm)
    column_major = copy.deepcopy(row_major).lay_out_for_decoding()
    torch.manual_seed(0)
    width = row_major.width
    print(f"{args.llm}: {args.prompt_len} prompt positions, {args.new_tokens} new tokens, greedy")
    reference = {}
    for rows in (args.rows, 4 * args.rows):
        embeds = torch.randn(rows, args.prompt_len, width) * row_major.embed(torch.arange(8)).std()
        mask = torch.ones(rows, args.prompt_len, dtype=torch.long)
        for layout, llm in (("row-major", row_major), ("column-major", column_major)):
            for name, kwargs in ways(args.compile).items():
                run = partial(llm.generate, embeds, mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kwargs)
                with torch.inference_mode():
                    first, ids = timed(run)  # the first call: allocations, and compilation when asked
                    best = min(timed(run)[0] for _ in range(args.repeats))
                reference.setdefault(rows, ids)
                print(
                    f"  {rows:3d} rows, {layout:12s} {name:29s} {1000 * best / rows:7.1f} ms a clip   "
                    f"first call {first:6.1f} s   same tokens: {torch.equal(ids, reference[rows])}"
                )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


def sgemm(repeats: int) -> None:
    """The kernel underneath: 8 rows by a 2048x512 weight (an MLP's), the weight row-major and column-major."""
    torch.manual_seed(0)
    x, w = torch.randn(8, 512), torch.randn(2048, 512)
    for name, weight in (("row-major", w), ("column-major", w.t().contiguous().t())):  # the same values and shape
        run = partial(_products, x, weight, 200)
        run()
        print(f"8 rows x a 2048x512 weight, {name:12s}: {min(timed(run)[0] for _ in range(repeats)) / 200 * 1e6:6.0f} us")


def _products(x, weight, times: int) -> None:
    for _ in range(times):
        torch.nn.functional.linear(x, weight)


if __name__ == "__main__":
    main()
