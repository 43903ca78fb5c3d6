"""
Stage 3, offline: DPO (Rafailov et al. 2023). No rollout, no reward model in the loop, no critic: the policy
(initialised from the SFT model) learns straight from the ranked comparisons the reward model learned from, against
a frozen copy of the SFT model. For each prompt's K responses, ranked best first, the implicit reward of a response
is r(y) = β (log π(y|x) − log π_ref(y|x)), summed over its tokens, and

  dpo     loss = −log σ(r(y_w) − r(y_l)) over all C(K,2) pairs, averaged per prompt (InstructGPT's ranking loss on
          the implicit rewards: reward.ranking_loss);
  dpo_pl  the whole ranking's Plackett–Luce likelihood (DPO appendix A.3: reward.plackett_luce_loss);
  ipo     (ℓ_w − ℓ_l − 1/(2β))² with ℓ = log π − log π_ref (Azar et al. 2023: reward.ipo_ranking_loss).

Every log-prob is taken at the sampling temperature T, as in PPO (RLHF_DETAILS #4): π is the very distribution the
evaluation samples from, so the KL to the SFT model is measured as for PPO. At step 0 (π = π_ref) the DPO loss is
ln 2 for every pair (checked).

Reads --init_from (SFT checkpoint), preferences (--data / --val_data in the README's formats; with no --data, the
reward model's own comparisons, <--rm_dir>/comparisons_{train,val}.jsonl), and --reward_model (for the proxy score of
the evaluation only; empty: no proxy). Writes <out_dir>/ckpt.pt (stage "dpo": the policy, optimizer, RNG; atomic),
log.jsonl, evals.json, summary.json. On the built-in task it reports the implicit reward's pair accuracy against gold
on the held-out comparisons (DPO's implicit reward is itself a reward model) next to the policy's gold score.

  python train_dpo.py                                   # built-in task, after train_sft.py and train_rm.py
  python train_dpo.py --loss=ipo --beta=0.5
"""

import argparse
import math
import os
import time

import torch

import common as C
import reward
from model import GPT, GPTConfig, head_logprobs


def get_args(argv=None):
    p = C.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--init_from", default="out/sft/ckpt.pt", help="SFT checkpoint: the initial policy and the frozen reference")
    a("--data", default="", help="preference JSONL (pairs or K-way rankings); empty = <--rm_dir>/comparisons_train.jsonl")
    a("--val_data", default="", help="held-out preferences; empty = <--rm_dir>/comparisons_val.jsonl (or 5%% of --data)")
    a("--rm_dir", default="out/rm", help="the reward model's run folder, whose comparisons DPO learns from")
    a("--reward_model", default="out/rm/ckpt.pt", help="reward model for the evaluation's proxy score ('' = none)")
    a("--prompts", default="", help="held-out prompts JSONL for the evaluation; empty = the built-in task's")
    a("--out_dir", default="out/dpo")
    # the objective
    a("--loss", default="dpo", choices=["dpo", "dpo_pl", "ipo"], help="DPO over all pairs, DPO's Plackett–Luce "
                                                                      "form, or IPO")
    a("--beta", type=C.positive, default=0.1, help="β: the KL-constraint strength (the implicit reward's scale)")
    a("--temperature", type=C.positive, default=0.7, help="T of every log-prob (the PPO and evaluation T)")
    # optimisation
    a("--batch_size", type=C.count(), default=8, help="prompts per step (each with its K responses)")
    a("--epochs", type=C.positive, default=1.0, help="passes over the training comparisons")
    a("--learning_rate", type=C.positive, default=1e-4, help="peak learning rate")
    a("--min_lr", type=C.nonneg, default=0.0)
    a("--warmup_iters", type=C.count(0), default=10)
    a("--weight_decay", type=C.nonneg, default=0.0)
    a("--grad_clip", type=C.nonneg, default=1.0, help="clip the gradient's global norm (0 = off)")
    a("--max_tokens", type=C.count(0), default=0, help="truncate prompt+response to this many tokens (0 = block_size)")
    # evaluation and logging
    a("--eval_interval", type=C.count(), default=250, help="steps between evaluations (and checkpoints)")
    a("--n_eval_prompts", type=C.count(), default=256, help="held-out prompts sampled at each evaluation")
    a("--response_length", type=C.count(), default=64, help="max new tokens of the evaluation's samples")
    a("--missing_eos_penalty", type=C.number(float), default=-1.0, help="proxy score of a sample without EOS")
    a("--n_show", type=C.count(0), default=2, help="samples printed at each eval")
    a("--log_interval", type=C.count(), default=10)
    # system
    a("--device", default="auto")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bf16 autocast on CUDA")
    a("--threads", type=C.count(0), default=0, help="torch CPU threads (0 = torch's default)")
    a("--seed", type=int, default=1337)
    C.add_run_flags(a)
    args = p.parse_args(argv)
    for flag in ("data", "val_data", "prompts"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            C.fail(f"--{flag}={path}: no such file")
    if args.val_data and not args.data:
        C.fail("--val_data needs --data")
    return args


# ----------------------------------------------------------------------------------------------------------------
# the implicit reward


def sequence_logprobs(model, batch, temperature):
    """log π(y|x) of each response of a Comparisons batch, summed over the response's own tokens: (N, K), with 0 in
    the padding slots. Right padding: the causal mask alone keeps the padding unseen."""
    x, _, k, where, learn = batch
    h = model.hidden(x)[:, :-1]                                                        # (ΣK, T−1, C) predicts x[:, 1:]
    lp = head_logprobs(h, model.lm_head.weight, x[:, 1:], temperature, mask=learn[:, 1:]).sum(1)  # (ΣK,)
    return torch.where(where >= 0, lp[where.clamp(min=0)], 0.0), k                     # (N, K), (N,)


class SequenceLogprobs(torch.nn.Module):
    """sequence_logprobs as one module call, so that under torchrun DistributedDataParallel sees the forward."""

    def __init__(self, model, temperature):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, x, mask, k, where, learn):
        return sequence_logprobs(self.model, (x, mask, k, where, learn), self.temperature)


def loss_of(args, logratio, k):
    """The chosen objective on (N, K) log-ratios log π − log π_ref of ranked responses (best first)."""
    if args.loss == "ipo":
        return reward.ipo_ranking_loss(logratio, args.beta, k)
    if args.loss == "dpo_pl":
        return reward.plackett_luce_loss(args.beta * logratio, k)
    return reward.ranking_loss(args.beta * logratio, k)  # DPO over all C(K,2) pairs of each prompt


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    from data.formats import DataError, load_preferences, load_prompts
    from tokenizer import Tokenizer
    args = get_args(argv)
    rank, world = C.init_distributed(args)  # torchrun: one process per device, each prompt batch split by rank
    master = rank == 0                      # the one process that evaluates, logs and checkpoints
    device, dtype, ckpt_path = C.start_run(args)
    t_start = time.time()

    sft = C.load_checkpoint(args.init_from, "--init_from", kinds=("sft",))
    tok = Tokenizer.from_dict(sft["tokenizer"])
    config = GPTConfig(**{**sft["model_args"], "dropout": 0.0})
    policy, ref = GPT(config), GPT(config)
    policy.load_state_dict(sft["model"])
    ref.load_state_dict(sft["model"])
    policy.to(device).train()
    ref.to(device).eval().requires_grad_(False)  # fp32 weights like the policy: log π/π_ref is exactly 0 at step 0
    rm = mu = sigma = None
    if args.reward_model:
        rm_ckpt = C.load_checkpoint(args.reward_model, "--reward_model", kinds=("rm",), complete=True)
        if rm_ckpt.get("tokenizer") != sft.get("tokenizer"):
            C.fail(f"{args.init_from} and {args.reward_model} were trained with different tokenizers")
        rm, mu, sigma = reward.load_reward_model(rm_ckpt, device)
    max_tokens = args.max_tokens or config.block_size
    if max_tokens > config.block_size:
        C.fail(f"--max_tokens={max_tokens} is longer than the model's block_size={config.block_size}")

    builtin = not args.data
    train_path = args.data or os.path.join(args.rm_dir, "comparisons_train.jsonl")
    val_path = args.val_data or (os.path.join(args.rm_dir, "comparisons_val.jsonl") if builtin else "")
    if builtin and not os.path.isfile(train_path):
        C.fail(f"--rm_dir={args.rm_dir} has no comparisons_train.jsonl: run train_rm.py first, or pass --data")
    try:
        train_items = load_preferences(train_path)
        if val_path:
            val_items = load_preferences(val_path)
        else:  # hold out the first 5%
            if len(train_items) < 2:
                C.fail(f"{train_path}: its only record would go to the held-out split, leaving nothing to train on")
            cut = max(1, len(train_items) // 20)
            train_items, val_items = train_items[cut:], train_items[:cut]
        eval_prompts = None
        if args.prompts or builtin:
            eval_prompts = load_prompts(args.prompts or C.prepare_builtin(quiet=True)["prompts_val"])
            eval_prompts = eval_prompts[:args.n_eval_prompts]
    except DataError as e:
        C.fail(str(e))
    train_items, val_items = C.drop_ties(train_items, train_path), C.drop_ties(val_items, val_path or train_path)
    raw_val = None
    if builtin:  # the gold labeler reads each held-out response's text, in label order
        raw_val = [{"request": it["prompt"][-1]["content"], "responses": it["responses"]} for it in val_items]
    train = C.Comparisons(train_items, tok, max_tokens, train_path)
    val = C.Comparisons(val_items, tok, max_tokens, val_path or train_path)
    if master:
        print(f"DPO ({args.loss}, β = {args.beta}): {len(train.items)} train prompts ({train.n_pairs} pairs), "
              f"{len(val.items)} held-out ({val.n_pairs} pairs); policy {policy.get_num_params() / 1e6:.2f}M params")

    optimizer = policy.configure_optimizers(args.weight_decay, args.learning_rate, device_type=device.split(":")[0])
    global_batch = args.batch_size * world
    steps_per_epoch = math.ceil(len(train.items) / global_batch) if world == 1 else len(train.items) // global_batch
    if steps_per_epoch < 1:
        C.fail(f"{len(train.items)} training prompts are fewer than one global batch of {global_batch}")
    max_iters = max(1, round(args.epochs * steps_per_epoch))
    data_gen = torch.Generator().manual_seed(args.seed)
    order = train.epoch_order(global_batch, data_gen)
    start_iter, evals = 0, []
    if args.resume:
        ck = C.load_checkpoint(ckpt_path, "--resume", kinds=("dpo",))
        policy.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        C.set_rng_state(ck["rng"], data_gen)
        order, start_iter, evals = ck["order"], ck["iter"], ck["evals"]
        print(f"resuming {ckpt_path} at step {start_iter}")
    log = C.RunLog(args.out_dir, resume_step=start_iter if args.resume else None) if master else None
    fwd = C.ddp(SequenceLogprobs(policy, args.temperature), world, device)

    def save(it):
        if not master:
            return
        C.save_checkpoint(ckpt_path, {
            "stage": "dpo", "model": policy.state_dict(), "model_args": C.model_args(policy),
            "optimizer": optimizer.state_dict(), "iter": it, "order": order, "evals": evals, "args": vars(args),
            "tokenizer": tok.to_dict(), "rng": C.rng_state(data_gen), "complete": it == max_iters})

    @torch.no_grad()
    def run_eval(it):
        """The implicit reward's held-out pair accuracy (labels, gold), and the policy's samples on held-out prompts
        (gold, proxy, KL to the SFT model by k1 as for PPO)."""
        policy.eval()

        def implicit(batch):
            with C.autocast(device, dtype):
                lp, k = sequence_logprobs(policy, batch, args.temperature)
                ref_lp, _ = sequence_logprobs(ref, batch, args.temperature)
            return args.beta * (lp - ref_lp), k
        row = {"iter": it, **C.ranking_accuracy(implicit, val, args.batch_size, device, raw_val)}
        if eval_prompts is not None:
            ev = C.evaluate_policy(policy, ref, rm, mu, sigma, tok, eval_prompts, args, device, dtype, args.seed + 2,
                                   builtin, n_show=args.n_show)
            row.update({k: v for k, v in ev.items() if k != "samples"})
        policy.train()
        evals.append(row)
        C.write_json(os.path.join(args.out_dir, "evals.json"), evals)
        print(f"eval step {it} | " + " | ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                 if k != "iter" and isinstance(v, float)), flush=True)
        return row

    if not evals and master:
        run_eval(0)
    t_loop, steps_done = time.time(), 0
    for it in range(start_iter, max_iters):
        if it % args.eval_interval == 0 and it > 0 and master and evals[-1]["iter"] != it:
            run_eval(it)
            save(it)
        epoch_pos = (it % steps_per_epoch) * global_batch
        if it > 0 and it % steps_per_epoch == 0:  # a new epoch: a new order
            order = train.epoch_order(global_batch, data_gen)
        idx = order[epoch_pos:epoch_pos + global_batch][rank * args.batch_size:(rank + 1) * args.batch_size]
        lr = C.lr_at(it, max_iters, args.learning_rate, args.min_lr, args.warmup_iters, "cosine")
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        batch = train.batch(idx, device)
        with C.autocast(device, dtype):
            with torch.no_grad():
                ref_lp, _ = sequence_logprobs(ref, batch, args.temperature)           # (N, K)
            lp, k = fwd(*batch)                                                        # (N, K) with gradients
            logratio = lp.float() - ref_lp.float()                                     # (N, K) log π/π_ref
            loss = loss_of(args, logratio, k)
        if it == 0 and args.loss == "dpo":  # π = π_ref at the start: every pair's loss is exactly ln 2
            assert abs(loss.item() - math.log(2)) < 1e-5 * max(1, math.log(2)), \
                f"DPO at step 0: expected the loss ln 2 = 0.693147 (π = π_ref), found {loss.item():.6f}"
        loss.backward()
        loss_val = C.all_reduce_mean(loss.detach(), world).item()
        C.check_finite(loss_val, "DPO loss", it, ckpt_path)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        right, total = (world * C.all_reduce_mean(torch.tensor(reward.pair_accuracy(logratio.detach(), k),
                                                                dtype=torch.float64, device=device), world)).tolist()
        steps_done += 1
        row = {"step": it, "loss": loss_val, "accuracy": right / max(total, 1), "lr": lr,  # training pairs, pre-step
               "logratio/chosen": logratio[:, 0].mean().item(), "ms": (time.time() - t0) * 1000}
        line = None
        if it % args.log_interval == 0 or it == max_iters - 1:
            line = (f"dpo step {it}/{max_iters} | loss {loss_val:.4f} | acc {row['accuracy']:.3f} | lr {lr:.2e} | "
                    f"{row['ms']:.0f}ms | eta {C.eta(t_loop, steps_done, max_iters - start_iter)}")
        if master:
            log.log(row, line)
        if args.stop_after and steps_done >= args.stop_after and it + 1 < max_iters:
            save(it + 1)
            print(f"stopping after {steps_done} steps (--stop_after); continue with --resume=1")
            return C.finish_distributed(world)
    if not master:
        return C.finish_distributed(world)
    final = run_eval(max_iters)
    save(max_iters)
    before = evals[0]
    summary = {"seconds": time.time() - t_start, "iters": max_iters, "loss": args.loss, "beta": args.beta,
               "train_prompts": len(train.items), "train_pairs": train.n_pairs,
               **{f"{k}_before": v for k, v in before.items() if k != "iter"},
               **{f"{k}_after": v for k, v in final.items() if k != "iter"}, "peak_memory_mb": C.peak_memory_mb(device)}
    C.write_json(os.path.join(args.out_dir, "summary.json"), summary)
    print("summary: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    C.finish_distributed(world)


if __name__ == "__main__":
    main()
