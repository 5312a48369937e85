#!/usr/bin/env bash
# DRIFT priors for the 2025-26 pairings: `deltakit diff` (how far apart the text towers are) then
# `deltakit prior` (D = LLM - MLLM on attention and MLP weights, MoE experts included, one tensor per
# expert) for each pair. Checkpoints under $MODELS (Hugging Face repository names as folders); reports
# and priors under $RUNS; ONLY="Qwen3-VL-8B-Instruct ..." runs just the pairs of those MLLMs. Fine-tune with
# `deltakit finetune --prior $RUNS/<pair>.prior.safetensors`.
set -euo pipefail
MODELS=${MODELS:-models}
RUNS=${RUNS:-runs/priors-2026}
mkdir -p "$RUNS"
pairs=(
    "Qwen3-VL-8B-Instruct Qwen3-8B"
    "Qwen3-VL-30B-A3B-Instruct Qwen3-30B-A3B"
    "InternVL3-8B-hf DeepSeek-R1-Distill-Qwen-7B"
    "Llama-3.2-11B-Vision DeepSeek-R1-Distill-Llama-8B"
)
for pair in "${pairs[@]}"; do
    read -r mllm llm <<<"$pair"
    if [[ -n "${ONLY:-}" && " $ONLY " != *" $mllm "* ]]; then continue; fi
    name="$mllm--$llm"
    deltakit diff "$MODELS/$mllm" "$MODELS/$llm" --json "$RUNS/$name.diff.json" --csv "$RUNS/$name.diff.csv"
    deltakit prior --mllm "$MODELS/$mllm" --llm "$MODELS/$llm" --json "$RUNS/$name.prior.json" \
        "$RUNS/$name.prior.safetensors"
done
