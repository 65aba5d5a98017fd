"""Train a bridge: the Q-Former (and its projection) between a frozen vision encoder and a frozen LLM.

    # Stage 1 (BLIP-2): the Q-Former alone learns ITC + ITM + ITG on captions; no LLM in the loss.
    python train.py --stage 1 --data captions.jsonl --output runs/stage1
    # Stage 2: the projected queries are the visual prompt in the LLM's chat; loss on the answers only.
    python train.py --stage 2 --init-from runs/stage1 --data captions.jsonl --data vqa.parquet:2 --output runs/stage2
    # Instructed (InstructBLIP): the question also enters the Q-Former.
    python train.py --stage 2 --instruct --init-from runs/stage2 --data vqa.parquet --output runs/vqa
    # Re-bridging: a trained Q-Former gives a new LLM eyes; first the new projection alone, then both.
    python train.py --stage 2 --init-from runs/vqa --llm gemma3-270m --train projection --data ... --output runs/gemma-p
    python train.py --stage 2 --init-from runs/gemma-p --data ... --output runs/gemma

Every device concern goes through Accelerate: `accelerate launch [--num_processes N] train.py ...` for
DDP, FSDP or DeepSpeed (accelerate config). Several processes on CPUs alone (gloo):
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train.py ...
(`accelerate launch --cpu` starts one process unless MPI is installed.) `--resume` continues a killed run
from its last checkpoint with exactly the batches it had not seen.

The output directory is a bridge (Bridge.from_pretrained), plus metrics.jsonl (every step),
bad_samples.jsonl, checkpoints/ (trainable weights, optimizer, scheduler, RNG) and tensorboard/.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, is_tensorboard_available, set_seed
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from tqdm.auto import tqdm
from transformers import AutoConfig, get_cosine_schedule_with_warmup

from adapters.llm import load_llm
from adapters.vision import load_vision
from qformer import Bridge, BridgeConfig, QFormerConfig
from qformer.config import LoraConfig
from qformer.bridge import CONFIG_NAME, read_bridge_dir
from qformer.convert import load_bert_into_qformer
from qformer.data import ClipDataset, FeatureCache, MixedBatchSampler, collate, fill_cache, open_source, parse_data_arg
from qformer.losses import Stage1Objective
from qformer.model import count_parameters
from qformer.resume import check_checkpoint, check_rng_restored


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", required=True, choices=["1", "2"], help="1: ITC+ITM+ITG, no LLM; 2: generative, through the frozen LLM")
    p.add_argument("--data", action="append", required=True, metavar="PATH[:WEIGHT]",
                   help="a manifest (.jsonl/.csv/.parquet), a save_to_disk directory or .tar shards; repeat to mix, weighted")
    p.add_argument("--eval-data", action="append", default=[], metavar="PATH")
    p.add_argument("--output", required=True, help="the trained bridge, checkpoints and logs go here")
    # The bridge: a new one, or one to continue from (which may be re-bridged to another LLM).
    p.add_argument("--init-from", help="a bridge directory to start from; with --llm of another model, re-bridge it")
    p.add_argument("--vision", default=None, help="vision encoder spec (default efficientnet-lite0, or the --init-from bridge's)")
    p.add_argument("--vision-resolution", type=int, default=None, help="input size; 128 is ~4x cheaper than 224 for EfficientNet-Lite0")
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="system message of every chat ('' drops the template's default, e.g. SmolLM2's 20 tokens); "
                        "default: the template's own, or the --init-from bridge's")
    p.add_argument("--vision-layer", type=int, default=None,
                   help="features from this layer (HF models: hidden_states index, -2 = second-to-last; "
                        "efficientnet-lite0: MBConv block, 10 = 112 wide at stride 16); default: the last")
    p.add_argument("--llm", default=None, help="LLM spec (default smollm2-135m-instruct, or the --init-from bridge's)")
    p.add_argument("--qformer-init", default="minilm", help="new Q-Former: 'minilm' (offline MiniLM), a BERT directory, or 'random'")
    p.add_argument("--qformer-tokenizer", default=None, help="Q-Former tokenizer (default: the --qformer-init BERT's)")
    p.add_argument("--num-queries", type=int, default=32)
    p.add_argument("--cross-attention-every", type=int, default=None, metavar="N",
                   help="the queries cross-attend to the clip in every N-th layer (default 2, as BLIP-2, or the --init-from "
                        "bridge's); 1, every layer, reads more of a clip with several objects (bench/reading.py). Given "
                        "with --init-from, the bridge's Q-Former gains (or loses) cross-attention layers")
    p.add_argument("--num-frames", type=int, default=None, help="frames per clip (default 4, or the --init-from bridge's)")
    p.add_argument("--tubelets", action="store_true",
                   help="new Q-Former: each place of the frame grid is one token over all --num-frames frames, so tokens "
                        "carry motion (an --init-from bridge keeps its own choice)")
    p.add_argument("--fps", type=float, default=None, help="sample clips at this rate, at most --num-frames frames")
    p.add_argument("--instruct", action="store_true", help="InstructBLIP: the question also enters the Q-Former (stage 2)")
    p.add_argument("--caption-first", action="store_true",
                   help="stage 2: a question row's 'caption' (its clip's) goes before the question as the chat's first "
                        "turn (rows without one train as plain questions), and the bridge answers that way: its own "
                        "caption first, then the answer")
    p.add_argument("--stage1-losses", default=None, metavar="NAMES",
                   help="stage 1: the losses trained on, comma-separated (default itc,itm,itg). ITC aligns the queries with "
                        "the text encoder's sentence feature, so what that feature ignores the queries learn to drop")
    p.add_argument("--train", choices=["all", "projection"], default="all", help="'projection': only the projection learns")
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="stage 2: also train LoRA adapters of this rank on the LLM (on --lora-modules); the LLM's own "
                        "weights stay frozen (default: none, or the --init-from bridge's)")
    p.add_argument("--lora-modules", default=None, metavar="NAMES",
                   help="with --lora: the LLM's modules to adapt, comma-separated, or all-linear for every linear layer "
                        "but the output head (default: q_proj,v_proj)")
    # Optimisation.
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    p.add_argument("--max-text-len", type=int, default=64, help="Q-Former text tokens (stage 1)")
    p.add_argument("--max-answer-tokens", type=int, default=64, help="LLM tokens of an answer or caption (stage 2)")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto", help="auto: bf16/fp16 on GPUs, fp32 on the CPU; bf16 pays on CPUs with AVX512-BF16 or AMX")
    p.add_argument("--seed", type=int, default=0)
    # Data handling.
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader processes that decode clips")
    p.add_argument("--cache-features", metavar="DIR", help="compute frozen vision features once into DIR and train from them")
    p.add_argument("--max-bad-fraction", type=float, default=0.01, help="stop when more than this share of samples is unreadable")
    # Checkpoints, evaluation, logs.
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps (and at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", nargs="?", const="latest", help="continue from a checkpoint directory, or the latest one in --output")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10, help="tensorboard and progress bar; metrics.jsonl gets every step")
    p.add_argument("--log-with", choices=["tensorboard", "none"], default="tensorboard")
    return p.parse_args(argv)


@dataclass
class Progress:
    """Where the run is; saved with each checkpoint so a resumed run sees exactly the batches still due."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # per-process batches of the current epoch already consumed
    bad_samples: list[str] = field(default_factory=list)  # each unreadable training sample once, by name


class TrainStep(nn.Module):
    """What accelerate wraps: the bridge, and a forward that returns this stage's losses.

    The frozen encoder runs inside it only when no features are given (no cache), under no_grad.
    """

    def __init__(self, bridge: Bridge, stage: int, stage1_losses=Stage1Objective.LOSSES):
        super().__init__()
        self.bridge = bridge
        self.stage1 = Stage1Objective(bridge.qformer, bridge.heads, losses=stage1_losses) if stage == 1 else None

    def forward(self, features=None, pixels=None, text=None, generator=None) -> dict[str, torch.Tensor]:
        if features is None:
            with torch.no_grad():
                features = self.bridge.frame_features(pixels)  # (B, T, N, Dv)
        if self.stage1 is not None:
            return self.stage1(features, text["input_ids"], text["attention_mask"], generator)
        return {"loss": self.bridge(features=features, return_logits=False, **text).loss}


def fail(message: str):
    """A configuration error: said before any compute, with what to change."""
    raise SystemExit(f"train.py: error: {message}")


# ---- building the bridge ---------------------------------------------------------------------------


def stage1_losses(names: str | None) -> tuple[str, ...]:
    if names is None:
        return Stage1Objective.LOSSES
    chosen = tuple(n.strip() for n in names.split(",") if n.strip())
    if not chosen or set(chosen) - set(Stage1Objective.LOSSES):
        fail(f"--stage1-losses {names!r}: choose among {', '.join(Stage1Objective.LOSSES)}, comma-separated")
    return chosen


def lora_modules(names: str | None) -> list[str] | str:
    if names is None:
        return LoraConfig().target_modules
    return names if names == "all-linear" else [n.strip() for n in names.split(",") if n.strip()]


def grown_cross_attention(state: dict[str, torch.Tensor], qformer: nn.Module) -> dict[str, torch.Tensor]:
    """Q-Former weights fitted to `qformer`'s cross-attention layers, which may be more or fewer than the
    weights have (--cross-attention-every with --init-from): a dropped layer's weights go; a new layer
    starts from the nearest earlier trained one, which already reads these vision tokens, but with its
    output projection at zero, so that at first it adds no attention. Its LayerNorm takes the weights of
    the self-attention's before it, whose output it now normalises again: post-LN, so not quite the
    identity, but the trained bridge barely moves (demos/bridge/README.md, the grown trial)."""
    state = dict(state)
    has = lambda i: f"layers.{i}.cross_attn.query.weight" in state  # noqa: E731
    trained = [i for i in range(len(qformer.layers)) if has(i)]
    for i, layer in enumerate(qformer.layers):
        prefix = f"layers.{i}.cross_attn."
        if layer.cross_attn is None:
            for k in [k for k in state if k.startswith(prefix)]:
                del state[k]
        elif not has(i):
            source = max((j for j in trained if j < i), default=min(trained))
            for name, v in layer.cross_attn.state_dict().items():
                state[prefix + name] = state[f"layers.{source}.cross_attn.{name}"].clone()
            for name in ("weight", "bias"):
                state[prefix + "out." + name] = torch.zeros_like(state[prefix + "out." + name])
                state[prefix + "norm." + name] = state[f"layers.{i}.self_attn.norm.{name}"].clone()
    return state


def build_bridge(args) -> Bridge:
    stage = int(args.stage)
    new_lora = LoraConfig(r=args.lora, alpha=2 * args.lora, target_modules=lora_modules(args.lora_modules)) if args.lora else None
    if args.init_from:
        d = Path(args.init_from)
        if not (d / CONFIG_NAME).exists():
            fail(f"--init-from {d}: not a bridge directory (no {CONFIG_NAME})")
        source, state = _checked(lambda: read_bridge_dir(d))
        if args.vision and args.vision != source.vision:
            fail(f"--vision {args.vision}: the Q-Former in {d} was trained on {source.vision} features; drop --vision")
        if args.vision_layer is not None and args.vision_layer != source.vision_layer:
            fail(f"--vision-layer {args.vision_layer}: the Q-Former in {d} was trained on layer {source.vision_layer}; drop --vision-layer")
        resolution = args.vision_resolution or source.vision_resolution
        vision = load_vision(source.vision, source.vision_layer, resolution)
        lora = new_lora or source.lora
        llm = load_llm(args.llm or source.llm, lora=lora)
        if args.tubelets and not source.qformer.tubelet_frames:
            fail(f"--tubelets: the Q-Former in {d} reads frames one by one; tubelets change its input, start a new one")
        qformer_config = replace(source.qformer, stage1_heads=source.qformer.stage1_heads or stage == 1)
        if source.qformer.grid_positions and not source.qformer.grid_side and resolution != source.vision_resolution:
            # Another resolution, another token grid: positions keep counting on the grid they were learnt on,
            # so each token of the new grid is placed where it lies on the old one.
            before = load_vision(source.vision, source.vision_layer, source.vision_resolution)
            qformer_config = replace(qformer_config, grid_side=math.isqrt(before.num_tokens))
        if args.cross_attention_every:
            qformer_config = replace(qformer_config, cross_attention_every=args.cross_attention_every)
        config = replace(
            source, qformer=qformer_config, llm=args.llm or source.llm, llm_width=llm.width,
            vision_resolution=resolution,
            instruct=args.instruct or source.instruct, caption_first=args.caption_first or source.caption_first,
            num_frames=args.num_frames or source.num_frames,
            qformer_tokenizer=args.qformer_tokenizer or source.qformer_tokenizer,
            system_prompt=source.system_prompt if args.system_prompt is None else args.system_prompt, lora=lora,
        )
        bridge = _checked(lambda: Bridge(config, vision, llm))
        same_llm = config.llm == source.llm and config.llm_width == source.llm_width
        for part in ("qformer", "heads", "projection"):
            module = getattr(bridge, part)
            weights = {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
            # Re-bridging: the projection into another LLM starts fresh; everything else carries over.
            if part == "qformer":
                weights = grown_cross_attention(weights, module)
            if module is not None and weights and (part != "projection" or same_llm):
                module.load_state_dict(weights)
        # LoRA adapters belong to their LLM: kept when it and the adapter shape stay, else they start fresh.
        lora_weights = {k: v for k, v in state.items() if k.startswith("llm.")}
        if lora_weights and same_llm and lora == source.lora:
            params = dict(bridge.named_parameters())
            with torch.no_grad():
                for k, v in lora_weights.items():
                    params[k].copy_(v)
        print(f"initialised from {d}" + ("" if same_llm else f"; new projection into {config.llm} ({llm.width} wide)"))
        return bridge

    vision = load_vision(args.vision or "efficientnet-lite0", args.vision_layer, args.vision_resolution)
    llm = load_llm(args.llm or "smollm2-135m-instruct", lora=new_lora)
    bert = None
    if args.qformer_init == "minilm":
        from adapters.offline import minilm_dir

        bert = minilm_dir()
    elif args.qformer_init != "random":
        bert = args.qformer_init
    num_frames = args.num_frames or 4
    # A CNN's feature map does not say where a token is: such encoders get grid positions.
    new_vision_reading = dict(stage1_heads=stage == 1, tubelet_frames=num_frames if args.tubelets else 0,
                              cross_attention_every=args.cross_attention_every or 2,
                              grid_positions=not getattr(vision, "encodes_position", True))
    if bert is not None:
        b = AutoConfig.from_pretrained(bert)
        q = QFormerConfig(
            hidden_size=b.hidden_size, num_layers=b.num_hidden_layers, num_heads=b.num_attention_heads,
            intermediate_size=b.intermediate_size, vocab_size=b.vocab_size, max_text_len=b.max_position_embeddings,
            layer_norm_eps=b.layer_norm_eps, dropout=b.hidden_dropout_prob, hidden_act=b.hidden_act,
            pad_token_id=b.pad_token_id or 0, num_queries=args.num_queries, vision_width=vision.width,
            **new_vision_reading,
        )
    else:
        q = QFormerConfig(num_queries=args.num_queries, vision_width=vision.width, **new_vision_reading)
    config = BridgeConfig(
        qformer=q, vision=args.vision or "efficientnet-lite0", llm=args.llm or "smollm2-135m-instruct",
        vision_layer=args.vision_layer, vision_resolution=args.vision_resolution, llm_width=llm.width, instruct=args.instruct,
        caption_first=args.caption_first,
        qformer_tokenizer=args.qformer_tokenizer or ("minilm" if args.qformer_init == "minilm" else bert),
        num_frames=num_frames, system_prompt=args.system_prompt, lora=new_lora,
    )
    bridge = _checked(lambda: Bridge(config, vision, llm))
    if bert is not None:
        _checked(lambda: load_bert_into_qformer(bridge.qformer, bert))
    return bridge


def _checked(build):
    try:
        return build()
    except ValueError as e:
        fail(str(e))


def choose_trainable(bridge: Bridge, stage: int, train: str) -> None:
    """Exactly what this stage uses and learns gets gradients (DDP also needs every such parameter used)."""
    for part in (bridge.qformer, bridge.projection, bridge.heads):
        if part is not None:
            part.requires_grad_(False)
    # LoRA adapters (if any) learn with everything else in stage 2; stage 1 never runs the LLM.
    for name, p in bridge.llm.named_parameters():
        if "lora_" in name:
            p.requires_grad_(stage == 2 and train == "all")
    if train == "projection":
        bridge.projection.requires_grad_(True)
        return
    bridge.qformer.requires_grad_(True)
    if stage == 1:
        bridge.heads.requires_grad_(True)
        return
    bridge.projection.requires_grad_(True)
    if not bridge.config.instruct:
        # Without an instruction no text enters the Q-Former: its text embeddings and feed-forward idle.
        bridge.qformer.embeddings.word.requires_grad_(False)
        bridge.qformer.embeddings.position.requires_grad_(False)
        for layer in bridge.qformer.layers:
            layer.mlp_text.requires_grad_(False)


# ---- the training run ------------------------------------------------------------------------------


def main(argv=None) -> Bridge:
    args = parse_args(argv)
    stage = int(args.stage)
    out = Path(args.output)

    # 1. Check the configuration before any model is loaded or any sample decoded.
    if stage == 1 and args.train == "projection":
        fail("--train projection is for stage 2 (stage 1 trains the Q-Former without an LLM)")
    if stage == 1 and args.instruct:
        fail("--instruct is for stage 2 (stage 1 already shows the Q-Former the text)")
    if stage == 1 and args.caption_first:
        fail("--caption-first is for stage 2 (stage 1 does not answer questions)")
    if args.lora is not None and (stage == 1 or args.lora < 1):
        fail("--lora RANK is for stage 2 (stage 1 does not run the LLM), with a rank of at least 1")
    if args.stage1_losses is not None and stage != 1:
        fail("--stage1-losses is for stage 1")
    stage1_loss_names = stage1_losses(args.stage1_losses)
    if args.lora_modules is not None and (args.lora is None or not lora_modules(args.lora_modules)):
        fail(f"--lora-modules {args.lora_modules!r}: give module names (or all-linear) together with --lora RANK")
    if args.batch_size < 1 or args.grad_accum < 1:
        fail("--batch-size and --grad-accum must be at least 1")
    if args.cross_attention_every is not None and args.cross_attention_every < 1:
        fail(f"--cross-attention-every {args.cross_attention_every}: give 1 (every layer) or more")
    if not args.resume and latest_checkpoint(out) is not None:
        fail(f"{out} already holds a run's checkpoints: pass --resume to continue it, or choose another --output")
    # The checkpoint to resume from is read whole now, not found damaged once the models are loaded.
    resume_from = latest_checkpoint(out) if args.resume == "latest" else args.resume and Path(args.resume)
    resumed = resume_from and _checked(lambda: check_checkpoint(resume_from, Progress))
    try:
        data = [parse_data_arg(a) for a in args.data]
        sources = [open_source(path) for path, _ in data]
        eval_sources = [open_source(path) for path in args.eval_data]
    except ValueError as e:
        fail(str(e))

    # 2. Accelerate: devices, processes, precision. fp32 on the CPU by default: bf16 is only fast on CPUs
    # with native bf16 matmuls (AVX512-BF16, AMX; the default bridge's retrain uses it there), and
    # exact-resume tests and users' numbers should not depend on which CPU ran them.
    precision = args.mixed_precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "no"
    log_with = "tensorboard" if args.log_with == "tensorboard" and is_tensorboard_available() else None
    accelerator = Accelerator(mixed_precision=precision, log_with=log_with, project_dir=str(out), step_scheduler_with_optimizer=False)
    say = accelerator.print
    if args.log_with == "tensorboard" and log_with is None:
        say("tensorboard is not installed (pip install tensorboard): logging to metrics.jsonl only")
    set_seed(args.seed)

    # 3. The bridge, and what of it trains.
    bridge = build_bridge(args)
    choose_trainable(bridge, stage, args.train)
    qtok = None
    if stage == 1:
        if not bridge.config.qformer_tokenizer:
            fail("stage 1 needs a Q-Former tokenizer: pass --qformer-tokenizer DIR (or --qformer-init minilm/BERT_DIR)")
        qtok = bridge.qformer_tokenizer
        if len(qtok) > bridge.config.qformer.vocab_size:
            fail(f"the Q-Former tokenizer has {len(qtok)} tokens but the Q-Former only {bridge.config.qformer.vocab_size} word embeddings; "
                 "use the tokenizer of the BERT it was initialised from")
    trainable, total = count_parameters(bridge)
    say(f"stage {stage}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%); "
        f"{accelerator.num_processes} processes on {accelerator.device}, mixed precision {precision}")

    # 4. Data: decoded in worker processes, mixed batch by batch; optionally frozen features from a cache.
    cfg = bridge.config
    cache = None
    if args.cache_features:
        # Everything that changes the features is in the key: encoder, layer, resolution, frames, fps.
        spec = f"{cfg.vision}|layer={cfg.vision_layer}|res={cfg.vision_resolution}|frames={cfg.num_frames}|fps={args.fps}"
        cache = FeatureCache(args.cache_features, spec)
    train_set = ClipDataset(sources, cfg.num_frames, args.fps, bridge.vision.preprocess, cache)
    sampler = MixedBatchSampler([len(s) for s in sources], [w for _, w in data], args.batch_size, args.seed)
    loader_kwargs = dict(collate_fn=collate, num_workers=args.num_workers)
    train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_kwargs)
    eval_loader = None
    if eval_sources:
        eval_set = ClipDataset(eval_sources, cfg.num_frames, args.fps, bridge.vision.preprocess, cache)
        eval_loader = DataLoader(eval_set, batch_sampler=BatchSampler(SequentialSampler(eval_set), args.batch_size, False), **loader_kwargs)

    # 5. Optimizer over the trainable parameters only; warmup then cosine decay.
    model = TrainStep(bridge, stage, stage1_loss_names)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    batches_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    scheduler = accelerator.prepare(get_cosine_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps))

    # Checkpoints hold the trainable weights only, never copies of the frozen backbones; with the config
    # beside them each checkpoint is itself a bridge (bench/quality.py --bridge out/checkpoints/step-N).
    def save_trainable_only(models, weights, directory):
        if accelerator.is_main_process:
            bridge.save_pretrained(directory)
        weights.clear()

    def load_trainable_only(models, directory):
        bridge.load_trainable(read_bridge_dir(directory)[1], source=directory)
        models.clear()

    accelerator.register_save_state_pre_hook(save_trainable_only)
    accelerator.register_load_state_pre_hook(load_trainable_only)

    # 6. Frozen-feature cache: each process encodes its share of what is missing, once.
    if cache is not None:
        for dataset in [train_set] + ([eval_loader.dataset] if eval_loader is not None else []):
            mine = list(range(len(dataset)))[accelerator.process_index :: accelerator.num_processes]
            added = fill_cache(dataset, bridge.vision.encode, cache, mine, args.batch_size, args.num_workers, device=accelerator.device)
            say(f"feature cache {cache.directory}: {added} samples encoded by process 0, {len(cache)} cached")
        accelerator.wait_for_everyone()
        cache.refresh()

    # 7. Resume: weights, optimizer, scheduler, RNG states, and the position in the data.
    progress = Progress()
    if args.resume:
        if resume_from is None:
            say(f"no checkpoint in {out / 'checkpoints'}: starting from step 0")
        else:
            _checked(lambda: accelerator.load_state(str(resume_from)))  # weights that do not fit this run's bridge
            _checked(lambda: check_rng_restored(resume_from, accelerator.process_index))
            progress = resumed
            say(f"resumed from {resume_from} at step {progress.step}")
            if accelerator.is_main_process:
                forget_metrics_after(out / "metrics.jsonl", progress.step)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers("tensorboard", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    metrics_file = out / "metrics.jsonl"
    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc=f"stage {stage}")

    # 8. The loop. Gradients accumulate over --grad-accum batches and synchronise across processes on the last.
    model.train()
    sums: dict[str, float] = {}
    eval_bad: list[str] = []
    while progress.step < total_steps:
        sampler.epoch = progress.epoch  # the batch order depends on (seed, epoch) only
        loader = accelerator.skip_first_batches(train_loader, progress.batches_in_epoch) if progress.batches_in_epoch else train_loader
        for batch in loader:
            b = progress.batches_in_epoch
            progress.batches_in_epoch += 1
            group_start = b - b % args.grad_accum
            group_size = min(args.grad_accum, batches_per_epoch - group_start)
            sync = b + 1 == group_start + group_size

            # Unreadable samples: reported by every process, counted over all of them.
            reports = gather_object([(batch["bad"], len(batch["names"]))])
            progress.bad_samples += report_bad(accelerator, out, [item for r, _ in reports for item in r], progress.bad_samples)
            if len(progress.bad_samples) > args.max_bad_fraction * len(train_set):
                raise SystemExit(
                    f"train.py: stopped: {len(progress.bad_samples)} of {len(train_set)} samples are unreadable, more than "
                    f"--max-bad-fraction {args.max_bad_fraction:g}; see {out / 'bad_samples.jsonl'}, fix or remove them"
                )
            # A process with nothing readable would leave the others waiting in DDP; all skip this batch.
            skip = any(n == 0 for _, n in reports)
            if not skip:
                with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                    losses = model(**model_inputs(batch, bridge, stage, qtok, args, accelerator, micro_batch_id(progress, batches_per_epoch)))
                    accelerator.backward(losses["loss"] / group_size)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float().item() / group_size
            if not sync:
                continue

            if skip:
                optimizer.zero_grad()  # grads of this group never synchronised; drop them on every process
            else:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            scheduler.step()
            progress.step += 1
            bar.update(1)

            # Losses averaged over the group's batches and over processes.
            logged = {"step": progress.step, "epoch": progress.epoch, "lr": scheduler.get_last_lr()[0]}
            if sums:
                values = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), "mean")
                logged.update(zip(sums, values.tolist()))
            sums = {}
            log(accelerator, metrics_file, logged, bar, progress.step % args.log_every == 0)
            if eval_loader is not None and (progress.step % args.eval_every == 0 or progress.step == total_steps):
                log(accelerator, metrics_file, {"step": progress.step} | evaluate(model, eval_loader, bridge, stage, qtok, args, accelerator, out, eval_bad), bar, True)
            if progress.step % args.save_every == 0 or progress.step == total_steps:
                save_checkpoint(accelerator, out, progress, args.keep_checkpoints)
            if progress.step >= total_steps:
                break
        else:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()

    # 9. The output directory is a bridge.
    accelerator.wait_for_everyone()
    bridge = accelerator.unwrap_model(model).bridge
    if accelerator.is_main_process:
        bridge.save_pretrained(out)
        say(f"bridge saved to {out}")
    accelerator.end_training()
    return bridge


def micro_batch_id(progress: Progress, batches_per_epoch: int) -> int:
    return progress.epoch * batches_per_epoch + progress.batches_in_epoch


def model_inputs(batch: dict, bridge: Bridge, stage: int, qtok, args, accelerator, batch_id: int) -> dict:
    """The batch's tensors and its texts, tokenised here (fast tokenizers) rather than in the workers."""
    inputs = {"features": batch.get("features"), "pixels": batch.get("pixels")}
    captions, questions, answers = batch["captions"], batch["questions"], batch["answers"]
    if stage == 1:
        # Stage 1 aligns queries with text: a question with its answer, or the caption.
        texts = [c if q is None else f"{q} {a}" for c, q, a in zip(captions, questions, answers)]
        enc = qtok(texts, padding=True, truncation=True, max_length=args.max_text_len, return_tensors="pt")
        inputs["text"] = {k: enc[k].to(accelerator.device) for k in ("input_ids", "attention_mask")}
        # ITM negatives from a generator fixed by the batch, so resuming draws the same ones.
        inputs["generator"] = torch.Generator().manual_seed(args.seed * 1_000_003 + batch_id * accelerator.num_processes + accelerator.process_index)
    else:
        # A row with a question is a question; a caption alone answers the bridge's caption prompt. A
        # caption-first bridge sees a question row's caption (its clip's) as the chat's first turn.
        prompt = bridge.config.caption_prompt
        qs = [prompt if q is None else q for q in questions]
        ans = [c if q is None else a for c, q, a in zip(captions, questions, answers)]
        histories = [[(prompt, c)] if bridge.config.caption_first and q is not None and c is not None else []
                     for c, q in zip(captions, questions)]
        inputs["text"] = bridge.answer_batch(qs, ans, histories, max_answer_tokens=args.max_answer_tokens)
    return inputs


@torch.no_grad()
def evaluate(model, eval_loader, bridge, stage, qtok, args, accelerator, out, known: list[str]) -> dict[str, float]:
    """Mean losses over the evaluation set, each sample counted once across processes.

    known: the unreadable evaluation samples already reported (extended here).
    """
    model.eval()
    per_sample: dict[str, list[float]] = {}
    for i, batch in enumerate(eval_loader):
        known += report_bad(accelerator, out, [item for r in gather_object([batch["bad"]]) for item in r], known)
        n = len(batch["names"])
        losses = model(**model_inputs(batch, bridge, stage, qtok, args, accelerator, -1 - i)) if n else {}
        for k, v in losses.items():
            # gather_for_metrics drops the samples accelerate repeated to even out the last batch.
            per_sample.setdefault(k, []).extend(accelerator.gather_for_metrics([v.item()] * n, use_gather_object=True))
    model.train()
    return {f"eval_{k}": sum(v) / len(v) for k, v in per_sample.items() if v}


def report_bad(accelerator, out: Path, bad: list[tuple[str, str]], known: list[str]) -> list[str]:
    """Warn about and record the unreadable samples not already in `known` (later epochs meet them again)."""
    new = list(dict((name, error) for name, error in bad if name not in known).items())
    if new and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "bad_samples.jsonl", "a") as f:
            for name, error in new:
                print(f"warning: skipped unreadable sample: {error}", file=sys.stderr)
                f.write(json.dumps({"sample": name, "error": error}) + "\n")
    return [name for name, _ in new]


def log(accelerator, metrics_file: Path, values: dict, bar, show: bool) -> None:
    if accelerator.is_main_process:
        with open(metrics_file, "a") as f:
            f.write(json.dumps(values) + "\n")
    if show:
        accelerator.log({k: v for k, v in values.items() if k != "step"}, step=values["step"])
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k not in ("step", "epoch")})


def save_checkpoint(accelerator, out: Path, progress: Progress, keep: int) -> None:
    """Written under a temporary name and renamed when complete, so --resume never finds half a checkpoint."""
    root = out / "checkpoints"
    final = root / f"step-{progress.step:08d}"
    tmp = root / f"tmp-step-{progress.step:08d}"
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps(asdict(progress)) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def forget_metrics_after(metrics_file: Path, step: int) -> None:
    """Drop the lines a killed run logged after its last checkpoint: the resumed run logs those steps again."""
    if metrics_file.exists():
        kept = [line for line in metrics_file.read_text().splitlines(keepends=True) if line.strip() and json.loads(line)["step"] <= step]
        tmp = metrics_file.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(metrics_file)


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"))
    return found[-1] if found else None


if __name__ == "__main__":
    main()
