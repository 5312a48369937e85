#!/usr/bin/env bash
# The paper's main experiment end to end: Qwen2.5-VL-7B-Instruct + DeepSeek-R1-Distill-Qwen-7B.
#   1. diff: how far apart the text towers are (expect "far": per-layer cosine ~0.65-0.75)
#   2. the BR2V naive-merge baseline (0.9 / 0.1)
#   3. the reasoning prior D = R1 - Qwen2.5-VL (attention + MLP, bf16)
#   4. plain SFT and DRIFT (adaptive, alpha 1) with the paper's settings, on NGPU GPUs (FSDP2)
#   5. eval of all four on a MathVista-style benchmark (docs/eval.md)
# Inputs (override with environment variables): checkpoints under $MODELS, training JSONL $TRAIN
# (docs/data.md), benchmark JSONL $BENCH, number of GPUs $NGPU, generation budget $MAX_NEW_TOKENS. Everything goes under $RUNS; a step whose output exists is an
# error (delete it or pass --force by hand), so a finished step is never silently redone.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-models}
TRAIN=${TRAIN:-data/drift-cot-4k/train.jsonl}
BENCH=${BENCH:-data/mathvista-testmini.jsonl}
RUNS=${RUNS:-runs/qwen2.5-vl-7b-r1}
NGPU=${NGPU:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-2048}
VL=$MODELS/Qwen2.5-VL-7B-Instruct
R1=$MODELS/DeepSeek-R1-Distill-Qwen-7B
mkdir -p "$RUNS"

deltakit diff "$VL" "$R1" --json "$RUNS/diff.json" --csv "$RUNS/diff.csv" --plot "$RUNS/diff.png"
deltakit merge --mllm "$VL" --llm "$R1" --method linear --alpha 0.9 --out-dtype bfloat16 "$RUNS/br2v" \
    --json "$RUNS/br2v.json"
deltakit prior --mllm "$VL" --llm "$R1" "$RUNS/prior-r1.safetensors" --json "$RUNS/prior.json"

# Global batch 32 (grad_accum x NGPU) for both runs, so SFT and DRIFT differ only in the prior.
accum=$((32 / NGPU))
torchrun --nproc-per-node "$NGPU" -m deltakit finetune --config commands/finetune-sft-qwen2.5-vl-7b.yaml \
    --strategy fsdp --grad-accum "$accum" --model "$VL" --data "$TRAIN" --out "$RUNS/sft" --json "$RUNS/sft.json"
torchrun --nproc-per-node "$NGPU" -m deltakit finetune --config commands/finetune-drift-qwen2.5-vl-7b-fsdp.yaml \
    --grad-accum "$accum" --model "$VL" --data "$TRAIN" --prior "$RUNS/prior-r1.safetensors" --out "$RUNS/drift" \
    --json "$RUNS/drift.json"

for model in "$VL" "$RUNS/br2v" "$RUNS/sft" "$RUNS/drift"; do
    deltakit eval "$model" --data "$BENCH" --batch-size 16 --max-new-tokens "$MAX_NEW_TOKENS" \
        --json "$RUNS/eval-$(basename "$model").json"
done
