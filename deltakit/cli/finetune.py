"""``deltakit finetune``: SFT of an MLLM, with the DRIFT gradient bias when a prior is given."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.table import Table

from deltakit.cli._common import console, json_option, progress_bar, write_json
from deltakit.drift_rules import RULES
from deltakit.train.config import BIAS_AT, BIAS_ORDERS, CACHE_PIXELS, CUTOFF_POLICIES, FREEZABLE, PRECISIONS, SAVE_DTYPES, STRATEGIES, TrainConfig


def _opt(*names: str, **kw):
    return click.option(*names, default=None, show_default=False, **kw)


@click.command("finetune")
@_opt("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
      help="YAML file with any of the options below (keys are the option names with underscores); flags override it.")
@_opt("--model", help="The MLLM folder (Hugging Face format) to fine-tune.")
@_opt("--data", help="Training JSONL (sharegpt `messages` + `images`, or typed content); images relative to it.")
@_opt("--out", help="Output folder: the fine-tuned model in its own format, with processor files and the log (LoRA: the PEFT adapter).")
@_opt("--prior", help="DRIFT prior from `deltakit prior`; without it the run is plain SFT.")
@_opt("--rule", type=click.Choice(RULES), help="DRIFT rule [adaptive].")
@_opt("--alpha", type=float, help="DRIFT strength a (0 = plain SFT, bit for bit) [1.0].")
@_opt("--bias-order", type=click.Choice(BIAS_ORDERS),
      help="Apply the DRIFT bias after clipping or before it (clipping then acts on g - cD); auto = before_clip for absolute, "
           "after_clip for gradnorm/adaptive [auto].")
@_opt("--bias-at", type=click.Choice(BIAS_AT),
      help="step: bias the reduced gradient once per step; micro_batch: bias each micro-batch's local gradient in backward, "
           "the public DRIFT code's placement, for reproducing its numbers (not with FSDP) [step].")
@_opt("--prior-device", type=click.Choice(["auto", "cpu"]), help="Keep D on the training device (auto) or in CPU memory [auto].")
@_opt("--epochs", type=int, help="Epochs [3].")
@_opt("--max-steps", type=int, help="Optimizer steps; overrides --epochs.")
@_opt("--lr", type=float, help="Peak learning rate [1e-6].")
@_opt("--batch-size", type=int, help="Examples per micro-batch and process [1].")
@_opt("--grad-accum", type=int, help="Micro-batches per optimizer step [1].")
@_opt("--warmup-ratio", type=float, help="Fraction of steps of linear warmup before the cosine decay [0.05].")
@_opt("--weight-decay", type=float, help="AdamW weight decay [0].")
@_opt("--adam-betas", help="AdamW betas as 'b1,b2' [0.9,0.999].")
@_opt("--adam-eps", type=float, help="AdamW epsilon [1e-8].")
@_opt("--max-grad-norm", type=float, help="Clip the gradient to this norm (the data gradient, or g - cD with --bias-order before_clip), 0 to disable [1.0].")
@_opt("--cutoff-len", type=int, help="Longest example in tokens; longer ones follow --cutoff-policy (prompt and image tokens are never cut).")
@_opt("--cutoff-policy", type=click.Choice(CUTOFF_POLICIES),
      help="truncate: cut the answer (or drop whole later turns) to fit, dropping examples whose prompt or images do not fit; "
           "drop: drop every longer example. Counts are logged and in the summary [truncate].")
@click.option("--enable-thinking/--disable-thinking", default=None,
              help="Pass enable_thinking to the chat template (Qwen3's thinking mode); unset = the template's default.")
@click.option("--group-by-length/--no-group-by-length", default=None,
              help="Put examples of similar length in the same step (seeded; less padding) [off].")
@click.option("--packing/--no-packing", default=None,
              help="Concatenate each micro-batch's examples into one row, no padding, no cross-attention (Qwen2-VL, Qwen2.5-VL) [off].")
@_opt("--num-workers", type=int, help="DataLoader worker processes for the batches and the data cache's build; 0 = in the training process "
      "[auto: CPU cores per process - 1, at most 4; the build: cores - 1, at most 8, none on 2 cores].")
@_opt("--cache-dir", help="Data cache folder [$DELTAKIT_CACHE_DIR, else $XDG_CACHE_HOME/deltakit, else ~/.cache/deltakit].")
@_opt("--cache-pixels", type=click.Choice(CACHE_PIXELS),
      help="How the data cache stores pixel values: bfloat16 (half of float32; exactly what a bf16 Qwen2-VL / Qwen2.5-VL run sees), "
           "float32 (as the processor makes them), none (recomputed from the images in the loader workers) "
           "[auto: bfloat16 when exact for the run, else float32].")
@_opt("--precision", type=click.Choice(PRECISIONS), help="auto = bf16 on a GPU that has it, else fp32 [auto].")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None, help="Recompute activations in backward [off].")
@_opt("--freeze", help=f"Comma-separated roles to freeze, from {', '.join(FREEZABLE)}; '' freezes nothing [vision,projector].")
@_opt("--strategy", type=click.Choice(STRATEGIES), help="Multi-process strategy under torchrun: ddp or fsdp (FSDP2) [auto = ddp].")
@_opt("--seed", type=int, help="Seed of initialisation-free randomness and the data order [0].")
@_opt("--save-every", type=int, help="Save a resumable checkpoint every N steps, 0 = never [0].")
@_opt("--keep-checkpoints", type=int, help="Keep the newest N checkpoints [2].")
@_opt("--save-dtype", type=click.Choice(SAVE_DTYPES), help="dtype of the saved weights; auto = the base model's [auto].")
@_opt("--lora-rank", type=int, help="Train PEFT LoRA adapters of this rank instead of the full weights; 0 = full fine-tuning [0].")
@_opt("--lora-alpha", type=float, help="LoRA alpha: the update is (lora_alpha / rank) B A, as in PEFT [2 x rank].")
@_opt("--lora-targets", help="Module kinds to adapt, the grammar of `deltakit prior --modules` (attn, mlp, attn.q, mlp.down, ...); "
      "text tower linear layers only [attn,mlp: q/k/v/o/gate/up/down].")
@click.option("--merge-lora", is_flag=True, default=None, help="Also save the merged model (W + s B A) in the MLLM's format in OUT/merged.")
@click.option("--skip-frozen", is_flag=True, default=None,
              help="Leave out prior tensors on frozen parameters with no LoRA adapter (e.g. q/k/v biases under LoRA) instead of failing.")
@_opt("--family", help="Override the detected model family.")
@_opt("--run-dir", help="Folder for checkpoints and the live log [OUT.run].")
@_opt("--log-every", type=int, help="Write every N-th step to the JSONL log [1].")
@click.option("--resume", is_flag=True, default=None, help="Continue from the newest checkpoint in the run folder.")
@click.option("--force", is_flag=True, default=None, help="Replace an existing output and discard old checkpoints.")
@json_option
def command(config_file: Path | None, json_path: Path | None, **flags) -> None:
    """Fine-tune an MLLM (full SFT, vision tower frozen); with --prior, bias each step toward the reasoning model (DRIFT).

    With --lora-rank R, train PEFT LoRA adapters on the text tower instead; DRIFT then biases each adapter's
    factors with the prior projected on them (s B^T D, s D A^T).

    Multi-GPU: torchrun --nproc-per-node N -m deltakit finetune ... [--strategy fsdp].
    """
    from deltakit.train import finetune

    config = TrainConfig.load(config_file, **flags)
    with progress_bar() as progress:
        result = finetune(config, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    table = Table(show_header=False, box=None)
    table.add_row("output", str(result.out))
    table.add_row("steps", f"{result.steps} (global batch {result.global_batch}" + (f", resumed at {result.resumed_from})" if result.resumed_from else ")"))
    table.add_row("final loss", f"{result.final_loss:.4f}")
    skipped = f" ({result.drift_skipped} skipped: frozen, no adapter)" if result.drift_skipped else ""
    table.add_row("DRIFT", f"{config.rule}, alpha {config.alpha:g}: {result.drift_tensors} tensors, "
                           f"{result.drift_params:,} parameters{skipped}"
                  if config.prior else "off (plain SFT)")
    if config.lora_rank:
        table.add_row("LoRA", f"rank {config.lora_rank}, alpha {config.resolved_lora_alpha:g} on {result.lora_modules} modules: adapter in "
                      f"{result.out}" + (f", merged model in {result.out / 'merged'}" if config.merge_lora else ""))
    data = result.data
    if "counts" in data:
        counts = data["counts"]
        dropped = sum(v for k, v in counts.items() if k.startswith("dropped"))
        table.add_row("data", f"{data['examples']} examples from the cache {data['cache']} (pixels: {data['cache_pixels']})"
                      + (f"; cutoff {data['cutoff_len']}: {counts['truncated']} truncated, {dropped} dropped" if data["cutoff_len"] else ""))
    table.add_row("curves", f"{result.out / 'train_curves.png'}, TensorBoard: tensorboard --logdir {result.out / 'runs'}")
    table.add_row("time", f"{result.seconds:.1f} s")
    console.print(table)
    write_json(json_path, result)
