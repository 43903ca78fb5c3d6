"""
Is PPO worth its critic? PPO, RLOO, GRPO and DPO, and the simplest baselines (best-of-n and rejection-sampling
fine-tuning), on one gold-versus-KL frontier of the built-in task.

Same SFT model, same reward model, same comparisons (DPO learns from the very comparisons the reward model learned
from), same held-out prompts and sampling seed for every evaluation, the same KL estimate for all (Σ_t log π/π_SFT
per response, k1, at the sampling temperature), the same sample budget for the online methods (--iters × 64 answers),
and each method at the same number of settings (--betas: its KL-constraint strength β, fixed), with each method's
other flags at their defaults: no method is tuned more than another. Every run is a subprocess of the stage script
(so its peak memory is its own); a finished run (its summary.json) is reused, so the script can be re-run.

Reads --sft, --rm and --rm_dir (the comparisons). Writes <out_dir>/compare.json, compare.md (the table) and
compare.png (gold against KL, with best-of-n by the reward model and by gold as reference curves).

  python compare.py                      # after train_sft.py and train_rm.py: about 20 minutes on 2 CPU cores
  python compare.py --iters=30 --betas=0.05 --methods=ppo,rloo    # a quick look
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import common as C

ROOT = os.path.dirname(os.path.abspath(__file__))
METHODS = {  # how each method is run: the script and its own flags; β is the one setting each gets
    "ppo": ("train_ppo.py", ["--algo=ppo", "--target_kl=0"], "--kl_coef"),
    "rloo": ("train_ppo.py", ["--algo=rloo", "--group_size=4", "--target_kl=0"], "--kl_coef"),
    "grpo": ("train_ppo.py", ["--algo=grpo", "--group_size=4", "--target_kl=0"], "--kl_coef"),
    "dpo": ("train_dpo.py", [], "--beta"),
}
DEFAULT_BETAS = {"ppo": "0.02,0.1", "rloo": "0.02,0.1", "grpo": "0.02,0.1", "dpo": "0.1,0.5"}


def run_method(name, beta, args, out_dir):
    """One run of a method as a subprocess (reused if finished); its summary as a row of the table."""
    script, flags, beta_flag = METHODS[name]
    if not os.path.exists(os.path.join(out_dir, "summary.json")):
        common = [f"--init_from={args.sft}", f"--reward_model={args.rm}", f"--n_eval_prompts={args.n_eval_prompts}",
                  f"--seed={args.seed}", f"--threads={args.threads}", "--n_show=0", f"--out_dir={out_dir}",
                  "--overwrite=1"]
        extra = [f"--rm_dir={args.rm_dir}"] if script == "train_dpo.py" else \
            [f"--iters={args.iters}", f"--eval_interval={args.iters}"]
        cmd = [sys.executable, os.path.join(ROOT, script), *common, *extra, *flags, f"{beta_flag}={beta}"]
        print(f"[{name} β={beta}] " + " ".join(cmd[1:]), flush=True)
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            C.fail(f"{name} (β = {beta}) failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    with open(os.path.join(out_dir, "summary.json")) as f:
        s = json.load(f)
    if script == "train_dpo.py":
        return {"method": name, "beta": beta, "gold": s["gold_after"], "proxy": s["score_after"],
                "kl": s["kl_after"], "seconds": s["seconds"], "samples": 0, "peak_memory_mb": s["peak_memory_mb"],
                "implicit_rm_gold_accuracy": s.get("val_accuracy_gold_after")}
    return {"method": name, "beta": beta, "gold": s["gold_after"], "proxy": s["score_after"], "kl": s["kl_final"],
            "seconds": s["seconds"], "samples": s["iters"] * 64, "peak_memory_mb": s["peak_memory_mb"]}


def rejection_sampling(args, policy, rm, mu, sigma, tok, out_dir):
    """Rejection-sampling fine-tuning (expert iteration): n samples per train prompt from the SFT model, the
    reward model's favourite of each kept, then SFT on them; evaluated like the others."""
    import ppo
    import reward
    from data.formats import load_prompts, write_jsonl
    from tokenizer import render_prompt
    data = os.path.join(out_dir, "best_of_n.jsonl")
    sft_dir = os.path.join(out_dir, "sft")
    t0 = time.time()
    if not os.path.exists(os.path.join(sft_dir, "summary.json")):
        prompts = load_prompts(C.prepare_builtin(quiet=True)["prompts_train"])[:args.rft_prompts]
        n, rows = args.rft_n, []
        gen = torch.Generator().manual_seed(args.seed + 5)
        ids = [render_prompt(tok, m, max_tokens=policy.config.block_size - 64) for m in prompts]
        for s in range(0, len(ids), 32):
            chunk = [p for p in ids[s:s + 32] for _ in range(n)]
            b = C.sample_responses(policy, tok, chunk, 64, args.temperature, gen, "cpu", "float32")
            with torch.no_grad():
                score = ppo.apply_missing_eos_penalty(
                    reward.normalize(reward.score(rm, b["tokens"], b["attn_mask"]).float(), mu, sigma),
                    b["has_eos"], -1.0).view(-1, n)                                    # (P, n)
            best = score.argmax(1)
            for i, j in enumerate(best.tolist()):
                r = i * n + j
                text, eos = C.decode_response(tok, b["responses"][r], b["response_mask"][r])
                if eos:
                    rows.append({"prompt": prompts[s + i][-1]["content"], "response": text})
        write_jsonl(data, rows)
        cmd = [sys.executable, os.path.join(ROOT, "train_sft.py"), f"--init_from={args.sft}", f"--data={data}",
               f"--max_iters={args.rft_iters}", "--learning_rate=3e-4", "--min_lr=3e-5", "--warmup_iters=10",
               "--eval_interval=100000", "--n_eval_prompts=8", "--n_show=0", f"--threads={args.threads}",
               f"--out_dir={sft_dir}", "--overwrite=1"]
        print("[rft] " + " ".join(cmd[1:]), flush=True)
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            C.fail(f"rejection-sampling fine-tuning failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return sft_dir, time.time() - t0


def main(argv=None):
    p = C.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--sft", default="out/sft/ckpt.pt", help="SFT checkpoint shared by every method")
    a("--rm", default="out/rm/ckpt.pt", help="reward model shared by every method")
    a("--rm_dir", default="out/rm", help="the reward model's run folder: the comparisons DPO learns from")
    a("--out_dir", default="out/compare")
    a("--methods", default="ppo,rloo,grpo,dpo", help="which of ppo, rloo, grpo, dpo (comma-separated)")
    a("--betas", default="", help="β per method, e.g. 'ppo=0.02/0.1,dpo=0.1/0.5'; empty = the defaults "
                                  f"{DEFAULT_BETAS}")
    a("--iters", type=C.count(), default=100, help="iterations of each online run (64 answers each)")
    a("--n_eval_prompts", type=C.count(), default=256, help="held-out prompts of every evaluation")
    a("--bon_n", default="1,2,4,8,16,32", help="best-of-n values of the reference curves")
    a("--rft_prompts", type=C.count(), default=2000, help="rejection sampling: train prompts sampled")
    a("--rft_n", type=C.count(2), default=8, help="rejection sampling: samples per prompt, the RM keeps one")
    a("--rft_iters", type=C.count(), default=200, help="rejection sampling: SFT steps on the kept answers")
    a("--temperature", type=C.positive, default=0.7, help="sampling temperature T (every method's)")
    a("--threads", type=C.count(0), default=0, help="torch CPU threads of each run (0 = torch's default)")
    a("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        C.fail(f"argument --methods: unknown {bad or args.methods!r}; expected some of {', '.join(METHODS)}")
    betas = dict(DEFAULT_BETAS)
    for part in filter(None, args.betas.split(",")):
        name, _, values = part.partition("=")
        if name not in METHODS or not values:
            C.fail(f"argument --betas: expected method=β/β..., got {part!r}")
        betas[name] = values.replace("/", ",")
    betas = {m: [C.nonneg(v) for v in betas[m].split(",")] for m in methods}
    ns = [C.count()(v) for v in args.bon_n.split(",")]
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        C.fail(f"--out_dir={args.out_dir}: {e.strerror}")
    import reward
    import study
    from data.formats import load_prompts
    from model import GPT, GPTConfig
    from tokenizer import Tokenizer
    t0 = time.time()
    sft = C.load_checkpoint(args.sft, "--sft", kinds=("sft",))
    rm, mu, sigma = reward.load_reward_model(C.load_checkpoint(args.rm, "--rm", kinds=("rm",), complete=True))
    tok = Tokenizer.from_dict(sft["tokenizer"])
    policy = GPT(GPTConfig(**{**sft["model_args"], "dropout": 0.0}))
    policy.load_state_dict(sft["model"])
    policy.eval()
    ref = policy  # the frozen SFT model is every method's reference: KL of each policy to it
    prompts = load_prompts(C.prepare_builtin(quiet=True)["prompts_val"])[:args.n_eval_prompts]

    rows = []
    for name in methods:
        for beta in betas[name]:
            rows.append(run_method(name, beta, args, os.path.join(args.out_dir, f"{name}_beta{beta}")))
            print(f"  gold {rows[-1]['gold']:+.3f} | proxy {rows[-1]['proxy']:+.3f} | KL {rows[-1]['kl']:.2f} | "
                  f"{rows[-1]['seconds']:.0f}s | {rows[-1]['peak_memory_mb']:.0f} MB", flush=True)

    # the simplest baselines: rejection-sampling fine-tuning, and best-of-n (by the RM, and by gold itself)
    rft_dir, rft_s = rejection_sampling(args, policy, rm, mu, sigma, tok, os.path.join(args.out_dir, "rft"))
    rft_ck = C.load_checkpoint(os.path.join(rft_dir, "ckpt.pt"), "rejection-sampling SFT", kinds=("sft",))
    rft_policy = GPT(GPTConfig(**{**rft_ck["model_args"], "dropout": 0.0}))
    rft_policy.load_state_dict(rft_ck["model"])
    ev_args = argparse.Namespace(response_length=64, temperature=args.temperature, missing_eos_penalty=-1.0)
    ev = C.evaluate_policy(rft_policy.eval(), ref, rm, mu, sigma, tok, prompts, ev_args, "cpu", "float32",
                           args.seed + 2, True)
    rows.append({"method": "rft", "beta": None, "gold": ev["gold"], "proxy": ev["score"], "kl": ev["kl"],
                 "seconds": rft_s, "samples": args.rft_prompts * args.rft_n, "peak_memory_mb": None})
    sft_ev = C.evaluate_policy(policy, ref, rm, mu, sigma, tok, prompts, ev_args, "cpu", "float32", args.seed + 2, True)
    t_bon = time.time()
    bon = study.best_of_n(policy, rm, mu, sigma, tok, prompts, ns, args.temperature, 64, args.seed, "cpu")
    bon_s = time.time() - t_bon
    result = {"sft": {k: sft_ev[k] for k in ("gold", "gold_std", "score", "kl")}, "rows": rows, "best_of_n": bon,
              "best_of_n_seconds": bon_s, "seconds": time.time() - t0, "args": vars(args)}
    C.write_json(os.path.join(args.out_dir, "compare.json"), result)
    write_table(result, args.out_dir)
    plot(result, args.out_dir)
    print(f"compare: {time.time() - t0:.0f} s; {args.out_dir}/compare.md, compare.png")


def write_table(result, out_dir):
    sft = result["sft"]
    lines = [f"SFT: gold {sft['gold']:+.3f} ± {sft['gold_std']:.3f}, proxy {sft['score']:+.3f}. Gain in SFT standard "
             "deviations of gold. Best-of-n rows: the RM's pick among n SFT samples, and (ceiling) gold's own pick.", "",
             "| method | β | gold | gain (SFT SD) | proxy | KL to SFT | wall time | answers sampled | peak memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = f"{r['peak_memory_mb']:.0f} MB" if r["peak_memory_mb"] else "—"
        lines.append(f"| {r['method']} | {r['beta'] if r['beta'] is not None else '—'} | {r['gold']:+.3f} | "
                     f"{(r['gold'] - sft['gold']) / sft['gold_std']:+.2f} | {r['proxy']:+.3f} | {r['kl']:.2f} | "
                     f"{r['seconds']:.0f} s | {r['samples']:,} | {mem} |")
    for b in result["best_of_n"]:
        lines.append(f"| best-of-{b['n']} (RM / gold's own pick) | — | {b['gold']:+.3f} / {b['gold_ceiling']:+.3f} | "
                     f"{(b['gold'] - sft['gold']) / sft['gold_std']:+.2f} | {b['proxy']:+.3f} | {b['kl']:.2f} | | | |")
    dpo = [r for r in result["rows"] if r.get("implicit_rm_gold_accuracy") is not None]
    if dpo:
        lines += ["", "DPO's implicit reward β·log π/π_ref as a reward model, pair accuracy against gold on the reward "
                  "model's held-out comparisons: " + ", ".join(f"β = {r['beta']}: {r['implicit_rm_gold_accuracy']:.3f}"
                                                                for r in dpo)]
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(result, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no compare.png)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bon = result["best_of_n"]
    ax.plot([b["kl"] for b in bon], [b["gold"] for b in bon], "k.-", label="best-of-n, picked by the RM")
    ax.plot([b["kl"] for b in bon], [b["gold_ceiling"] for b in bon], "k:", label="best-of-n, picked by gold")
    markers = {"ppo": "o", "rloo": "s", "grpo": "^", "dpo": "D", "rft": "*"}
    for m in markers:
        pts = [r for r in result["rows"] if r["method"] == m]
        if pts:
            ax.plot([r["kl"] for r in pts], [r["gold"] for r in pts], markers[m], ms=8, label=m.upper())
            for r in pts:
                if r["beta"] is not None:
                    ax.annotate(f"β={r['beta']}", (r["kl"], r["gold"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
    ax.axhline(result["sft"]["gold"], color="gray", lw=0.8, ls="--", label="SFT")
    ax.set_xlabel("KL to the SFT model (nats per response)")
    ax.set_ylabel("gold score (held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "compare.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
