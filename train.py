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
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, gather_object, is_tensorboard_available, set_seed
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from adapters.video import SAMPLINGS, decode_side
from qformer import Bridge, BridgeConfig, QFormerConfig
from qformer.bridge import read_bridge_dir, read_config
from qformer.build import MINILM, add_quantization_arguments, from_bridge, llm_loading, new_bridge
from qformer.config import SCORER_ATTENTION_RANK, LoraConfig
from qformer.data import ClipDataset, FeatureCache, MixedBatchSampler, collate, fill_cache, open_source, parse_data_arg
from qformer.losses import Stage1Objective
from qformer.model import count_parameters
from qformer.resume import check_checkpoint, check_rng_restored


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", required=True, choices=["1", "2"], help="1: ITC+ITM+ITG, no LLM; 2: generative, through the frozen LLM")
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH[:WEIGHT]",
        help="a manifest (.jsonl/.csv/.parquet), a save_to_disk directory or .tar shards; repeat to mix, weighted",
    )
    p.add_argument("--eval-data", action="append", default=[], metavar="PATH")
    p.add_argument("--output", required=True, help="the trained bridge, checkpoints and logs go here")
    # The bridge: a new one, or one to continue from (which may be re-bridged to another LLM).
    p.add_argument("--init-from", help="a bridge directory to start from; with --llm of another model, re-bridge it")
    p.add_argument("--vision", default=None, help=f"vision encoder spec (default {BridgeConfig.vision}, or the --init-from bridge's)")
    p.add_argument("--vision-resolution", type=int, default=None, help="input size; 128 is ~4x cheaper than 224 for EfficientNet-Lite0")
    p.add_argument(
        "--system-prompt",
        default=None,
        metavar="TEXT",
        help="system message of every chat ('' drops the template's default, e.g. SmolLM2's 20 tokens); "
        "default: the template's own, or the --init-from bridge's",
    )
    p.add_argument(
        "--vision-layer",
        type=int,
        default=None,
        help="features from this layer (HF models: hidden_states index, -2 = second-to-last; "
        "efficientnet-lite0: MBConv block, 10 = 112 wide at stride 16); default: the last",
    )
    p.add_argument("--llm", default=None, help=f"LLM spec (default {BridgeConfig.llm}, or the --init-from bridge's)")
    p.add_argument("--qformer-init", default=MINILM, help=f"new Q-Former: '{MINILM}' (offline MiniLM), a BERT directory, or 'random'")
    p.add_argument("--qformer-tokenizer", default=None, help="Q-Former tokenizer (default: the --qformer-init BERT's)")
    p.add_argument("--num-queries", type=int, default=None, help=f"new Q-Former: learned queries (default {QFormerConfig.num_queries})")
    p.add_argument(
        "--cross-attention-every",
        type=int,
        default=None,
        metavar="N",
        help=f"the queries cross-attend to the clip in every N-th layer (default {QFormerConfig.cross_attention_every}, as "
        "BLIP-2, or the --init-from bridge's); 1, every layer, reads more of a clip with several objects "
        "(python -m bench.reading). Given "
        "with --init-from, the bridge's Q-Former gains (or loses) cross-attention layers",
    )
    p.add_argument(
        "--num-frames", type=int, default=None, help=f"frames per clip (default {BridgeConfig.num_frames}, or the --init-from bridge's)"
    )
    p.add_argument(
        "--tubelets",
        action="store_true",
        help="new Q-Former: each place of the frame grid is one token over all --num-frames frames, so tokens "
        "carry motion (an --init-from bridge keeps its own choice)",
    )
    p.add_argument("--fps", type=float, default=None, help="sample clips at this rate, at most --num-frames frames")
    p.add_argument(
        "--frame-sampling",
        choices=SAMPLINGS,
        default=None,
        help=f"how --num-frames frames spread over a clip: segment centres, or from the first frame to the last "
        f"(default {BridgeConfig.frame_sampling}, or the --init-from bridge's); the bridge keeps it for captioning",
    )
    p.add_argument("--instruct", action="store_true", help="InstructBLIP: the question also enters the Q-Former (stage 2)")
    p.add_argument(
        "--caption-first",
        action="store_true",
        help="stage 2: a question row's 'caption' (its clip's) goes before the question as the chat's first "
        "turn (rows without one train as plain questions), and the bridge answers that way: its own "
        "caption first, then the answer",
    )
    p.add_argument(
        "--stage1-losses",
        default=None,
        metavar="NAMES",
        help="stage 1: the losses trained on, comma-separated (default itc,itm,itg). ITC aligns the queries with "
        "the text encoder's sentence feature, so what that feature ignores the queries learn to drop",
    )
    p.add_argument(
        "--train",
        choices=["all", "projection", "attention"],
        default="all",
        help="'projection': only the projection learns (stage 2); 'attention': stage 1 trains low-rank updates of the "
        "Q-Former's attention weights (--attention-rank), its queries and heads alone, everything else stays as it starts "
        "(a scorer beside its bridge then stores only what changed: qformer/scorer.py)",
    )
    p.add_argument(
        "--attention-rank",
        type=int,
        default=None,
        help="with --train attention: the rank of the updates (LoRA) the attention weights learn "
        f"(default {SCORER_ATTENTION_RANK}); 0: the weights themselves learn",
    )
    p.add_argument(
        "--lora",
        type=int,
        default=None,
        metavar="RANK",
        help="stage 2: also train LoRA adapters of this rank on the LLM (on --lora-modules); the LLM's own "
        "weights stay frozen (default: none, or the --init-from bridge's)",
    )
    p.add_argument(
        "--lora-modules",
        default=None,
        metavar="NAMES",
        help="with --lora: the LLM's modules to adapt, comma-separated, or all-linear for every linear layer "
        "but the output head (default: q_proj,v_proj)",
    )
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
    p.add_argument(
        "--mixed-precision",
        choices=["auto", "no", "fp16", "bf16"],
        default="auto",
        help="auto: bf16/fp16 on GPUs, fp32 on the CPU; bf16 pays on CPUs with AVX512-BF16 or AMX",
    )
    p.add_argument("--seed", type=int, default=0)
    add_quantization_arguments(p)
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
        # FSDP's transformer-based wrapping makes each block the backbones name (e.g. LlamaDecoderLayer) a
        # shard unit of its own, so that no process ever holds a whole backbone at once.
        self._no_split_modules = sorted({name for m in bridge.modules() for name in getattr(m, "_no_split_modules", None) or []})
        self.stage1 = Stage1Objective(bridge.qformer, bridge.heads, losses=stage1_losses) if stage == 1 else None

    def forward(self, features=None, pixels=None, text=None, generator=None, negatives=None) -> dict[str, torch.Tensor]:
        if features is None:
            with torch.no_grad():
                features = self.bridge.frame_features(pixels)  # (B, T, N, Dv)
        if self.stage1 is not None:
            return self.stage1(features, text["input_ids"], text["attention_mask"], generator, **(negatives or {}))
        return {"loss": self.bridge(features=features, return_logits=False, **text).loss}


def fail(message: str):
    """A configuration error: said before any compute, with what to change."""
    raise SystemExit(f"train.py: error: {message}")


# ---- the bridge --------------------------------------------------------------------------------------


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


def setup_bridge(args, stage: int) -> Bridge:
    """The bridge this run trains: a new one (qformer.build.new_bridge) or one carried over from --init-from
    (qformer.build.from_bridge), with what the arguments change. Options left out keep the config's
    defaults, or the --init-from bridge's values."""
    given = dict(
        vision=args.vision,
        vision_layer=args.vision_layer,
        vision_resolution=args.vision_resolution,
        llm=args.llm,
        num_frames=args.num_frames,
        frame_sampling=args.frame_sampling,
        qformer_tokenizer=args.qformer_tokenizer,
        system_prompt=args.system_prompt,
    )
    if args.lora:
        given["lora"] = LoraConfig(r=args.lora, alpha=2 * args.lora, target_modules=lora_modules(args.lora_modules))
    changes = {k: v for k, v in given.items() if v is not None}
    # Switches only ever turn a behaviour on: a caption-first bridge stays caption-first.
    changes.update({k: True for k in ("instruct", "caption_first") if getattr(args, k)})
    # Stage 2 leaves the stage-1 heads behind: it changes the Q-Former they were trained on, and a bridge that
    # carries heads is its own scorer (qformer/scorer.py).
    qformer = {"stage1_heads": stage == 1}
    # Low-rank attention updates are a scorer's; any other training merges those it starts with (from_bridge).
    rank = SCORER_ATTENTION_RANK if args.attention_rank is None else args.attention_rank
    qformer["attention_rank"] = rank if args.train == "attention" else 0
    if args.cross_attention_every:
        qformer["cross_attention_every"] = args.cross_attention_every
    try:
        if args.init_from:
            bridge = from_bridge(args.init_from, qformer, llm_loading(args.load_in_4bit, args.load_in_8bit), **changes)
            print(
                f"initialised from {args.init_from}"
                + (
                    ""
                    if bridge.config.llm == read_config(args.init_from).llm
                    else f"; new projection into {bridge.config.llm} ({bridge.llm.width} wide)"
                )
            )
            return bridge
        if args.num_queries:
            qformer["num_queries"] = args.num_queries
        if args.tubelets:
            qformer["tubelet_frames"] = changes.get("num_frames", BridgeConfig.num_frames)
        config = BridgeConfig(qformer=QFormerConfig(**qformer), **changes)
        return new_bridge(
            config, None if args.qformer_init == "random" else args.qformer_init, llm_loading(args.load_in_4bit, args.load_in_8bit)
        )
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
    if stage == 1 and train == "attention":
        # The scorer's recipe: what reads the clip and the text together learns, through low-rank updates of
        # its attention (or the attention weights themselves at --attention-rank 0); the bulk (word embeddings,
        # feed-forward layers) stays its start's, so a scorer saved beside that bridge stays small.
        q = bridge.qformer
        for part in (q.query_tokens, q.temporal_embed, q.vision_norm, bridge.heads):
            if part is not None:
                part.requires_grad_(True)
        for name, p in q.layers.named_parameters():
            if ".lora_" in name or (not q.config.attention_rank and "_attn." in name):
                p.requires_grad_(True)
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
    # 1. The configuration, the data and the checkpoint to resume from, checked before any model loads.
    plan = check_arguments(args, stage, out)
    # 2. Accelerate: devices, processes, precision.
    accelerator = setup_accelerator(args, out)
    set_seed(args.seed)
    # 3. The bridge, and what of it trains.
    bridge = setup_bridge(args, stage)
    choose_trainable(bridge, stage, args.train)
    qtok = stage1_tokenizer(bridge) if stage == 1 else None
    trainable, total = count_parameters(bridge)
    accelerator.print(
        f"stage {stage}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%); "
        f"{accelerator.num_processes} processes ({accelerator.distributed_type.value}) on {accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )
    # 4. Data: decoded in worker processes, mixed batch by batch; optionally frozen features from a cache.
    train_set, sampler, train_loader, eval_loader, cache = setup_data(args, bridge, plan)
    # 5. Optimizer over the trainable parameters only; warmup then cosine decay.
    run = setup_optimizer(args, accelerator, TrainStep(bridge, stage, plan.stage1_losses), train_loader, eval_loader)
    # 6. Frozen-feature cache: each process encodes its share of what is missing, once.
    if cache is not None:
        fill_feature_cache(args, accelerator, bridge, cache, [train_set] + ([eval_loader.dataset] if eval_loader is not None else []))
    # 7. Resume: weights, optimizer, scheduler, RNG states, and the position in the data.
    progress = resume(args, plan, accelerator, out)
    # 8. The loop.
    train_loop(run, args, accelerator, bridge, stage, qtok, sampler, len(train_set), out, progress)
    # 9. The output directory is a bridge.
    accelerator.wait_for_everyone()
    bridge = accelerator.unwrap_model(run.model).bridge
    weights = whole_trainable_weights(bridge)
    if accelerator.is_main_process:
        bridge.save_pretrained(out, state=weights)
        accelerator.print(f"bridge saved to {out}")
    # Every process tears the process group down together: one that left while the main process was still
    # saving aborted now and then in gloo's teardown ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return bridge


@dataclass
class Plan:
    """What the arguments ask for, read and checked before any model loads."""

    data: list[tuple[str, float]]  # (path, weight) of each --data
    sources: list
    eval_sources: list
    stage1_losses: tuple[str, ...]
    checkpoint: Path | None  # the checkpoint to resume from
    progress: Progress  # where that checkpoint stands; step 0 without one


def check_arguments(args, stage: int, out: Path) -> Plan:
    """The run's plan, or a `fail` saying what to change."""
    if stage == 2 and args.train == "attention":
        fail("--train attention is for stage 1 (a scorer's Q-Former; stage 2 trains --train all or projection)")
    if stage == 1 and args.train == "projection":
        fail("--train projection is for stage 2 (stage 1 trains the Q-Former without an LLM)")
    if args.attention_rank is not None and (args.train != "attention" or args.attention_rank < 0):
        fail(f"--attention-rank {args.attention_rank}: give a rank of 0 or more, with --train attention")
    if stage == 1 and args.instruct:
        fail("--instruct is for stage 2 (stage 1 already shows the Q-Former the text)")
    if stage == 1 and args.caption_first:
        fail("--caption-first is for stage 2 (stage 1 does not answer questions)")
    if args.lora is not None and (stage == 1 or args.lora < 1):
        fail("--lora RANK is for stage 2 (stage 1 does not run the LLM), with a rank of at least 1")
    if args.stage1_losses is not None and stage != 1:
        fail("--stage1-losses is for stage 1")
    loss_names = stage1_losses(args.stage1_losses)
    if args.lora_modules is not None and (args.lora is None or not lora_modules(args.lora_modules)):
        fail(f"--lora-modules {args.lora_modules!r}: give module names (or all-linear) together with --lora RANK")
    if args.batch_size < 1 or args.grad_accum < 1:
        fail("--batch-size and --grad-accum must be at least 1")
    if args.cross_attention_every is not None and args.cross_attention_every < 1:
        fail(f"--cross-attention-every {args.cross_attention_every}: give 1 (every layer) or more")
    if not args.resume and latest_checkpoint(out) is not None:
        fail(f"{out} already holds a run's checkpoints: pass --resume to continue it, or choose another --output")
    # The checkpoint to resume from is read whole now, not found damaged once the models are loaded.
    checkpoint = latest_checkpoint(out) if args.resume == "latest" else args.resume and Path(args.resume) or None
    try:
        progress = check_checkpoint(checkpoint, Progress) if checkpoint else Progress()
        if args.init_from:
            check_init_from(args, read_config(args.init_from))
        data = [parse_data_arg(a) for a in args.data]
        sources = [open_source(path) for path, _ in data]
        eval_sources = [open_source(path) for path in args.eval_data]
    except ValueError as e:
        fail(str(e))
    return Plan(data, sources, eval_sources, loss_names, checkpoint, progress)


def check_init_from(args, source: BridgeConfig) -> None:
    """What a trained Q-Former cannot take on: another encoder or layer (it learnt to read those features), tubelets."""
    d = args.init_from
    if args.vision and args.vision != source.vision:
        fail(f"--vision {args.vision}: the Q-Former in {d} was trained on {source.vision} features; drop --vision")
    if args.vision_layer is not None and args.vision_layer != source.vision_layer:
        fail(f"--vision-layer {args.vision_layer}: the Q-Former in {d} was trained on layer {source.vision_layer}; drop --vision-layer")
    if args.tubelets and not source.qformer.tubelet_frames:
        fail(f"--tubelets: the Q-Former in {d} reads frames one by one; tubelets change its input, start a new one")


def setup_accelerator(args, out: Path) -> Accelerator:
    """fp32 on the CPU by default: bf16 is only fast on CPUs with native bf16 matmuls (AVX512-BF16, AMX; the
    default bridge's retrain uses it there), and exact-resume tests and users' numbers should not depend on
    which CPU ran them."""
    precision = args.mixed_precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "no"
    log_with = "tensorboard" if args.log_with == "tensorboard" and is_tensorboard_available() else None
    accelerator = Accelerator(mixed_precision=precision, log_with=log_with, project_dir=str(out), step_scheduler_with_optimizer=False)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # Accelerate runs an FSDP config on CPUs as plain DDP; torch's FSDP2 does shard over gloo, so
        # the run does what its config says (and the FSDP path can be tested without GPUs).
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        accelerator.state.distributed_type = DistributedType.FSDP
    if args.log_with == "tensorboard" and log_with is None:
        accelerator.print("tensorboard is not installed (pip install tensorboard): logging to metrics.jsonl only")
    return accelerator


def stage1_tokenizer(bridge: Bridge):
    """Stage 1 shows the Q-Former text, in its own tokenizer, which must fit its word embeddings."""
    qtok = bridge.qformer_tokenizer
    if qtok is None:
        fail("stage 1 needs a Q-Former tokenizer: pass --qformer-tokenizer DIR (or --qformer-init minilm/BERT_DIR)")
    if len(qtok) > bridge.config.qformer.vocab_size:
        fail(
            f"the Q-Former tokenizer has {len(qtok)} tokens but the Q-Former only {bridge.config.qformer.vocab_size} word embeddings; "
            "use the tokenizer of the BERT it was initialised from"
        )
    return qtok


def setup_data(args, bridge: Bridge, plan: Plan):
    """(train set, its sampler, train loader, eval loader or None, feature cache or None)."""
    cfg = bridge.config
    cache = None
    side = decode_side(bridge.vision)  # frames decoded as the recaptioner and Bridge.caption decode them
    if args.cache_features:
        # Everything that changes the features is in the key: encoder, layer, resolution, frames, fps, decoded size.
        spec = f"{cfg.vision}|layer={cfg.vision_layer}|res={cfg.vision_resolution}|frames={cfg.num_frames}|fps={args.fps}"
        # (Written only when not the default, so caches filled before frame sampling was a choice stay valid.)
        spec += "" if cfg.frame_sampling == BridgeConfig.frame_sampling else f"|sampling={cfg.frame_sampling}"
        spec += f"|side={side}"  # caches filled before frames were decoded at this size are not reused
        cache = FeatureCache(args.cache_features, spec)
    train_set = ClipDataset(plan.sources, cfg.num_frames, args.fps, bridge.vision.preprocess, cache, cfg.frame_sampling, side)
    sampler = MixedBatchSampler([len(s) for s in plan.sources], [w for _, w in plan.data], args.batch_size, args.seed)
    loader_kwargs = dict(collate_fn=collate, num_workers=args.num_workers)
    train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_kwargs)
    eval_loader = None
    if plan.eval_sources:
        eval_set = ClipDataset(plan.eval_sources, cfg.num_frames, args.fps, bridge.vision.preprocess, cache, cfg.frame_sampling, side)
        eval_loader = DataLoader(eval_set, batch_sampler=BatchSampler(SequentialSampler(eval_set), args.batch_size, False), **loader_kwargs)
    return train_set, sampler, train_loader, eval_loader, cache


@dataclass
class Run:
    """What accelerate prepared, and the schedule's length."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: DataLoader
    eval_loader: DataLoader | None
    params: list
    batches_per_epoch: int
    total_steps: int


def setup_optimizer(args, accelerator, model: TrainStep, train_loader, eval_loader) -> Run:
    """AdamW over the trainable parameters only, warmup then cosine decay; checkpoints of trainable weights."""
    bridge = model.bridge
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # FSDP replaces each parameter by its shard: the ones to clip are those of the prepared model.
    params = [p for p in model.parameters() if p.requires_grad]
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    batches_per_epoch = len(train_loader)
    total_steps = args.max_steps or args.epochs * math.ceil(batches_per_epoch / args.grad_accum)
    scheduler = accelerator.prepare(get_cosine_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps))

    # Checkpoints hold the trainable weights only, never copies of the frozen backbones; with the config
    # beside them each checkpoint is itself a bridge (bench.quality --bridge out/checkpoints/step-N).
    # Under FSDP, Accelerate saves and restores the whole sharded model itself, backbones included.
    def save_trainable_only(models, weights, directory):
        trainable = whole_trainable_weights(bridge)
        if accelerator.is_main_process:
            bridge.save_pretrained(directory, state=trainable)
        weights.clear()

    def load_trainable_only(models, directory):
        if accelerator.distributed_type != DistributedType.FSDP:
            bridge.load_trainable(read_bridge_dir(directory)[1], source=directory)
        models.clear()

    accelerator.register_save_state_pre_hook(save_trainable_only)
    accelerator.register_load_state_pre_hook(load_trainable_only)
    return Run(model, optimizer, scheduler, train_loader, eval_loader, params, batches_per_epoch, total_steps)


def whole_trainable_weights(bridge: Bridge) -> dict[str, torch.Tensor]:
    """The bridge's trainable weights. Under FSDP each process holds a shard (DTensor) of each: every process
    must call this, which gathers them whole."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in bridge.trainable_state_dict().items()}


def fill_feature_cache(args, accelerator, bridge: Bridge, cache: FeatureCache, datasets: list) -> None:
    for dataset in datasets:
        mine = list(range(len(dataset)))[accelerator.process_index :: accelerator.num_processes]
        added = fill_cache(dataset, bridge.vision.encode, cache, mine, args.batch_size, args.num_workers, device=accelerator.device)
        accelerator.print(f"feature cache {cache.directory}: {added} samples encoded by process 0, {len(cache)} cached")
    accelerator.wait_for_everyone()
    cache.refresh()


def resume(args, plan: Plan, accelerator, out: Path) -> Progress:
    """Where the run stands: step 0, or the checkpoint's weights, optimizer, scheduler, RNG states and data position."""
    if plan.checkpoint is None:
        if args.resume:
            accelerator.print(f"no checkpoint in {out / 'checkpoints'}: starting from step 0")
        return plan.progress
    try:
        accelerator.load_state(str(plan.checkpoint))
        # Accelerate skips RNG states it cannot restore; the run would then quietly differ from the killed one.
        check_rng_restored(plan.checkpoint, accelerator.process_index)
    except ValueError as e:  # weights that do not fit this run's bridge
        fail(str(e))
    accelerator.print(f"resumed from {plan.checkpoint} at step {plan.progress.step}")
    if accelerator.is_main_process:
        forget_metrics_after(out / "metrics.jsonl", plan.progress.step)
    return plan.progress


def train_loop(
    run: Run, args, accelerator, bridge: Bridge, stage: int, qtok, sampler, train_size: int, out: Path, progress: Progress
) -> None:
    """Optimizer steps until the schedule's end. Gradients accumulate over --grad-accum batches and synchronise
    across processes on the last; checkpoints, evaluation and logs at their intervals."""
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers("tensorboard", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    metrics_file = out / "metrics.jsonl"
    bar = tqdm(total=run.total_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc=f"stage {stage}")
    model, optimizer, scheduler, batches_per_epoch = run.model, run.optimizer, run.scheduler, run.batches_per_epoch
    model.train()
    sums: dict[str, float] = {}
    eval_bad: list[str] = []
    while progress.step < run.total_steps:
        sampler.epoch = progress.epoch  # the batch order depends on (seed, epoch) only
        loader = (
            accelerator.skip_first_batches(run.train_loader, progress.batches_in_epoch) if progress.batches_in_epoch else run.train_loader
        )
        for batch in loader:
            b = progress.batches_in_epoch
            progress.batches_in_epoch += 1
            group_start = b - b % args.grad_accum
            group_size = min(args.grad_accum, batches_per_epoch - group_start)
            sync = b + 1 == group_start + group_size

            # Unreadable samples: reported by every process, counted over all of them.
            reports = gather_object([(batch["bad"], len(batch["names"]))])
            progress.bad_samples += report_bad(accelerator, out, [item for r, _ in reports for item in r], progress.bad_samples)
            if len(progress.bad_samples) > args.max_bad_fraction * train_size:
                raise SystemExit(
                    f"train.py: stopped: {len(progress.bad_samples)} of {train_size} samples are unreadable, more than "
                    f"--max-bad-fraction {args.max_bad_fraction:g}; see {out / 'bad_samples.jsonl'}, fix or remove them"
                )
            # A process with nothing readable would leave the others waiting in DDP; all skip this batch.
            skip = any(n == 0 for _, n in reports)
            if not skip:
                with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                    torch.manual_seed(batch_seed(args, accelerator, progress.epoch * batches_per_epoch + progress.batches_in_epoch))
                    losses = model(**model_inputs(batch, bridge, stage, qtok, args, accelerator))
                    accelerator.backward(losses["loss"] / group_size)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float().item() / group_size
            if not sync:
                continue

            if skip:
                optimizer.zero_grad()  # grads of this group never synchronised; drop them on every process
            else:
                accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
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
            if run.eval_loader is not None and (progress.step % args.eval_every == 0 or progress.step == run.total_steps):
                scores = evaluate(model, run.eval_loader, bridge, stage, qtok, args, accelerator, out, eval_bad)
                log(accelerator, metrics_file, {"step": progress.step} | scores, bar, True)
            if progress.step % args.save_every == 0 or progress.step == run.total_steps:
                save_checkpoint(accelerator, out, progress, args.keep_checkpoints)
            if progress.step >= run.total_steps:
                break
        else:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()


def batch_seed(args, accelerator, batch_id: int) -> int:
    """The seed of a micro-batch on this process (batch_id counts them over the run; evaluation's are negative).

    Every random draw of its step (dropout, ITM's hard negatives) comes from the global generator seeded
    with it, so a resumed run repeats the killed run's steps exactly, whatever else drew random numbers in
    between: a DataLoader draws its workers' seed from the global generator each time it is iterated, and a
    resumed run iterates it at another point. (Resuming a stage-2 run of the default bridge's recipe after
    step 4 gave step 5 a loss of 4.816 against the uninterrupted run's 4.738 before.)"""
    return args.seed * 1_000_003 + batch_id * accelerator.num_processes + accelerator.process_index


def model_inputs(batch: dict, bridge: Bridge, stage: int, qtok, args, accelerator) -> dict:
    """The batch's tensors and its texts, tokenised here (fast tokenizers) rather than in the workers."""
    inputs = {"features": batch.get("features"), "pixels": batch.get("pixels")}
    captions, questions, answers = batch["captions"], batch["questions"], batch["answers"]
    if stage == 1:
        # Stage 1 aligns queries with text: a question with its answer, or the caption.
        texts = [c if q is None else f"{q} {a}" for c, q, a in zip(captions, questions, answers)]
        enc = qtok(texts, padding=True, truncation=True, max_length=args.max_text_len, return_tensors="pt")
        inputs["text"] = {k: enc[k].to(accelerator.device) for k in ("input_ids", "attention_mask")}
        # Given negatives (a manifest's `negatives`), each with the index of its clip.
        given = [(k, n) for k, ns in enumerate(batch.get("negatives", [])) for n in ns]
        if given:
            enc = qtok([n for _, n in given], padding=True, truncation=True, max_length=args.max_text_len, return_tensors="pt")
            inputs["negatives"] = {
                "negative_ids": enc["input_ids"].to(accelerator.device),
                "negative_mask": enc["attention_mask"].to(accelerator.device),
                "negative_owner": torch.tensor([k for k, _ in given], device=accelerator.device),
            }
    else:
        # A row with a question is a question; a caption alone answers the bridge's caption prompt. A
        # caption-first bridge sees a question row's caption (its clip's) as the chat's first turn.
        prompt = bridge.config.caption_prompt
        qs = [prompt if q is None else q for q in questions]
        ans = [c if q is None else a for c, q, a in zip(captions, questions, answers)]
        histories = [
            [(prompt, c)] if bridge.config.caption_first and q is not None and c is not None else [] for c, q in zip(captions, questions)
        ]
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
        torch.manual_seed(batch_seed(args, accelerator, -1 - i))  # the same ITM negatives at every evaluation
        losses = model(**model_inputs(batch, bridge, stage, qtok, args, accelerator)) if n else {}
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
