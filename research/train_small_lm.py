"""Train a small decoder LM of another family from scratch, offline, to check the pruning methods on a
real trained model that is not SmolLM2.

No second pretrained model installs offline (`../shared/ASSETS.md`), and random weights have none of
the structure pruning exploits (correlated inputs, outlier features). This trains one on the calibration
part of the offline Wikipedia text (the evaluation part stays held out): a byte-level BPE tokenizer of
`--vocab` tokens, then an OPT model (LayerNorm, fc1/fc2, biases, ReLU, learned positions) by default, or
Qwen2 (GQA, q/k/v biases). The folder it writes loads with `AutoModelForCausalLM` and can be passed to
`benchmarks/bench_pruning.py --model`.

    OMP_NUM_THREADS=1 python research/train_small_lm.py --family opt --out /tmp/opt-small --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from optimum_permllm.data.assets import wikipedia_split
from optimum_permllm.data.calibration import tokenize_text


def train_tokenizer(text: str, vocab: int):
    """A byte-level BPE tokenizer trained on `text`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.split("\n\n"), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_model(family: str, vocab: int, hidden: int, layers: int, seq_len: int, eos: int):
    """A small causal LM of `family` (opt or qwen2) with untied input and output embeddings."""
    from transformers import AutoModelForCausalLM, OPTConfig, Qwen2Config

    if family == "opt":
        config = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
                           num_attention_heads=hidden // 64, max_position_embeddings=seq_len,
                           word_embed_proj_dim=hidden, dropout=0.0, attention_dropout=0.0,
                           bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False)
    elif family == "qwen2":
        config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                             intermediate_size=3 * hidden, num_attention_heads=hidden // 64,
                             num_key_value_heads=max(1, hidden // 192), max_position_embeddings=seq_len,
                             bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    else:
        raise ValueError(f"Unknown family {family!r}: choose opt or qwen2.")
    return AutoModelForCausalLM.from_config(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="opt", choices=["opt", "qwen2"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    text = wikipedia_split("calibration")
    tokenizer = train_tokenizer(text, args.vocab)
    ids = tokenize_text(text, tokenizer)
    model = build_model(args.family, len(tokenizer), args.hidden, args.layers, args.seq_len, tokenizer.eos_token_id)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    start, log = time.perf_counter(), []
    for step in range(args.steps):
        offsets = torch.randint(0, ids.numel() - args.seq_len - 1, (args.batch,))
        batch = torch.stack([ids[o:o + args.seq_len] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 3), "seconds": round(time.perf_counter() - start)})
            print(json.dumps(log[-1]), flush=True)
    model.eval().save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"family": args.family, "parameters": sum(p.numel() for p in model.parameters()),
                      "train_tokens": args.steps * args.batch * args.seq_len, "text_tokens": ids.numel(),
                      "seconds": round(time.perf_counter() - start), "out": args.out}), flush=True)


if __name__ == "__main__":
    main()
