#!/usr/bin/env bash
# Retrain the default bridge (demos/bridge) from nothing on this machine's CPU:
# world data -> stage 1 -> stage 2a (projection) -> stage 2b (instructed VQA) -> stage 2c (caption-first VQA)
# -> stage 2d (three times the clips, mostly captions) -> stage 2e (new two-object scenes) -> the scorer
# -> a half-precision copy to ship -> scores.
#
#   demos/train_bridge.sh [OUT]        OUT defaults to $QFORMER_RUNS/demo-bridge ($QFORMER_RUNS: ~/qformer-runs)
#   make bridge                        the same, in the background, logging to OUT/train.log
#
# The run lives outside the repository, so a clone, a checkout or a clean never touches it, and hours of CPU
# outlive the shell that started them. Resumable: rerun the same command after a kill; each stage continues
# from its last checkpoint (mid-stage, every SAVE_EVERY steps) with the losses the uninterrupted run would
# have had, and a finished stage is not run again (tests/test_train_bridge.py). Afterwards OUT/bridge is the
# bridge to copy to demos/bridge, and OUT/scores.json and OUT/matching.json hold what bench/quality.py and
# bench/matching.py measured on it.
# UNTIL=1|2a|2b|2c|2d|2e|scorer stops after that stage; the step counts, clip counts and layout below are
# environment variables too.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-${QFORMER_RUNS:-$HOME/qformer-runs}/demo-bridge}
PY=${PYTHON:-python}
STAGE1_STEPS=${STAGE1_STEPS:-800}
STAGE2A_STEPS=${STAGE2A_STEPS:-150}
STAGE2_STEPS=${STAGE2_STEPS:-3000}
STAGE2C_STEPS=${STAGE2C_STEPS:-1500}
STAGE2D_STEPS=${STAGE2D_STEPS:-2000}
STAGE2E_STEPS=${STAGE2E_STEPS:-1200}
SCORER_STEPS=${SCORER_STEPS:-400}
SAVE_EVERY=${SAVE_EVERY:-50}  # steps between checkpoints: about 100 s of this CPU; 390 MB each with the optimizer state, the last two kept
UNTIL=${UNTIL:-}
CLIPS=${CLIPS:-4000}
CLIPS2D=${CLIPS2D:-12000}
CLIPS2E=${CLIPS2E:-16000}  # scenes CLIPS2D on, of which the two-object ones (about half: 7,894) are written
# The new Q-Former's reading room: cross-attention in every layer and the library's 32 queries, which read a
# clip's second object far better than the first default bridge's every-2nd-layer and 16 queries
# (python -m bench.reading: its colour 0.924 against 0.688; bench/README.md). CROSS_ATTENTION_EVERY=2
# NUM_QUERIES=16 FRAME_SAMPLING=centres is the first default bridge's recipe.
CROSS_ATTENTION_EVERY=${CROSS_ATTENTION_EVERY:-1}
NUM_QUERIES=${NUM_QUERIES:-32}
# Frames from the first to the last: the world names the leftmost object in frame 0 first, and segment centres
# (frames 2, 6, 10, 14 of 16) never show frame 0; captioning the first bridge's clips with frames 0, 5, 10, 15
# halved its two-object order errors (0.070 to 0.035) even untrained for them (demos/bridge/HISTORY.md).
FRAME_SAMPLING=${FRAME_SAMPLING:-ends}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"

# Frozen features shared by both stages: EfficientNet-Lite0 block 7, 8x8 tokens of 80 at 128 px, 4 frames
# per clip. The final 4x4 map is too coarse for 20 px objects and their motion; block 10 (same grid, 112
# wide) has shape as plainly but colour faintly (see the model card).
VISION=(--vision-resolution 128 --vision-layer 7 --num-frames 4 --frame-sampling "$FRAME_SAMPLING" --cache-features "$OUT/features")
# bf16 autocast over all of stage 2's forward (Q-Former and LLM) where the CPU multiplies bf16 natively
# (AMX or AVX512-BF16: a step of stage 2b took 1.5 s, see the model card); fp32 elsewhere, since without
# them torch emulates bf16: on an AVX2-only CPU the first bf16 step of stage 2 took 117 s, an fp32 step
# 4.4 s. PRECISION=bf16 or PRECISION=no overrides the choice.
if [ -z "${PRECISION:-}" ]; then
    if grep -qwE 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null; then PRECISION=bf16; else PRECISION=no; fi
fi

resume_flag() {  # --resume once a stage has checkpoints to continue from
    if [ -d "$1/checkpoints" ]; then echo --resume; fi
}

train_stage() {  # train_stage DIR STEPS ARGS...: train.py ARGS into OUT/DIR with the shared vision settings,
    # resumed from its last checkpoint when it has one; the stage is then marked done
    local dir="$OUT/$1" steps=$2
    shift 2
    $PY train.py "$@" "${VISION[@]}" --output "$dir" --max-steps "$steps" --save-every "$SAVE_EVERY" $(resume_flag "$dir")
    touch "$dir/.done"
}

stop_after() {  # UNTIL=$1: the run ends here
    if [ "$UNTIL" = "$1" ]; then
        echo "== $(date -u +%FT%TZ) stopped after stage $1 (UNTIL=$1)"
        exit 0
    fi
}

echo "== $(date -u +%FT%TZ) world clips and manifests"
$PY -m demos.world_data "$OUT/data" --clips "$CLIPS"

if [ ! -f "$OUT/stage1/.done" ]; then
    # No ITC loss: its text side (MiniLM, a sentence encoder) gives captions that differ only in colour or
    # only in motion direction nearly the same feature (cosine 0.989 and 0.995, bench/probe.py), so ITC
    # teaches the queries to drop exactly those slots. ITC's similarities still pick ITM's hard negatives.
    echo "== $(date -u +%FT%TZ) stage 1: ITM + ITG on world captions"
    train_stage stage1 "$STAGE1_STEPS" --stage 1 --stage1-losses itm,itg --data "$OUT/data/world_captions.jsonl" \
        --tubelets --num-queries "$NUM_QUERIES" --cross-attention-every "$CROSS_ATTENTION_EVERY" --batch-size 24 --lr 3e-4
fi
stop_after 1

# Stage 2 in two steps. The LLM cannot read the stage-1 queries yet, so at first their variation from clip
# to clip only disturbs it, and training everything at once learns to erase it (the queries collapse to
# one constant prompt and captions ignore the clip). So the projection alone learns to speak the LLM's
# language first, over a frozen Q-Former; then everything trains, at a lower rate, with LoRA adapters on
# the LLM's attention taking the answer format (the LLM's own weights stay frozen), so the visual prompt
# is left to carry what is in the clip.
STAGE2=(--stage 2 --mixed-precision "$PRECISION" --batch-size 16)
DATA2B=(--data "$OUT/data/world_captions.jsonl:2" --data "$OUT/data/world_vqa.jsonl:1.5" --data "$OUT/data/easy_vqa.jsonl:1")
if [ ! -f "$OUT/stage2a/.done" ]; then
    echo "== $(date -u +%FT%TZ) stage 2a: the projection alone, into SmolLM2-135M-Instruct"
    # An empty system prompt replaces SmolLM2's built-in one: 20 fewer tokens in every step.
    train_stage stage2a "$STAGE2A_STEPS" "${STAGE2[@]}" --init-from "$OUT/stage1" --instruct --system-prompt "" \
        --train projection --lr 1e-3 "${DATA2B[@]}"
fi
stop_after 2a

if [ ! -f "$OUT/stage2/.done" ]; then
    echo "== $(date -u +%FT%TZ) stage 2b: Q-Former, projection and LoRA, captions and instructed VQA"
    train_stage stage2 "$STAGE2_STEPS" "${STAGE2[@]}" --init-from "$OUT/stage2a" --lr 3e-4 --lora 8 "${DATA2B[@]}"
fi
stop_after 2b

# With two objects in a clip, the bridge of 2b reads both but answers about either one by chance, while its
# captions bind colour, shape and motion to the right object. So it learns to answer from its own caption:
# each question follows its clip's caption as the chat's first turn, and the bridge captions before it answers.
# easy-VQA images get captions too ("a blue rectangle"), so that one rule holds for every question.
if [ ! -f "$OUT/stage2c/.done" ]; then
    echo "== $(date -u +%FT%TZ) stage 2c: caption-first VQA"
    train_stage stage2c "$STAGE2C_STEPS" "${STAGE2[@]}" --init-from "$OUT/stage2" --caption-first --lr 2e-4 \
        --data "$OUT/data/world_captions.jsonl:2" --data "$OUT/data/easy_captions.jsonl:0.5" \
        --data "$OUT/data/world_vqa.jsonl:1.5" --data "$OUT/data/easy_vqa.jsonl:1"
fi
stop_after 2c

# The captions of 2c still miss on the bridge's own training clips (slot accuracy 0.963) and more so on
# held-out ones (0.935): two-object clips, where each object is one or two feature tokens. So the last stage
# shows the bridge three times as many clips, the first CLIPS of them the ones it has seen, with captions
# weighted up; the questions stay in the mix so the caption-first answers are kept.
if [ ! -f "$OUT/stage2d/.done" ]; then
    echo "== $(date -u +%FT%TZ) stage 2d: $CLIPS2D clips, mostly captions"
    $PY -m demos.world_data "$OUT/data2d" --clips "$CLIPS2D"
    train_stage stage2d "$STAGE2D_STEPS" "${STAGE2[@]}" --init-from "$OUT/stage2c" --lr 2e-4 \
        --data "$OUT/data2d/world_captions.jsonl:3" --data "$OUT/data2d/easy_captions.jsonl:0.25" \
        --data "$OUT/data2d/world_vqa.jsonl:1.5" --data "$OUT/data2d/easy_vqa.jsonl:0.5"
fi
stop_after 2d

# After 2d what the answers still miss is two-object clips: the bridge gives one object the other's shape or
# colour (test-novel two-object captions: shape 0.775, colour 0.825), and a wrong answer follows from its
# caption. So the last stage shows it two-object scenes it has never seen, captions weighted up, with the
# first CLIPS clips' captions and questions kept in the mix so one-object clips and easy-VQA are not
# forgotten, at half 2d's learning rate.
if [ ! -f "$OUT/stage2e/.done" ]; then
    echo "== $(date -u +%FT%TZ) stage 2e: new two-object scenes"
    $PY -m demos.world_data "$OUT/data2e" --first "$CLIPS2D" --clips "$CLIPS2E" --objects 2
    train_stage stage2e "$STAGE2E_STEPS" "${STAGE2[@]}" --init-from "$OUT/stage2d" --lr 1e-4 \
        --data "$OUT/data2e/world_captions.jsonl:3" --data "$OUT/data2e/world_vqa.jsonl:1" \
        --data "$OUT/data/world_captions.jsonl:1" --data "$OUT/data/world_vqa.jsonl:0.5" \
        --data "$OUT/data/easy_captions.jsonl:0.25" --data "$OUT/data/easy_vqa.jsonl:0.5"
fi
stop_after 2e

# The scorer (qformer index and search): stage 2 moved the Q-Former away from its stage-1 heads, so new heads
# learn on a stage-2 Q-Former, with low-rank updates (rank 16) of its attention and the rest frozen
# (--train attention: scorer/ stays small beside the bridge; its attention weights themselves would take the
# directory past 80 MB), with ITC and ITM on captions against the same captions one slot wrong (the
# manifests' negatives). ITC learns to find clips by text; ITM stays at chance on this Q-Former
# (demos/bridge/HISTORY.md), so Bridge.match scores by the bridge's own captioning instead. It trains on 2d's
# Q-Former: over 2e's weights it searches as well (recall@1 0.95 against 0.96 over 2d's), while one trained
# on 2e's Q-Former for 200 steps on 2e's clips reached 0.44 (demos/bridge/HISTORY.md).
if [ ! -f "$OUT/scorer/.done" ]; then
    echo "== $(date -u +%FT%TZ) scorer: ITC + ITM with one-slot-wrong negatives on 2d's Q-Former"
    $PY -m demos.world_data "$OUT/data2d" --clips "$CLIPS2D"  # its clips kept; manifests with their negatives
    train_stage scorer "$SCORER_STEPS" --stage 1 --init-from "$OUT/stage2d" --stage1-losses itc,itm --train attention \
        --lr 5e-4 --data "$OUT/data2d/world_captions.jsonl" --batch-size 24
fi
stop_after scorer

echo "== $(date -u +%FT%TZ) half-precision copy with its scorer, and scores"
$PY -c "import sys, torch; from qformer import Bridge; Bridge.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], dtype=torch.float16)" \
    "$OUT/stage2e" "$OUT/bridge"
# The scorer keeps what differs from the bridge it was trained from (2d, its init): its attention updates,
# queries and heads, 1.9 MB; beside 2e it reads 2e's Q-Former with them.
$PY -c "import sys, torch; from qformer import Bridge; from qformer.bridge import save_scorer; save_scorer(Bridge.from_pretrained(sys.argv[1]), sys.argv[2], dtype=torch.float16, init=sys.argv[3])" \
    "$OUT/scorer" "$OUT/bridge" "$OUT/stage2d"
$PY -m bench.quality --bridge "$OUT/bridge" --json "$OUT/scores.json"
$PY -m bench.matching --bridge "$OUT/bridge" --json "$OUT/matching.json"
echo "== $(date -u +%FT%TZ) done: $OUT/bridge (copy it to demos/bridge), scores in $OUT/scores.json"
