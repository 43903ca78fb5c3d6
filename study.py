"""
The over-optimisation study (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization") on the built-in
task, where the gold labeler tells the truth that the reward model only approximates.

It runs PPO with a fixed KL coefficient β at several values (0 included) and best-of-n sampling at several n
against the same reward model, and measures on held-out prompts the proxy (reward-model) score and the gold score
against d = √KL(π‖π_SFT) (for best-of-n, KL = ln n − (n−1)/n). It fits Gao et al.'s forms to the gold gains,

    R_RL(d)  = d (α − β ln d)        peak at d* = exp(α/β − 1)
    R_bon(d) = d (α − β d)           peak at d* = α / (2β)

and writes <out_dir>/study.md (the table, the fits, the predicted peaks), study.json and study.png.
It also trains a reward model on more comparisons (--big_rm_prompts; --big_rm=0 skips it) and repeats best-of-n
and the lowest-β PPO run with it, to show the peak move; and an ensemble of --ensemble reward models (Coste et al.
2024, "Reward Model Ensembles Help Mitigate Overoptimization"; --ensemble=0 skips it), against whose mean and
uncertainty-weighted aggregate (mean − λ·variance) it repeats best-of-n and PPO at the two lowest β.

Reads out/sft/ckpt.pt and out/rm/ckpt.pt (run train_sft.py and train_rm.py first).

  python study.py                                   # 2 CPU cores: 21 minutes (measured)
  python study.py --kl_coefs=0,0.005,0.02,0.05 --iters=300 --device=cuda   # longer, on a GPU
"""

import argparse
import json
import math
import os
import time

import torch

import common as C
import ppo
import reward


# R(d) = d (α − β ln d)                                             (Gao et al. 2022, RL)
def fit_rl(d, r):
    """Least-squares α, β of R = α d − β d ln d (linear in α, β). d > 0."""
    d, r = torch.as_tensor(d, dtype=torch.float64), torch.as_tensor(r, dtype=torch.float64)
    X = torch.stack([d, -d * torch.log(d)], 1)                                        # (N, 2)
    alpha, beta = torch.linalg.lstsq(X, r[:, None]).solution.squeeze(1).tolist()
    return alpha, beta


# R(d) = d (α − β d)                                                (Gao et al. 2022, best-of-n)
def fit_bon(d, r):
    """Least-squares α, β of R = α d − β d²."""
    d, r = torch.as_tensor(d, dtype=torch.float64), torch.as_tensor(r, dtype=torch.float64)
    X = torch.stack([d, -d * d], 1)                                                   # (N, 2)
    alpha, beta = torch.linalg.lstsq(X, r[:, None]).solution.squeeze(1).tolist()
    return alpha, beta


def rl_peak(alpha, beta):
    """dR/dd = α − β ln d − β = 0  ->  d* = exp(α/β − 1) (a maximum when β > 0)."""
    return math.exp(alpha / beta - 1) if beta > 0 else float("inf")


def bon_peak(alpha, beta):
    """dR/dd = α − 2βd = 0  ->  d* = α / (2β)."""
    return alpha / (2 * beta) if beta > 0 else float("inf")


@torch.no_grad()
def best_of_n(policy, rm, mu, sigma, tok, prompts, ns, temperature, max_new_tokens, seed, device):
    """For each n: sample max(ns) responses per prompt once, keep the first n, pick the RM's favourite.
    Returns rows {n, kl, d, proxy, gold, gold_ceiling}: gold_ceiling is the gold of the best of the same n samples
    by gold itself, what a perfect reward model would pick at the same KL."""
    from data import minichat
    from model import right_pad
    from tokenizer import render_chat, render_prompt
    N = max(ns)
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = [render_prompt(tok, m) for m in prompts]
    samples = C.sample_texts(policy, tok, [p for p in ids for _ in range(N)], max_new_tokens, gen, temperature,
                             batch_size=256, device=device)
    scores = []  # normalised RM score of every sample; no EOS -> the PPO missing-EOS penalty, as in training
    for s in range(0, len(samples), 256):
        chunk = samples[s:s + 256]
        msgs = [prompts[(s + i) // N] for i in range(len(chunk))]
        seqs = [render_chat(tok, m + [{"role": "assistant", "content": t}])[0] for m, (t, _) in zip(msgs, chunk)]
        x, mask = right_pad(seqs, device=device)                                      # (B, T) each
        r = reward.normalize(reward.score(rm, x, mask).float().cpu(), mu, sigma)     # (B,)
        eos = torch.tensor([e for _, e in chunk])
        scores.append(ppo.apply_missing_eos_penalty(r, eos, -1.0))
    scores = torch.cat(scores).view(len(prompts), N)                                 # (P, N)
    golds = torch.tensor([minichat.gold(prompts[i // N][-1]["content"], t, e)
                          for i, (t, e) in enumerate(samples)]).view(len(prompts), N)  # (P, N)
    rows = []
    for n in ns:
        best = scores[:, :n].argmax(1)                                                # (P,)
        kl = ppo.best_of_n_kl(n)
        rows.append({"n": n, "kl": kl, "d": math.sqrt(kl), "proxy": scores[:, :n].max(1).values.mean().item(),
                     "gold": golds.gather(1, best[:, None]).mean().item(),
                     "gold_ceiling": golds[:, :n].max(1).values.mean().item()})
    return rows


def ppo_points(out_dir, flags):
    """Run train_ppo.py with fixed β and return its held-out evaluations as study points."""
    import train_ppo
    if not os.path.exists(os.path.join(out_dir, "summary.json")):
        train_ppo.main(flags + [f"--out_dir={out_dir}", "--n_show=0", "--overwrite=1"])  # unfinished: redone
    with open(os.path.join(out_dir, "evals.json")) as f:
        evals = json.load(f)
    return [{"iter": e["iter"], "kl": e["kl"], "d": math.sqrt(max(e["kl"], 0.0)), "proxy": e["score"],
             "gold": e["gold"]} for e in evals]


def number_list(text, flag, parse):
    """'1,2,4' -> [1, 2, 4], each value checked by the flag type `parse`; a bad value is one line naming the flag."""
    try:
        values = [parse(x.strip()) for x in text.split(",") if x.strip()]
    except argparse.ArgumentTypeError as e:
        C.fail(f"argument {flag}: {e}")
    if not values:
        C.fail(f"argument {flag}: expected a comma-separated list, got {text!r}")
    return values


def main(argv=None):
    p = C.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="out/sft/ckpt.pt")
    p.add_argument("--rm", default="out/rm/ckpt.pt")
    p.add_argument("--out_dir", default="out/study")
    p.add_argument("--kl_coefs", default="0,0.01,0.05", help="fixed β of each PPO run (comma-separated)")
    p.add_argument("--iters", type=C.count(), default=100, help="PPO iterations per run")
    p.add_argument("--eval_interval", type=C.count(), default=10, help="PPO iterations between study points")
    p.add_argument("--n_eval_prompts", type=C.count(), default=128, help="held-out prompts of each study point")
    p.add_argument("--bon_n", default="1,2,4,8,16,32,64", help="best-of-n values")
    p.add_argument("--big_rm", type=C.flag01, default=1, help="1: also a reward model on more comparisons (0: skip it)")
    p.add_argument("--big_rm_prompts", type=C.count(), default=10000,
                   help="comparison prompts of the bigger reward model (2.5× the default reward model's 4,000; the "
                        "built-in task has 20,000 train prompts)")
    p.add_argument("--ensemble", type=C.count(0), default=3,
                   help="members of a reward-model ensemble (Coste et al. 2024; train_rm.py --members) trained with "
                        "the default reward model's settings; PPO at the two lowest β against its mean and its "
                        "uncertainty-weighted aggregate (0: skip it)")
    p.add_argument("--ensemble_rm", default="", help="an existing ensemble's comma-separated checkpoints instead")
    p.add_argument("--uwo_lambda", type=C.nonneg, default=1.0, help="λ of the uncertainty-weighted aggregate")
    p.add_argument("--temperature", type=C.positive, default=0.7, help="sampling temperature T")
    p.add_argument("--max_new_tokens", type=C.count(), default=64, help="response length limit")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    kl_coefs, ns = number_list(args.kl_coefs, "--kl_coefs", C.nonneg), number_list(args.bon_n, "--bon_n", C.count())
    device = C.get_device(args.device)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        C.fail(f"--out_dir={args.out_dir}: {e.strerror}")
    from data.formats import load_prompts
    from model import GPT, GPTConfig
    t0 = time.time()
    sft = C.load_checkpoint(args.sft, "--sft", kinds=("sft",))
    from tokenizer import Tokenizer
    tok = Tokenizer.from_dict(sft["tokenizer"])
    policy = GPT(GPTConfig(**{**sft["model_args"], "dropout": 0.0}))
    policy.load_state_dict(sft["model"])
    policy.to(device).eval()
    prompts = load_prompts(C.prepare_builtin(quiet=True)["prompts_val"])[:args.n_eval_prompts]
    for spec in (args.rm, args.ensemble_rm):  # a wrong checkpoint fails now, not after the reward models it trains
        if spec:
            C.load_reward_models(spec, "reward model", tokenizer=sft["tokenizer"])

    import train_rm
    # name -> (reward model(s), aggregate, the fixed β of its PPO runs)
    rms = {"rm": (args.rm, "mean", kl_coefs)}
    if args.big_rm:
        big = os.path.join(args.out_dir, "rm_big")
        if not os.path.exists(os.path.join(big, "summary.json")):
            train_rm.main([f"--init_from={args.sft}", f"--out_dir={big}", f"--n_prompts={args.big_rm_prompts}",
                           "--overwrite=1"])  # an unfinished earlier attempt is redone
        rms["rm_big"] = (os.path.join(big, "ckpt.pt"), "mean", kl_coefs[:1])
    ensemble = args.ensemble_rm
    if args.ensemble and not ensemble:
        ens_dir = os.path.join(args.out_dir, "rm_ensemble")
        if not os.path.exists(os.path.join(ens_dir, "summary.json")):
            train_rm.main([f"--init_from={args.sft}", f"--out_dir={ens_dir}", f"--members={args.ensemble}",
                           "--overwrite=1"])
        ensemble = ",".join(train_rm.member_path(ens_dir, m) for m in range(args.ensemble))
    if ensemble:  # Coste et al.: does the ensemble, with a small KL penalty or none, stop the over-optimisation?
        for how in ("mean", "uwo"):
            rms[f"ensemble_{how}"] = (ensemble, how, kl_coefs[:2])

    results = {}
    for name, (rm_path, how, betas) in rms.items():
        rm, mu, sigma, _ = C.load_reward_models(rm_path, "reward model", device, how, args.uwo_lambda)
        with open(os.path.join(os.path.dirname(rm_path.split(",")[0]), "summary.json")) as f:
            rm_summary = json.load(f)
        if "," in rm_path:  # train_rm.py --members wrote each aggregate's accuracy
            rm_summary = {**rm_summary, **rm_summary.get("ensemble", {}).get(how, {})}
        res = {"rm_val_accuracy_gold": rm_summary.get("val_accuracy_gold"),
               "rm_train_prompts": rm_summary.get("train_prompts"), "members": rm_path.count(",") + 1,
               "aggregate": how, "bon": [], "ppo": {}}
        print(f"[{name}] best-of-n at n = {ns} ...", flush=True)
        res["bon"] = best_of_n(policy, rm, mu, sigma, tok, prompts, ns, args.temperature, args.max_new_tokens,
                               args.seed, device)
        for beta in betas:
            print(f"[{name}] PPO with fixed β = {beta} ...", flush=True)
            flags = [f"--init_from={args.sft}", f"--reward_model={rm_path}", f"--rm_aggregate={how}",
                     f"--uwo_lambda={args.uwo_lambda}", "--target_kl=0", f"--kl_coef={beta}",
                     f"--iters={args.iters}", f"--eval_interval={args.eval_interval}",
                     f"--n_eval_prompts={args.n_eval_prompts}", f"--temperature={args.temperature}",
                     f"--device={device}", f"--seed={args.seed}"]
            res["ppo"][str(beta)] = ppo_points(os.path.join(args.out_dir, f"{name}_ppo_beta{beta}"), flags)
        results[name] = res

    # fits on the gold gain over the SFT policy (the n = 1 / iteration-0 point), excluding d = 0
    for name, res in results.items():
        g0 = res["bon"][0]["gold"]
        pts = [(q["d"], q["gold"] - g0) for q in res["bon"] if q["d"] > 0]
        res["fit_bon"] = dict(zip(("alpha", "beta"), fit_bon(*zip(*pts))))
        res["fit_bon"]["peak_d"] = bon_peak(**res["fit_bon"])
        low = min(res["ppo"], key=float)
        run = res["ppo"][low]
        pts = [(q["d"], q["gold"] - run[0]["gold"]) for q in run if q["d"] > 0.05]
        if len(pts) >= 2:
            res["fit_rl"] = dict(zip(("alpha", "beta"), fit_rl(*zip(*pts))), kl_coef=float(low))
            res["fit_rl"]["peak_d"] = rl_peak(res["fit_rl"]["alpha"], res["fit_rl"]["beta"])
    results["seconds"] = time.time() - t0
    C.write_json(os.path.join(args.out_dir, "study.json"), results)
    write_report(results, args.out_dir)
    print(open(os.path.join(args.out_dir, "study.md")).read())


def write_report(results, out_dir):
    lines = ["# Over-optimisation study", "",
             "Gold and proxy (reward-model) scores on held-out prompts against d = √KL(π‖π_SFT).", ""]
    for name, res in ((k, v) for k, v in results.items() if k != "seconds"):
        acc, n = res["rm_val_accuracy_gold"], res.get("rm_train_prompts")
        what = (f"an ensemble of {res['members']} reward models, aggregated by {res['aggregate']}"
                if res.get("members", 1) > 1 else "one reward model")
        lines += [f"## {name}: {what}; held-out accuracy against gold " + (f"{acc:.3f}" if acc is not None else "n/a") +
                  (f", trained on {n:,} prompts" if n else ""), "",
                  "| method | setting | KL | d | proxy | gold | gold, picked by gold |",
                  "|---|---|---|---|---|---|---|"]
        for q in res["bon"]:
            lines.append(f"| best-of-n | n = {q['n']} | {q['kl']:.3f} | {q['d']:.3f} | {q['proxy']:+.3f} | "
                         f"{q['gold']:+.3f} | {q['gold_ceiling']:+.3f} |")
        for beta, run in res["ppo"].items():
            for q in run:
                lines.append(f"| PPO β = {beta} | iter {q['iter']} | {q['kl']:.3f} | {q['d']:.3f} | {q['proxy']:+.3f} | "
                             f"{q['gold']:+.3f} | |")
        fb = res["fit_bon"]
        lines += ["", f"Best-of-n fit R(d) = d(α − βd): α = {fb['alpha']:.3f}, β = {fb['beta']:.3f}, predicted peak "
                      f"d* = {fb['peak_d']:.3f} (KL {fb['peak_d'] ** 2:.3f})."]
        if "fit_rl" in res:
            fr = res["fit_rl"]
            lines += [f"PPO (β = {fr['kl_coef']}) fit R(d) = d(α − β ln d): α = {fr['alpha']:.3f}, β = {fr['beta']:.3f}, "
                      f"predicted peak d* = {fr['peak_d']:.3f} (KL {fr['peak_d'] ** 2:.3f})."]
        lines.append("")
    lines.append(f"Wall time: {results['seconds']:.0f} s.")
    with open(os.path.join(out_dir, "study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    # one panel for best-of-n, then one per PPO β among the two lowest (β = 0: over-optimisation unchecked; the
    # next: whether a small KL penalty holds it, with one reward model and with the ensemble)
    betas = sorted({b for k, v in results.items() if k != "seconds" for b in v["ppo"]}, key=float)[:2]
    fig, axes = plt.subplots(1, 1 + len(betas), figsize=(5.5 * (1 + len(betas)), 4), squeeze=False)
    axes = axes[0]
    for i, (name, res) in enumerate((k, v) for k, v in results.items() if k != "seconds"):
        c = f"C{i}"  # one colour per reward model in every panel: gold as dots, proxy as crosses, fits dashed
        g0 = res["bon"][0]["gold"]
        d = [q["d"] for q in res["bon"]]
        axes[0].plot(d, [q["gold"] - g0 for q in res["bon"]], "o", color=c, label=f"{name} gold")
        axes[0].plot(d, [q["proxy"] for q in res["bon"]], "x", color=c, alpha=0.6, label=f"{name} proxy")
        if name == "rm":  # the same samples picked by gold: what a perfect reward model would reach
            axes[0].plot(d, [q["gold_ceiling"] - g0 for q in res["bon"]], "k:", label="gold, picked by gold")
        fb, xs = res["fit_bon"], torch.linspace(0.01, max(d) * 1.2, 100)
        axes[0].plot(xs, xs * (fb["alpha"] - fb["beta"] * xs), "--", color=c, label=f"{name} gold fit")
        for ax, beta in zip(axes[1:], betas):
            run = res["ppo"].get(beta)
            if not run:
                continue
            d = [q["d"] for q in run]
            ax.plot(d, [q["gold"] - run[0]["gold"] for q in run], "o-", color=c, label=f"{name} gold")
            ax.plot(d, [q["proxy"] - run[0]["proxy"] for q in run], "x:", color=c, alpha=0.6, label=f"{name} proxy")
            if "fit_rl" in res and float(res["fit_rl"]["kl_coef"]) == float(beta):
                fr, xs = res["fit_rl"], torch.linspace(0.05, max(d) * 1.2, 100)
                ax.plot(xs, xs * (fr["alpha"] - fr["beta"] * torch.log(xs)), "--", color=c, label=f"{name} gold fit")
    for ax, title in zip(axes, ["best-of-n"] + [f"PPO at fixed β = {b}" for b in betas]):
        ax.set_xlabel("d = √KL")
        ax.set_ylabel("gain over SFT")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "study.png"), dpi=110)


if __name__ == "__main__":
    main()
