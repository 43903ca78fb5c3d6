"""
Stage 2: the reward model. A GPT with a scalar head learns human preferences from ranked responses
(InstructGPT §3.5): the loss over all C(K,2) pairs of K ranked answers per prompt (reward.py).

Data, by flags:
  --data=pairs.jsonl[.gz]  preferences in any of the README's formats: HH-RLHF `chosen`/`rejected` conversations,
                           explicit `prompt`/`chosen`/`rejected`, or K-way `prompt`/`responses`/`ranking`;
  no --data                the built-in task, collected as InstructGPT did: K responses per prompt sampled from the
                           SFT policy, ranked by the noisy labeler (data/minichat.py), written to JSONL first
                           (<out_dir>/comparisons_{train,val}.jsonl) so the data can be inspected and reused.

Trains about one epoch with an annealed learning rate, reports held-out pairwise accuracy (and, on the built-in
task, accuracy against the noise-free gold ordering next to the labeler's own agreement with gold), then measures
μ, σ of its scores on fresh SFT samples and stores them in the checkpoint, so normalised scores of SFT samples
have mean 0 and std 1 (RLHF_DETAILS #13).

Reads --init_from (default out/sft/ckpt.pt). Writes <out_dir>/ckpt.pt, log.jsonl, summary.json.

  python train_rm.py                                     # built-in task, after train_sft.py
  python train_rm.py --data=data/hh_rlhf/pairs_train.jsonl --val_data=data/hh_rlhf/pairs_val.jsonl
"""

import argparse
import json
import math
import os
import random
import time

import torch

import common as C
import reward
from model import GPT, GPTConfig, GPTScalar


def get_args(argv=None):
    p = C.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default="", help="preference JSONL (pairs or K-way rankings); empty = collect on the built-in task")
    a("--val_data", default="", help="held-out preferences; empty = built-in held-out collection, or 5%% of --data")
    a("--init_from", default="out/sft/ckpt.pt", help="SFT checkpoint: the trunk, the tokenizer and the sampler")
    a("--out_dir", default="out/rm")
    # collection on the built-in task (InstructGPT's pipeline)
    a("--n_prompts", type=C.count(), default=4000, help="built-in: train prompts to collect comparisons on")
    a("--n_val_prompts", type=C.count(), default=300, help="built-in: held-out prompts to collect comparisons on")
    a("--K", type=C.count(2), default=8, help="built-in: responses ranked per prompt, at least 2 (InstructGPT: 4 ≤ K ≤ 9); "
      "each answer is forwarded once for its K − 1 pairs, so K = 8 gives 3.5 pairs per sampled answer where K = 4 gives 1.5")
    a("--label_temperature", type=C.positive, default=1.0, help="built-in: the noisy labeler's Plackett–Luce temperature")
    a("--max_new_tokens", type=C.count(), default=64, help="response length limit when sampling")
    a("--temperature", type=C.positive, default=0.7, help="sampling temperature T (the same T as PPO will use)")
    a("--recollect", type=C.flag01, default=0, help="1: collect again even if the comparison files exist")
    # iterated RLHF (InstructGPT collected its later comparisons from the current policies)
    a("--collect_from", default="", help="built-in: the policy the comparisons are sampled from (an SFT, PPO or DPO "
      "checkpoint; empty = --init_from). Round 2: the PPO policy, so the comparisons cover what PPO produces")
    a("--prior_data", default="", help="comparisons of an earlier round (its comparisons_train.jsonl), trained on "
      "together with this round's")
    # ensembles (Coste et al. 2024)
    a("--members", type=C.count(), default=1, help="N reward models trained on the same comparisons, each from the "
      "SFT trunk with its own head initialisation and data order: <out_dir>/ckpt.pt, ckpt1.pt, ... (an ensemble for "
      "train_ppo.py --reward_model=a,b,...)")
    # optimisation
    a("--batch_size", type=C.count(), default=8, help="prompts per step (each with its K responses)")
    a("--epochs", type=C.positive, default=1.0, help="passes over the training comparisons (about 1: RLHF_DETAILS #12)")
    a("--learning_rate", type=C.positive, default=5e-4, help="peak learning rate")
    a("--min_lr", type=C.nonneg, default=0.0)
    a("--warmup_iters", type=C.count(0), default=10)
    a("--weight_decay", type=C.nonneg, default=0.0)
    a("--dropout", type=C.number(float, 0, 1, hi_open=True), default=0.0, help="dropout while training the reward model (off when it scores)")
    a("--grad_clip", type=C.nonneg, default=1.0)
    a("--max_tokens", type=C.count(0), default=0, help="truncate prompt+response to this many tokens (0 = block_size)")
    # evaluation and normalisation
    a("--eval_interval", type=C.count(), default=200, help="steps between held-out evaluations (and checkpoints)")
    a("--n_norm", type=C.count(0), default=512, help="SFT samples used to measure the normalisation μ, σ (0 = skip)")
    a("--log_interval", type=C.count(), default=10)
    # system
    a("--device", default="auto")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    a("--compile", type=C.flag01, default=0, help="1: torch.compile the reward model")
    a("--threads", type=C.count(0), default=0)
    a("--seed", type=int, default=1337)
    C.add_run_flags(a)
    args = p.parse_args(argv)
    for flag in ("data", "val_data", "prior_data", "collect_from"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            C.fail(f"--{flag}={path}: no such file")
    if args.val_data and not args.data:
        C.fail("--val_data needs --data")
    if args.collect_from and args.data:
        C.fail("--collect_from samples the built-in task's comparisons: it does not go with --data")
    return args


# ----------------------------------------------------------------------------------------------------------------
# collecting comparisons on the built-in task


def collect(policy, tok, requests, K, label_temperature, max_new_tokens, temperature, seed, device, dtype):
    """K samples per prompt from the SFT policy, ranked by the noisy labeler. Only responses that ended with EOS
    are kept (PPO never asks the reward model about the others: they get the missing-EOS penalty instead), so a
    prompt may keep fewer than K (the ranking loss takes any K ≥ 2 per prompt); one with fewer than 2 is dropped."""
    from data import minichat
    from tokenizer import render_prompt
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = random.Random(seed)
    prompts = [render_prompt(tok, [{"role": "user", "content": r}], max_tokens=policy.config.block_size - max_new_tokens)
               for r in requests]
    samples = C.sample_texts(policy, tok, [p for p in prompts for _ in range(K)], max_new_tokens, gen,
                             temperature, batch_size=256, device=device, dtype=dtype)
    rows = []
    for n, request in enumerate(requests):
        responses = [text for text, eos in samples[n * K:(n + 1) * K] if eos and text.strip()]
        if len(responses) < 2:
            continue
        rows.append({"prompt": request, "responses": responses,
                     "ranking": minichat.rank(request, responses, rng, temperature=label_temperature)})
    return rows


def builtin_comparisons(args, policy, tok, device, dtype):
    """Collect (or reuse) the built-in task's comparisons; returns the train and val JSONL paths."""
    from data.formats import load_prompts, write_jsonl
    paths = C.prepare_builtin()
    out = {s: os.path.join(args.out_dir, f"comparisons_{s}.jsonl") for s in ("train", "val")}
    # what produced the files: reuse them only for the same settings and the same SFT checkpoint
    source = args.collect_from or args.init_from
    meta = {"init_from": os.path.abspath(source), "init_mtime": os.path.getmtime(source),
            **{k: getattr(args, k) for k in ("n_prompts", "n_val_prompts", "K", "label_temperature", "max_new_tokens",
                                             "temperature", "seed")}}
    meta_path = os.path.join(args.out_dir, "comparisons_meta.json")
    old = None
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
    if all(os.path.exists(p) for p in out.values()) and not args.recollect and old == meta:
        print(f"reusing comparisons in {out['train']} and {out['val']} (--recollect=1 to collect again)")
        return out
    t0 = time.time()
    for split, n, key, seed in (("train", args.n_prompts, "prompts_train", args.seed),
                                ("val", args.n_val_prompts, "prompts_val", args.seed + 1)):
        requests = [m[-1]["content"] for m in load_prompts(paths[key])]
        if n > len(requests):
            print(f"note: {split}: {n} prompts asked for, {paths[key]} has {len(requests)}; collecting on all of them")
        random.Random(seed).shuffle(requests)
        rows = collect(policy, tok, requests[:n], args.K, args.label_temperature, args.max_new_tokens,
                       args.temperature, seed, device, dtype)
        if not rows:
            C.fail(f"no {split} comparison collected: fewer than 2 of the SFT policy's {args.K} samples per prompt "
                   f"ended with EOS within --max_new_tokens={args.max_new_tokens} (train the SFT model longer?)")
        write_jsonl(out[split], rows)
        full = sum(len(r["responses"]) == args.K for r in rows)
        print(f"collected {len(rows)} {split} comparisons ({full} with all K={args.K} responses ended by EOS) in "
              f"{time.time() - t0:.0f}s -> {out[split]}")
    C.write_json(meta_path, meta)
    return out


# ----------------------------------------------------------------------------------------------------------------
# tokenised comparisons


def batch_rewards(rm, batch, device, dtype):
    """(N, K) reward-model scores of a batch, best-first order kept; padding slots hold 0."""
    x, mask, k, where = batch[:4]
    with C.autocast(device, dtype):
        # right padding: every real token comes before the padding, so the causal mask alone keeps it unseen
        values = rm(x).float()                                                          # (ΣK, T)
    r = values.gather(1, reward.last_token_index(mask)[:, None]).squeeze(1)             # (ΣK,)
    return torch.where(where >= 0, r[where.clamp(min=0)], 0.0), k                       # (N, K), (N,)


@torch.no_grad()
def evaluate(rm, val, args, device, dtype, raw_val=None, by_term=False):
    """Held-out pairwise accuracy of the reward model (common.ranking_accuracy: against the labels, and on the
    built-in task against gold, overall and per gold term)."""
    rm.eval()
    out = C.ranking_accuracy(lambda batch: batch_rewards(rm, batch, device, dtype), val, args.batch_size, device,
                             raw_val, by_term)
    rm.train()
    return out


@torch.no_grad()
def measure_normalisation(rm, policy, tok, requests, max_new_tokens, temperature, seed, device, dtype, rank=0,
                          world=1):
    """μ, σ of the reward model's scores on fresh samples of the SFT policy (RLHF_DETAILS #13). Under torchrun
    each process samples its share of the prompts and the sums are all-reduced."""
    requests, seed = requests[rank::world], seed + rank
    from tokenizer import render_prompt
    gen = torch.Generator(device=device).manual_seed(seed)
    T = policy.config.block_size  # long conversations lose their oldest turns first (tokenizer.render_chat)
    prompts = [render_prompt(tok, m, max_tokens=T - max_new_tokens) for m in requests]
    scores = []
    rm.eval()
    # the very token ids PPO's rollout will score (left-padded prompt + sampled response up to its EOS), not text
    # decoded and encoded again: a sampled tokenisation need not be the one BPE would give the same text
    for s in range(0, len(prompts), 64):
        b = C.sample_responses(policy, tok, prompts[s:s + 64], max_new_tokens, temperature, gen, device, dtype)
        with C.autocast(device, dtype):
            raw = reward.score(rm, b["tokens"], b["attn_mask"]).float()                 # (B,)
        scores.append(raw[b["has_eos"]].cpu())  # PPO gives the others the missing-EOS penalty instead
    rm.train()
    scores = torch.cat(scores).double() if scores else torch.zeros(0, dtype=torch.float64)
    n, total, total_sq = (world * C.all_reduce_mean(torch.stack([torch.tensor(float(len(scores))), scores.sum(),
                                                                 (scores ** 2).sum()]).to(device), world)).tolist()
    if n == 0:
        C.fail("normalisation: none of the SFT policy's samples ended with EOS (train it longer, or --n_norm=0)")
    mean = total / n
    return mean, max(total_sq / n - mean ** 2, 0.0) ** 0.5  # population std


# ----------------------------------------------------------------------------------------------------------------


def member_path(out_dir, m):
    """Member m's checkpoint: ckpt.pt for the first (the reward model when there is one), ckpt1.pt, ckpt2.pt, ..."""
    return os.path.join(out_dir, "ckpt.pt" if m == 0 else f"ckpt{m}.pt")


def load_sampler(path, tokenizer, device):
    """--collect_from: the policy of an SFT, PPO or DPO checkpoint, which must share the SFT model's tokenizer."""
    ck = C.load_checkpoint(path, "--collect_from", kinds=("sft", "ppo", "dpo"))
    if ck.get("tokenizer") != tokenizer:
        C.fail(f"--collect_from {path} was trained with another tokenizer than --init_from's")
    model = GPT(GPTConfig(**{**ck["model_args"], "dropout": 0.0}))
    model.load_state_dict(ck["policy"] if ck["stage"] == "ppo" else ck["model"])
    return model.to(device).eval()


def main(argv=None):
    from data.formats import DataError, load_preferences, load_prompts
    from tokenizer import Tokenizer
    args = get_args(argv)
    rank, world = C.init_distributed(args)  # torchrun: one process per device, each prompt batch split by rank
    master = rank == 0                      # the one process that collects, evaluates, logs and checkpoints
    device, dtype, ckpt_path = C.start_run(args)
    t_start = time.time()

    # the SFT policy: the trunk to start from, the tokenizer, and the sampler for collection and normalisation
    sft = C.load_checkpoint(args.init_from, "--init_from", kinds=("sft",))
    tok = Tokenizer.from_dict(sft["tokenizer"])
    policy = GPT(GPTConfig(**sft["model_args"]))
    policy.load_state_dict(sft["model"])
    policy.to(device).eval()
    max_tokens = args.max_tokens or policy.config.block_size
    if max_tokens > policy.config.block_size:
        C.fail(f"--max_tokens={max_tokens} is longer than the model's block_size={policy.config.block_size}")

    builtin = not args.data
    train_path, val_path = args.data, args.val_data
    if builtin:
        if master:  # round 1 samples from the SFT policy; a later round from --collect_from (e.g. the PPO policy)
            sampler = load_sampler(args.collect_from, sft["tokenizer"], device) if args.collect_from else policy
            builtin_comparisons(args, sampler, tok, device, dtype)
        C.barrier(world)  # the others read what rank 0 collected
        train_path, val_path = (os.path.join(args.out_dir, f"comparisons_{s}.jsonl") for s in ("train", "val"))
    try:
        train_items = load_preferences(train_path)
        if val_path:
            val_items = load_preferences(val_path)
        else:  # hold out the first 5%
            if len(train_items) < 2:
                C.fail(f"{train_path}: its only record would go to the held-out split (5% of --data, at least one "
                       "record), leaving nothing to train on: give more data, or --val_data")
            cut = max(1, len(train_items) // 20)
            train_items, val_items = train_items[cut:], train_items[:cut]
        prior_items = load_preferences(args.prior_data) if args.prior_data else []
    except DataError as e:
        C.fail(str(e))
    train_items, val_items = C.drop_ties(train_items, train_path), C.drop_ties(val_items, val_path or train_path)
    if prior_items:  # an earlier round's comparisons, trained on together with this round's
        if master:
            print(f"adding {len(prior_items)} comparisons of an earlier round from {args.prior_data}")
        train_items = C.drop_ties(prior_items, args.prior_data) + train_items
    raw_val = None
    if builtin:  # the gold labeler reads each held-out response's text, in label order
        raw_val = [{"request": it["prompt"][-1]["content"], "responses": it["responses"]} for it in val_items]
    train = C.Comparisons(train_items, tok, max_tokens, train_path)
    val = C.Comparisons(val_items, tok, max_tokens, val_path)
    if master:
        print(f"comparisons: {len(train.items)} train prompts ({train.n_pairs} pairs), {len(val.items)} held-out "
              f"({val.n_pairs} pairs)" + (f"; {world} processes, {args.batch_size} prompts each" if world > 1 else ""))

    global_batch = args.batch_size * world
    # with several processes the last, partial global batch of an epoch is dropped: every process gets a full share
    steps_per_epoch = math.ceil(len(train.items) / global_batch) if world == 1 else len(train.items) // global_batch
    if steps_per_epoch < 1:
        C.fail(f"{len(train.items)} training prompts are fewer than one global batch of {global_batch}")
    max_iters = max(1, round(args.epochs * steps_per_epoch))
    steps_done = 0  # this process's training steps over all members (for --stop_after)

    def train_member(m):
        """Train member m (the only one without --members) to the end, or until --stop_after. Returns (the reward
        model, its save function, its log), or None when --stop_after stopped it."""
        nonlocal steps_done
        path = member_path(args.out_dir, m)
        if m > 0:  # member 0 is the single reward model exactly as without --members; the others differ by seed
            torch.manual_seed(args.seed + 1000 * m)
        rm = GPTScalar.from_gpt(policy, args.dropout).train()  # trunk from the SFT model, fresh head N(0, 1/√(d+1))
        optimizer = rm.gpt.configure_optimizers(args.weight_decay, args.learning_rate, device_type=device.split(":")[0])
        optimizer.add_param_group({"params": list(rm.head.parameters()), "weight_decay": 0.0})
        data_gen = torch.Generator().manual_seed(args.seed + 1000 * m)
        order = train.epoch_order(global_batch, data_gen)
        start_iter = 0
        resumed = args.resume and (m == 0 or os.path.exists(path))  # a later member not begun yet starts afresh
        if resumed:
            ck = C.load_checkpoint(path, "--resume", kinds=("rm",))
            rm.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            C.set_rng_state(ck["rng"], data_gen)
            order, start_iter = ck["order"], ck["iter"]
            print(f"resuming {path} at step {start_iter}")
        name = "log.jsonl" if m == 0 else f"log{m}.jsonl"
        log = C.RunLog(args.out_dir, resume_step=start_iter if resumed else None, name=name) if master else None
        fwd = C.ddp(rm, world, device)
        fwd = torch.compile(fwd) if args.compile else fwd
        tag = f"rm{m} " if args.members > 1 else "rm "

        def save(it, extra=None):
            """extra: the normalisation, which makes it the finished reward model ("complete") that PPO accepts."""
            if not master:
                return
            C.save_checkpoint(path, {
                "stage": "rm", "model": rm.state_dict(), "model_args": C.model_args(rm),
                "optimizer": optimizer.state_dict(), "iter": it, "order": order, "args": vars(args),
                "tokenizer": tok.to_dict(), "rng": C.rng_state(data_gen), "member": m,
                "complete": extra is not None, **(extra or {})})

        t_loop, member_steps = time.time(), 0
        for it in range(start_iter, max_iters):
            if it % args.eval_interval == 0 and it > 0 and master:  # on a resume at an eval step it is redone
                ev = evaluate(rm, val, args, device, dtype, raw_val)
                log.log({"step": it, **ev}, f"eval {tag}step {it} | " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                save(it)
            epoch_pos = (it % steps_per_epoch) * global_batch
            if it > 0 and it % steps_per_epoch == 0:  # a new epoch: a new order
                order = train.epoch_order(global_batch, data_gen)
            idx = order[epoch_pos:epoch_pos + global_batch][rank * args.batch_size:(rank + 1) * args.batch_size]
            lr = C.lr_at(it, max_iters, args.learning_rate, args.min_lr, args.warmup_iters, "cosine")
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            r, k = batch_rewards(fwd, train.batch(idx, device), device, dtype)
            loss = reward.ranking_loss(r, k)
            loss.backward()
            loss_val = C.all_reduce_mean(loss.detach(), world).item()
            C.check_finite(loss_val, "reward-model loss", it, path)
            torch.nn.utils.clip_grad_norm_(rm.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            right, total = (world * C.all_reduce_mean(torch.tensor(reward.pair_accuracy(r.detach(), k),
                                                                    dtype=torch.float64, device=device), world)).tolist()
            steps_done, member_steps = steps_done + 1, member_steps + 1
            row = {"step": it, "loss": loss_val, "accuracy": right / max(total, 1), "lr": lr,
                   "ms": (time.time() - t0) * 1000}
            line = None
            if it % args.log_interval == 0 or it == max_iters - 1:
                line = (f"{tag}step {it}/{max_iters} | loss {loss_val:.4f} | acc {row['accuracy']:.3f} | lr {lr:.2e} | "
                        f"{row['ms']:.0f}ms | eta {C.eta(t_loop, member_steps, max_iters - start_iter)}")
            if master:
                log.log(row, line)
            if args.stop_after and steps_done >= args.stop_after and it + 1 < max_iters:
                save(it + 1)
                print(f"stopping after {steps_done} steps (--stop_after); continue with --resume=1")
                return None
        if start_iter < max_iters:
            save(max_iters)  # the trained weights are kept before anything else can fail
        rm.eval()
        return rm, save, log

    def normalise(rm, m, final):
        """μ, σ of member m's scores on fresh SFT samples (the same samples for every member), and the check on
        other fresh samples (normalised: mean 0, std 1), written into `final`."""
        # fresh prompts from the train side of the data (HH: the train conversations' prompts)
        if builtin:
            reqs = list(load_prompts(C.prepare_builtin()["prompts_train"]))
        else:
            reqs = [it["prompt"] for it in train_items]
        random.Random(args.seed + 2).shuffle(reqs)
        norm_prompts, check_prompts = reqs[:args.n_norm], reqs[args.n_norm:2 * args.n_norm]
        mu, sigma = measure_normalisation(rm, policy, tok, norm_prompts, args.max_new_tokens, args.temperature,
                                          args.seed + 3, device, dtype, rank, world)
        if not sigma > 1e-6:  # every sample scored the same: (r − μ)/σ would divide by zero
            C.fail(f"normalisation: the reward model gave the same score ({mu:.6g}) to all the SFT policy's samples "
                   f"(σ = {sigma:.3g}); the trained weights are kept in {member_path(args.out_dir, m)} but are not "
                   "usable for PPO (a degenerate reward model: more data or another learning rate)")
        final.update({"reward_mean": mu, "reward_std": sigma})
        if check_prompts:  # fresh samples on other prompts: normalised, they should score mean 0, std 1
            m2, s2 = measure_normalisation(rm, policy, tok, check_prompts, args.max_new_tokens, args.temperature,
                                           args.seed + 4, device, dtype, rank, world)
            final.update({"normalised_check_mean": (m2 - mu) / sigma, "normalised_check_std": s2 / sigma})
        return mu, sigma

    members = []
    for m in range(args.members):
        out = train_member(m)
        if out is None:
            return C.finish_distributed(world)
        members.append(out)

    # each member: its accuracy (against the labels, against gold overall and per term), then its normalisation
    summary = {"seconds": 0.0, "iters": max_iters, "train_prompts": len(train.items), "train_pairs": train.n_pairs}
    per_member = []
    for m, (rm, save, log) in enumerate(members):
        final = {}
        if master:  # evaluation runs on rank 0; the normalisation on every process, all-reduced
            final = evaluate(rm, val, args, device, dtype, raw_val, by_term=True)
            by_term = final.pop("val_accuracy_gold_by_term", None)
            tag = f" (member {m})" if args.members > 1 else ""
            log.log({"step": max_iters, **final}, f"eval step {max_iters}{tag} | " +
                    " | ".join(f"{k} {v:.4f}" for k, v in final.items()))
            if by_term:  # which parts of the hidden preference it has learned
                print(f"accuracy against gold{tag} on the pairs where a term of the gold formula differs: " +
                      ", ".join(f"{t} {v['accuracy']:.3f} ({v['pairs']})" for t, v in by_term.items()))
                final["val_accuracy_gold_by_term"] = by_term
        mu, sigma = 0.0, 1.0
        if args.n_norm > 0:
            mu, sigma = normalise(rm, m, final)
        if master:
            save(max_iters, {"mu": mu, "sigma": sigma, "normalised": args.n_norm > 0})
        per_member.append({**final, "mu": mu, "sigma": sigma})
    if not master:
        return C.finish_distributed(world)
    summary.update({k: v for k, v in per_member[0].items() if k not in ("mu", "sigma")})  # as without --members

    if args.members > 1:  # the members read as one (reward.Ensemble): each normalised, then aggregated
        paths = [member_path(args.out_dir, m) for m in range(args.members)]
        summary["members"] = per_member
        summary["ensemble"] = {}
        for how in reward.AGGREGATES:
            ens = reward.Ensemble([rm for rm, _, _ in members], [p["mu"] for p in per_member],
                                  [p["sigma"] for p in per_member], how)
            ev = evaluate(ens, val, args, device, dtype, raw_val, by_term=True)
            summary["ensemble"][how] = ev
            by_term = ev.get("val_accuracy_gold_by_term", {})
            print(f"ensemble of {args.members} ({how}): " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()
                                                                       if not isinstance(v, dict)) +
                  ("; per term: " + ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in by_term.items()) if by_term else ""))
        summary["ensemble_reward_model"] = ",".join(paths)
        print(f"the ensemble for PPO: python train_ppo.py --reward_model={','.join(paths)} --rm_aggregate=mean")
    summary["seconds"] = time.time() - t_start
    C.write_json(os.path.join(args.out_dir, "summary.json"), summary)
    print("summary: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                                  if not isinstance(v, (dict, list))))
    C.finish_distributed(world)

if __name__ == "__main__":
    main()
