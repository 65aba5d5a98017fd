"""Building bridges: a new one over any pair of backbones, or one that starts from a trained bridge.

    new_bridge(BridgeConfig(...), qformer_init="minilm")   a new Q-Former (BERT weights, or random) between
                                                           the config's frozen backbones
    from_bridge("runs/stage1", llm="gemma3-270m")          a trained bridge carried over, with changes: another
                                                           LLM (re-bridging: a fresh projection), cross-attention
                                                           in more layers (grown), another resolution, LoRA, ...

Every size a backbone decides is read from the backbone (the encoder's width, the LLM's width, the BERT's
layers), so a caller states only choices; every choice defaults to the config dataclasses.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch import nn

from adapters.llm import load_llm
from adapters.offline import minilm_dir
from adapters.vision import load_vision

from .bridge import Bridge, read_source
from .config import BridgeConfig
from .convert import load_bert_into_qformer, qformer_config_from_bert

# The one Q-Former initialisation that ships offline: the BERT-style MiniLM-L6 (BLIP-2 starts from BERT).
MINILM = "minilm"


def new_bridge(config: BridgeConfig | None = None, qformer_init: str | None = MINILM, llm_kwargs: dict | None = None) -> Bridge:
    """A bridge with a new Q-Former between `config`'s frozen backbones.

    qformer_init: "minilm" (the offline MiniLM-L6), a BERT-style checkpoint directory or hub id, whose
    architecture and weights the Q-Former takes (and whose tokenizer it reads text with); None for a
    random Q-Former of config.qformer's own sizes. The choices in config.qformer (queries, cross-attention
    frequency, tubelets, stage-1 heads) are kept; the vision width comes from the encoder and, since a
    CNN's feature map does not say where a token is, such encoders get grid positions. llm_kwargs: how
    load_llm loads the frozen LLM on this machine (llm_loading), kept out of the config.
    """
    config = config or BridgeConfig()
    vision = load_vision(config.vision, config.vision_layer, config.vision_resolution)
    llm = load_llm(config.llm, lora=config.lora, **(llm_kwargs or {}))
    bert = minilm_dir() if qformer_init == MINILM else qformer_init
    q = config.qformer
    if bert is not None:
        from transformers import AutoConfig

        q = qformer_config_from_bert(AutoConfig.from_pretrained(bert), q)
    q = replace(q, vision_width=vision.width, grid_positions=not getattr(vision, "encodes_position", True))
    tokenizer = config.qformer_tokenizer or (qformer_init if bert is not None else None)
    config = replace(config, qformer=q, llm_width=llm.width, qformer_tokenizer=tokenizer)
    bridge = Bridge(config, vision, llm)
    if bert is not None:
        load_bert_into_qformer(bridge.qformer, bert)
    return bridge


# Fields of a trained bridge that a new start may not change: its Q-Former learnt to read exactly these.
_FIXED = {"vision": "the encoder", "vision_layer": "the encoder layer"}
# What of a trained Q-Former's config may change: the rest (sizes, queries, tubelets) would not fit its weights.
_CHANGEABLE = {"cross_attention_every", "stage1_heads", "dropout", "attention_rank"}


def from_bridge(source: str | Path, qformer: dict | None = None, llm_kwargs: dict | None = None, **changes) -> Bridge:
    """A bridge that starts from the trained bridge directory `source`, or from a transformers BLIP-2 or
    InstructBLIP (-Video) checkpoint directory (read_source), with `changes` to its config.

    changes: fields of BridgeConfig; qformer: fields of its QFormerConfig (cross_attention_every,
    stage1_heads); llm_kwargs as in new_bridge. What carries over is every trained weight that still fits:
    - another `llm` re-bridges: the Q-Former is kept and the projection into the new LLM starts fresh
      (its LoRA adapters too, which belong to their LLM);
    - another `cross_attention_every` grows (or thins) the Q-Former's cross-attention (grown_cross_attention);
    - another `attention_rank` merges the source's low-rank attention updates into their weights, or starts
      fresh ones (fitted_attention_updates);
    - another `vision_resolution` gives a finer token grid of the same encoder, whose grid positions go on
      counting on the grid they were learnt on (QFormerConfig.grid_side);
    - another `lora` (rank, modules) starts fresh adapters.
    The encoder, its layer and the Q-Former's sizes, queries and tubelets cannot change (ValueError): the
    trained weights read those features, in that shape.
    """
    d = Path(source)
    base, state = read_source(d)
    unknown = set(changes) - {f.name for f in fields(BridgeConfig)} - {"qformer"}
    if unknown:
        raise ValueError(f"unknown bridge config fields {sorted(unknown)}")
    for name, what in _FIXED.items():
        if name in changes and changes[name] != getattr(base, name):
            raise ValueError(f"{name} {changes[name]!r}: the Q-Former in {d} was trained on {what} {getattr(base, name)!r}")
    for name, value in (qformer or {}).items():
        if name not in _CHANGEABLE and value != getattr(base.qformer, name):
            raise ValueError(
                f"{name} {value!r}: the Q-Former in {d} has {getattr(base.qformer, name)!r}, and a trained "
                f"Q-Former keeps it (it can change {', '.join(sorted(_CHANGEABLE))}); start a new one"
            )
    if changes.get("llm", base.llm) != base.llm and not base.caption_prompt:
        # An empty caption prompt is no text, which an LLM reading prompts verbatim (a transformers
        # checkpoint's) makes sense of; another LLM answers in its chat, to the default caption prompt.
        changes.setdefault("caption_prompt", BridgeConfig.caption_prompt)
    config = replace(base, **changes, qformer=replace(base.qformer, **(qformer or {})))
    vision = load_vision(config.vision, config.vision_layer, config.vision_resolution)
    llm = load_llm(config.llm, lora=config.lora, **(llm_kwargs or {}))
    q = config.qformer
    if q.grid_positions and not q.grid_side and config.vision_resolution != base.vision_resolution:
        # Another resolution, another token grid: positions keep counting on the grid they were learnt on,
        # so each token of the new grid is placed where it lies on the old one.
        before = load_vision(base.vision, base.vision_layer, base.vision_resolution)
        q = replace(q, grid_side=math.isqrt(before.num_tokens))
    config = replace(config, qformer=q, llm_width=llm.width)
    bridge = Bridge(config, vision, llm)

    # Re-bridging: the projection into another LLM starts fresh; everything else carries over.
    same_llm = config.llm == base.llm and config.llm_width == base.llm_width
    parts = {"qformer": bridge.qformer, "heads": bridge.heads, "projection": bridge.projection if same_llm else None}
    for name, module in parts.items():
        weights = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        if name == "qformer":
            weights = fitted_attention_updates(grown_cross_attention(weights, module), module)
        if module is not None and weights:
            module.load_state_dict(weights)
    # LoRA adapters belong to their LLM: kept when it and the adapter shape stay, else they start fresh.
    lora = {k: v for k, v in state.items() if k.startswith("llm.")}
    if lora and same_llm and config.lora == base.lora:
        params = dict(bridge.named_parameters())
        with torch.no_grad():
            for k, v in lora.items():
                params[k].copy_(v)
    return bridge


def fitted_attention_updates(state: dict[str, torch.Tensor], qformer: nn.Module) -> dict[str, torch.Tensor]:
    """Q-Former weights fitted to `qformer`'s low-rank attention updates (QFormerConfig.attention_rank). An
    update the weights hold that `qformer` has not, or of another rank, is merged into its weight (W + B A):
    what it learnt is kept. An update `qformer` has that the weights do not starts as `qformer` drew it,
    with B at zero, so the Q-Former computes what the weights say."""
    state, own = dict(state), qformer.state_dict()
    for a_name in [k for k in state if k.endswith(".lora_a")]:
        name = a_name.removesuffix(".lora_a")
        if own.get(a_name) is None or own[a_name].shape != state[a_name].shape:
            a, b = state.pop(a_name), state.pop(name + ".lora_b")
            state[name + ".weight"] = state[name + ".weight"] + (b.float() @ a.float()).to(state[name + ".weight"].dtype)
    for k, v in own.items():
        if k.endswith((".lora_a", ".lora_b")) and k not in state:
            state[k] = v
    return state


def grown_cross_attention(state: dict[str, torch.Tensor], qformer: nn.Module) -> dict[str, torch.Tensor]:
    """Q-Former weights fitted to `qformer`'s cross-attention layers, which may be more or fewer than the
    weights have: a dropped layer's weights go; a new layer starts from the nearest earlier trained one,
    which already reads these vision tokens, but with its output projection at zero, so that at first it
    adds no attention. Its LayerNorm takes the weights of the self-attention's before it, whose output it
    now normalises again: post-LN, so not quite the identity, but the trained bridge barely moves
    (demos/bridge/HISTORY.md, the grown trial)."""
    state = dict(state)
    trained = [i for i in range(len(qformer.layers)) if f"layers.{i}.cross_attn.query.weight" in state]
    for i, layer in enumerate(qformer.layers):
        prefix = f"layers.{i}.cross_attn."
        if layer.cross_attn is None:
            for k in [k for k in state if k.startswith(prefix)]:
                del state[k]
        elif i not in trained:
            source = max((j for j in trained if j < i), default=min(trained))
            for name in layer.cross_attn.state_dict():
                state[prefix + name] = state[f"layers.{source}.cross_attn.{name}"].clone()
            for name in ("weight", "bias"):
                state[prefix + "out." + name] = torch.zeros_like(state[prefix + "out." + name])
                state[prefix + "norm." + name] = state[f"layers.{i}.self_attn.norm.{name}"].clone()
    return state


def add_quantization_arguments(parser) -> None:
    """--load-in-4bit / --load-in-8bit, for every command that loads a bridge's LLM (read with llm_loading)."""
    group = parser.add_mutually_exclusive_group()
    for bits in (4, 8):
        group.add_argument(
            f"--load-in-{bits}bit",
            action="store_true",
            help=f"load the frozen LLM quantised to {bits} bits (bitsandbytes, CUDA GPUs); the bridge is unchanged",
        )


def llm_loading(load_in_4bit: bool = False, load_in_8bit: bool = False) -> dict:
    """load_llm's keyword arguments for these choices: how this machine holds the frozen LLM, not what the
    bridge is, so no bridge config records them (the same bridge loads unquantised elsewhere)."""
    if not (load_in_4bit or load_in_8bit):
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)}
