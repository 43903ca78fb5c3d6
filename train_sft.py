"""
Stage 1: supervised fine-tuning (SFT). A GPT learns to imitate demonstrations (InstructGPT §3.5), or, on plain
text, simply learns the language (pretraining).

Two data modes, picked by the file:
  chat JSONL (.jsonl / .jsonl.gz, the SFT formats in the README): loss only on the assistant's tokens, EOS included;
  plain text (.txt): language modelling on every token of random windows.
With no --data it trains on the built-in task (data/minichat.py), generating it on first use.

Reads --data / --val_data (or the built-in task), --init_from (scratch, gpt2*, or one of our checkpoints).
Writes <out_dir>/ckpt.pt (model, optimizer, config, step, RNG states, tokenizer; atomic), log.jsonl (a line per
step and per eval) and summary.json (val_loss, seconds; on the built-in task gold_mean, gold_std, well_formed).

  python train_sft.py                                   # built-in task, small model, CPU, ~2-3 minutes
  python train_sft.py --data=data/shakespeare/train.txt --val_data=data/shakespeare/val.txt --tokenizer=gpt2 \
      --out_dir=out/shakespeare
  python train_sft.py --init_from=gpt2 --data=data/hh_rlhf/sft_train.jsonl --val_data=data/hh_rlhf/sft_val.jsonl
"""

import argparse
import math
import os
import time

import torch

import common as C
from model import GPT, GPTConfig


def get_args(argv=None):
    p = C.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data
    a("--data", default="", help="training data: chat .jsonl[.gz] or plain .txt; empty = the built-in task")
    a("--val_data", default="", help="held-out data, same format; empty = built-in held-out split, or the last "
                                     "5%% of --data")
    a("--tokenizer", default="", help="'gpt2' or a saved BPE file; empty = the checkpoint's, else the built-in BPE")
    a("--init_from", default="scratch", help="scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | path/to/ckpt.pt")
    a("--out_dir", default="out/sft", help="run folder (checkpoint, logs, summary)")
    # model, when training from scratch (a checkpoint or GPT-2 brings its own)
    a("--n_layer", type=C.count(), default=4)
    a("--n_head", type=C.count(), default=4)
    a("--n_embd", type=C.count(), default=128)
    a("--block_size", type=C.count(0), default=0, help="context length in tokens (0 = 256 from scratch, else the "
                                               "checkpoint's; smaller crops the training sequences)")
    a("--dropout", type=C.number(float, 0, 1, hi_open=True), default=0.0)
    a("--attn_impl", default="sdpa", choices=["sdpa", "explicit"])
    # optimisation
    a("--batch_size", type=C.count(), default=64, help="sequences per micro-batch")
    a("--grad_accum", type=C.count(), default=1, help="micro-batches per optimizer step")
    a("--max_iters", type=C.count(), default=800, help="optimizer steps")
    a("--learning_rate", type=C.positive, default=4e-3, help="peak learning rate")
    a("--min_lr", type=C.nonneg, default=1e-4, help="learning rate at the end of the decay")
    a("--warmup_iters", type=C.count(0), default=50)
    a("--decay", default="cosine", choices=["cosine", "linear", "constant"])
    a("--weight_decay", type=C.nonneg, default=0.1)
    a("--beta1", type=C.number(float, 0, 1, hi_open=True), default=0.9)
    a("--beta2", type=C.number(float, 0, 1, hi_open=True), default=0.95)
    a("--grad_clip", type=C.nonneg, default=1.0, help="clip the gradient's global norm (0 = off)")
    # evaluation and logging
    a("--eval_interval", type=C.count(), default=400, help="steps between evaluations (and checkpoints)")
    a("--eval_iters", type=C.count(), default=10, help="held-out batches per evaluation")
    a("--log_interval", type=C.count(), default=10, help="steps between printed lines (log.jsonl gets every step)")
    a("--n_eval_prompts", type=C.count(), default=256, help="built-in task: held-out prompts sampled at each eval")
    a("--n_show", type=C.count(0), default=2, help="samples printed at each eval")
    a("--max_new_tokens", type=C.count(), default=64, help="response length limit when sampling")
    a("--temperature", type=C.positive, default=0.7, help="sampling temperature T of the eval samples (the same T "
                                                        "as the RM collection and PPO)")
    # system
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bf16 on CUDA")
    a("--compile", type=C.flag01, default=0, help="1: torch.compile the model")
    a("--threads", type=C.count(0), default=0, help="torch CPU threads (0 = torch's default)")
    a("--seed", type=int, default=1337)
    C.add_run_flags(a)
    args = p.parse_args(argv)
    if args.n_embd % args.n_head:
        C.fail(f"--n_embd={args.n_embd} is not divisible by --n_head={args.n_head}")
    if args.min_lr > args.learning_rate:
        C.fail(f"--min_lr={args.min_lr} is above --learning_rate={args.learning_rate}")
    for flag in ("data", "val_data"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            C.fail(f"--{flag}={path}: no such file")
        if path and not path.endswith((".txt", ".jsonl", ".jsonl.gz")):
            C.fail(f"--{flag}={path}: expected a .txt (plain text) or .jsonl[.gz] (chat) file")
    if args.val_data and bool(args.data.endswith(".txt")) != bool(args.val_data.endswith(".txt")):
        C.fail("--data and --val_data must be of the same kind (both .txt or both .jsonl)")
    return args


# ----------------------------------------------------------------------------------------------------------------
# data


class TextData:
    """One long token stream; a batch is random windows of block_size + 1 tokens (every token is a target)."""

    def __init__(self, tokens, block_size, where):
        self.tokens = torch.tensor(tokens, dtype=torch.long)
        self.block_size = block_size
        self.n_tokens = len(tokens)
        if len(tokens) <= block_size + 1:
            C.fail(f"{where}: only {len(tokens)} tokens, fewer than --block_size+2={block_size + 2}")

    def batch(self, batch_size, step, seed, device):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(len(self.tokens) - self.block_size - 1, (batch_size,), generator=g)
        w = torch.stack([self.tokens[s:s + self.block_size + 1] for s in starts.tolist()])  # (B, T+1)
        return w[:, :-1].to(device), w[:, 1:].to(device)


def read_text(path):
    """A plain-text file's contents; bytes that are not UTF-8 are one line naming the file and the offset."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        C.fail(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}): a binary file, or "
               "another encoding?")


def load_data(args, tok, block_size):
    """(train, val) datasets for the flags, plus the built-in task's held-out prompts (or None)."""
    from data.formats import DataError, load_prompts, load_sft
    builtin = None
    train_path, val_path = args.data, args.val_data
    if not train_path:
        builtin = C.prepare_builtin()
        train_path, val_path = builtin["sft_train"], builtin["sft_val"]
    try:
        if train_path.endswith(".txt"):
            tokens = tok.encode(read_text(train_path))
            if val_path:
                val_tokens = tok.encode(read_text(val_path))
            else:  # the last 5% of the text is held out
                cut = int(len(tokens) * 0.95)
                tokens, val_tokens = tokens[:cut], tokens[cut:]
            return TextData(tokens, block_size, train_path), TextData(val_tokens, block_size, val_path or train_path), None
        convs = load_sft(train_path)
        if val_path:
            val_convs = load_sft(val_path)
        else:
            if len(convs) < 2:
                C.fail(f"{train_path}: its only record would go to the held-out split (5% of --data, at least one "
                       "record), leaving nothing to train on: give more data, or --val_data")
            cut = max(1, int(len(convs) * 0.05))
            convs, val_convs = convs[cut:], convs[:cut]
        prompts = load_prompts(builtin["prompts_val"]) if builtin else None
    except DataError as e:
        C.fail(str(e))
    return C.ChatData(convs, tok, block_size, train_path), C.ChatData(val_convs, tok, block_size, val_path), prompts


# ----------------------------------------------------------------------------------------------------------------
# model


def build_model(args, tok, device):
    """The model and the tokenizer, from scratch, from GPT-2, or from one of our checkpoints."""
    from tokenizer import Tokenizer
    if args.init_from == "scratch":
        vocab = tok.vocab_size
        vocab = (vocab + 63) // 64 * 64  # round up for efficient matmuls (nanoGPT's 50304 for GPT-2's 50257)
        model = GPT(GPTConfig(block_size=args.block_size or 256, vocab_size=vocab, n_layer=args.n_layer, n_head=args.n_head,
                              n_embd=args.n_embd, dropout=args.dropout, attn_impl=args.attn_impl))
    elif args.init_from.startswith("gpt2"):
        if tok.vocab_size - 1 > 50257 or tok.eos_id != 50256:
            C.fail(f"--init_from={args.init_from} needs --tokenizer=gpt2")
        model = GPT.from_pretrained(args.init_from, dropout=args.dropout)
    else:
        what = "--resume" if args.resume else "--init_from"
        ckpt = C.load_checkpoint(args.init_from, what, kinds=("sft",))
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        if tok is None:
            tok = Tokenizer.from_dict(ckpt["tokenizer"])
        elif tok.to_dict() != ckpt["tokenizer"]:  # the model's ids mean other strings under another tokenizer
            C.fail(f"--tokenizer={args.tokenizer} is not the tokenizer {args.init_from} was trained with "
                   f"({ckpt['tokenizer'].get('name')}): leave --tokenizer empty to use the checkpoint's")
    if tok.vocab_size > model.config.vocab_size + 1:  # PAD (the last id) may lie outside the model's vocabulary
        C.fail(f"the tokenizer has {tok.vocab_size} ids but the model only {model.config.vocab_size}")
    return model.to(device), tok


def pick_tokenizer(args):
    """--tokenizer if given; else a checkpoint brings its own (None here), GPT-2 weights bring GPT-2's encoding,
    and the built-in task has its trained BPE."""
    from tokenizer import get_tokenizer
    if args.tokenizer:
        try:
            return get_tokenizer(args.tokenizer)
        except (OSError, ValueError) as e:
            C.fail(f"--tokenizer={args.tokenizer}: {e}")
    if args.init_from.startswith("gpt2"):
        return get_tokenizer("gpt2")
    if args.init_from != "scratch":
        return None
    if not args.data:
        return get_tokenizer(C.prepare_builtin()["tokenizer"])
    C.fail("--data needs --tokenizer (gpt2, or a saved BPE file) when training from scratch")


# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, val, args, device, dtype, tok, prompts, step):
    """Held-out loss over fixed batches; on the built-in task also gold score and well-formedness of samples."""
    model.eval()
    losses = []
    for i in range(args.eval_iters):  # the same held-out batches at every eval
        x, y = val.batch(args.batch_size, i, args.seed + 7, device)
        with C.autocast(device, dtype):
            _, loss = model(x, targets=y)
        losses.append(loss.item())
    row = {"step": step, "val_loss": sum(losses) / len(losses)}
    print(f"eval step {step} | val_loss {row['val_loss']:.4f}", end="")
    if prompts is not None:
        from tokenizer import render_prompt
        ps = prompts[:args.n_eval_prompts]
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        samples = C.sample_texts(model, tok, [render_prompt(tok, m) for m in ps], args.max_new_tokens, gen,
                                 args.temperature, device=device, dtype=dtype)
        rep = C.gold_report([m[-1]["content"] for m in ps], samples)
        row.update({k: rep[k] for k in ("gold_mean", "gold_std", "well_formed")})
        print(f" | gold {rep['gold_mean']:.3f} ± {rep['gold_std']:.3f} | well formed {rep['well_formed']:.1%}", end="")
    print(flush=True)
    if prompts is not None:
        C.show_samples([m[-1]["content"] for m in ps], samples, args.n_show)
    model.train()
    return row


def main(argv=None):
    args = get_args(argv)
    rank, world = C.init_distributed(args)  # torchrun: one process per device, data split by rank
    master = rank == 0                      # the one process that evaluates, logs and writes checkpoints
    device, dtype, ckpt_path = C.start_run(args)
    t_start = time.time()

    resume_ckpt = None
    if args.resume:
        resume_ckpt = C.load_checkpoint(ckpt_path, "--resume", kinds=("sft",))
        args.init_from, args.tokenizer = ckpt_path, ""  # rebuild the model from it; its tokenizer too
    tok = pick_tokenizer(args)
    model, tok = build_model(args, tok, device)
    block_size = model.config.block_size
    if args.block_size > block_size:
        C.fail(f"--block_size={args.block_size} is longer than the model's block_size={block_size}")
    block_size = args.block_size or block_size
    train, val, prompts = load_data(args, tok, block_size)
    if master:
        print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {model.config}")
        print(f"data: {train.n_tokens:,} train tokens, {val.n_tokens:,} held-out tokens; tokenizer of {tok.vocab_size} "
              f"ids" + (f"; {world} processes, {args.batch_size} sequences each" if world > 1 else ""))

    optimizer = model.configure_optimizers(args.weight_decay, args.learning_rate, (args.beta1, args.beta2),
                                           device_type=device.split(":")[0])
    start_iter = 0
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        C.set_rng_state(resume_ckpt["rng"])
        start_iter = resume_ckpt["iter"]
        print(f"resuming {ckpt_path} at step {start_iter}")
    log = C.RunLog(args.out_dir, resume_step=start_iter if args.resume else None) if master else None
    fwd = C.ddp(model, world, device)
    fwd = torch.compile(fwd) if args.compile else fwd

    def save(it):
        if not master:
            return
        C.save_checkpoint(ckpt_path, {
            "stage": "sft", "model": model.state_dict(), "model_args": C.model_args(model),
            "optimizer": optimizer.state_dict(), "iter": it, "args": vars(args), "tokenizer": tok.to_dict(),
            "rng": C.rng_state(), "complete": it == args.max_iters})

    model.train()
    t_loop, steps_done = time.time(), 0
    for it in range(start_iter, args.max_iters):
        if it % args.eval_interval == 0 and it > 0 and master:  # on a resume at an eval step it is redone
            ev = evaluate(model, val, args, device, dtype, tok, prompts, it)
            C.check_finite(ev["val_loss"], "held-out loss", it, ckpt_path)
            log.log(ev, None)
            save(it)
        lr = C.lr_at(it, args.max_iters, args.learning_rate, args.min_lr, args.warmup_iters, args.decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            # every process draws the same global batch and keeps its own rows of it
            x, y = train.batch(args.batch_size * world, it * args.grad_accum + micro, args.seed, device)
            x, y = x[rank * args.batch_size:(rank + 1) * args.batch_size], y[rank * args.batch_size:(rank + 1) * args.batch_size]
            with C.autocast(device, dtype):
                _, loss = fwd(x, targets=y)
            if world > 1:  # weigh each process's mean by its share of the global batch's target tokens
                n_tok = (y != -1).sum().float()
                loss = loss * n_tok / C.all_reduce_mean(n_tok, world)
            (loss / args.grad_accum).backward()
            loss_sum += C.all_reduce_mean(loss.detach(), world).item() / args.grad_accum
        C.check_finite(loss_sum, "training loss", it, ckpt_path)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        steps_done += 1
        row = {"step": it, "loss": loss_sum, "lr": lr, "grad_norm": float(gnorm), "ms": dt * 1000}
        line = None
        if it % args.log_interval == 0 or it == args.max_iters - 1:
            line = (f"sft step {it}/{args.max_iters} | loss {loss_sum:.4f} | lr {lr:.2e} | {dt * 1000:.0f}ms | "
                    f"eta {C.eta(t_loop, steps_done, args.max_iters - start_iter)}")
        if master:
            log.log(row, line)
        if args.stop_after and steps_done >= args.stop_after and it + 1 < args.max_iters:
            save(it + 1)
            print(f"stopping after {steps_done} steps (--stop_after); continue with --resume=1")
            return C.finish_distributed(world)
    if not master:
        return C.finish_distributed(world)
    final = evaluate(model, val, args, device, dtype, tok, prompts, args.max_iters)
    log.log(final, None)
    save(args.max_iters)
    summary = {"val_loss": final["val_loss"], "seconds": time.time() - t_start, "iters": args.max_iters,
               "params": model.get_num_params(), "train_tokens": train.n_tokens}
    for k in ("gold_mean", "gold_std", "well_formed"):
        if k in final:
            summary[k] = final[k]
    C.write_json(os.path.join(args.out_dir, "summary.json"), summary)
    print("summary: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    C.finish_distributed(world)


if __name__ == "__main__":
    main()
