#!/usr/bin/env bash
# The paper's Figure 2: parameter-space distance between each MLLM and the reasoning LLM paired with it.
# Expect "close" for the LLaVA-Next / Idefics2 pairs (naive merging helps) and "far" for the Qwen-VL pairs
# (naive merging hurts; use DRIFT). Checkpoints under $MODELS (Hugging Face repository names as folders);
# one JSON, CSV and plot per pair under $RUNS.
set -euo pipefail
MODELS=${MODELS:-models}
RUNS=${RUNS:-runs/figure2}
mkdir -p "$RUNS"
pairs=(
    "Qwen2.5-VL-7B-Instruct DeepSeek-R1-Distill-Qwen-7B"
    "Qwen2-VL-7B-Instruct Qwen2-Math-7B"
    "llava-v1.6-mistral-7b-hf MetaMath-Mistral-7B"
    "idefics2-8b MetaMath-Mistral-7B"
)
for pair in "${pairs[@]}"; do
    read -r mllm llm <<<"$pair"
    name="$mllm--$llm"
    deltakit diff "$MODELS/$mllm" "$MODELS/$llm" --json "$RUNS/$name.json" --csv "$RUNS/$name.csv" \
        --plot "$RUNS/$name.png"
done
