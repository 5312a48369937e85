"""DRIFT inside LLaMA-Factory (the framework the public DRIFT code forks): its own SFT run, with deltakit's
callback passed through `run_exp(..., callbacks=[...])`.

    deltakit prior --mllm models/Qwen2.5-VL-7B-Instruct --llm models/DeepSeek-R1-Distill-Qwen-7B runs/prior.safetensors
    python commands/llamafactory-drift-qwen2.5-vl-7b.py runs/prior.safetensors path/to/llamafactory-sft.yaml

The YAML is any LLaMA-Factory SFT config (`stage: sft`, `finetuning_type: full`, `freeze_vision_tower:
true`, the paper's `learning_rate: 1.0e-6`, `num_train_epochs: 3`, `lr_scheduler_type: cosine`,
`warmup_ratio: 0.05`, `bf16: true`). LLaMA-Factory's Trainer calls the callback where deltakit
finetune biases: after accumulation, the reduction and clipping, once per optimizer step. Its
`deepspeed:` option is refused by the callback at bind time (use `fsdp` with FSDP2).

Versions: LLaMA-Factory 0.9.5 requires transformers >=4.55,<=5.6, trl <=0.24 and peft 0.18; deltakit is
developed and tested on transformers 5.24, where it cannot be installed, so this recipe is not run by
the tests. The callback it uses is the one tests/test_integrations.py runs under transformers' Trainer
and TRL's SFTTrainer (one process, DDP and FSDP2); it relies only on `TrainerCallback.on_train_begin`
and `on_pre_optimizer_step`, which every transformers version LLaMA-Factory 0.9.5 accepts (>= 4.55) has.
"""

import sys

import yaml
from llamafactory.train.tuner import run_exp

from deltakit.integrations import DriftCallback


def main(prior: str, config: str, rule: str = "adaptive", alpha: float = 1.0) -> None:
    with open(config) as f:
        args = yaml.safe_load(f)
    run_exp(args, callbacks=[DriftCallback(prior, rule=rule, alpha=alpha)])


if __name__ == "__main__":
    if len(sys.argv) not in (3, 5):
        sys.exit("usage: python commands/llamafactory-drift-qwen2.5-vl-7b.py PRIOR.safetensors LLAMAFACTORY_SFT.yaml [RULE ALPHA]")
    main(sys.argv[1], sys.argv[2], *(sys.argv[3:4]), *(float(a) for a in sys.argv[4:5]))
