"""
The report of a pipeline run: SFT vs PPO on held-out prompts, a few answers side by side, and plots of the PPO run.

Reads <sft>/summary.json, <rm>/summary.json, and <ppo>/{summary.json, evals.json, log.jsonl, samples_before.json,
samples_after.json}. Writes <out>/report.md and, when matplotlib is installed, <out>/ppo_scores.png and
<out>/ppo_kl.png. Also prints the report.

  python report.py                       # after train_sft.py, train_rm.py and train_ppo.py with their defaults
"""

import argparse
import json
import os
import sys


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # missing, unreadable, not UTF-8, bad JSON
        fail(f"{path}: cannot read it as JSON ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def read_jsonl(path):
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    fail(f"{path}:{n}: bad JSON line")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{path}: cannot read it ({type(e).__name__})")
    return rows


def fmt(v, spec="+.3f"):
    return "n/a" if v is None else format(v, spec)


def plots(out, log, evals):
    """Proxy and gold score, KL and β over the PPO iterations. Returns the PNG file names, or a note."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "plots skipped: matplotlib is not installed (pip install matplotlib)"
    it = [r["step"] for r in log]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(it, [r["objective/scores"] for r in log], alpha=0.4, label="proxy score (RM, train batches)")
    ax.plot([e["iter"] for e in evals], [e["score"] for e in evals], "o-", label="proxy score (held-out)")
    if "gold" in evals[0]:
        ax.plot([e["iter"] for e in evals], [e["gold"] for e in evals], "s-", label="gold score (held-out)")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("score")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ppo_scores.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(it, [r["objective/kl"] for r in log], label="KL(π‖π_SFT), nats per response (k1)")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("KL")
    ax2 = ax.twinx()
    ax2.plot(it, [r["objective/kl_coef"] for r in log], color="tab:red", label="β")
    ax2.set_ylabel("β", color="tab:red")
    fig.legend(loc="upper left", bbox_to_anchor=(0.1, 0.9))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ppo_kl.png"), dpi=110)
    plt.close(fig)
    return ["ppo_scores.png", "ppo_kl.png"], None


def build(sft_dir, rm_dir, ppo_dir, out, n_examples=4):
    sft, rm, ppo = (read_json(os.path.join(d, "summary.json")) for d in (sft_dir, rm_dir, ppo_dir))
    evals = read_json(os.path.join(ppo_dir, "evals.json"))
    log = [r for r in read_jsonl(os.path.join(ppo_dir, "log.jsonl")) if "objective/kl" in r]
    before = read_json(os.path.join(ppo_dir, "samples_before.json"))
    after = read_json(os.path.join(ppo_dir, "samples_after.json"))
    b, a = evals[0], evals[-1]
    builtin = "gold" in b
    lines = ["# minRLHF run report", ""]
    lines += ["## SFT vs PPO on held-out prompts", "",
              f"{len(before)} held-out prompts, one sample each at the PPO temperature. The proxy score is the reward "
              "model's normalised score (SFT samples: mean 0, std 1); KL is Σ_t log π/π_SFT per response (k1).", "",
              "| | SFT | PPO |", "|---|---|---|"]
    if builtin:
        lines.append(f"| gold score (hidden labeler; max 4) | {fmt(b['gold'])} ± {b['gold_std']:.3f} | "
                     f"{fmt(a['gold'])} ± {a['gold_std']:.3f} |")
    lines += [f"| reward-model score (proxy) | {fmt(b['score'])} | {fmt(a['score'])} |",
              f"| KL to SFT (nats) | {b['kl']:.3f} | {a['kl']:.3f} |",
              f"| response length (tokens) | {b['length']:.1f} | {a['length']:.1f} |",
              f"| share ending with EOS | {b['eos_share']:.3f} | {a['eos_share']:.3f} |"]
    if builtin:
        lines.append(f"| share well formed | {b['well_formed']:.3f} | {a['well_formed']:.3f} |")
    acc = f"held-out pairwise accuracy {rm['val_accuracy']:.3f}"
    if "val_accuracy_gold" in rm:
        acc += (f"; against the gold ordering {rm['val_accuracy_gold']:.3f} (the noisy labeler's own agreement "
                f"with gold: {rm['labeler_agreement']:.3f})")
    lines += ["", f"Reward model: {acc}.", ""]
    if builtin:
        gain = (a["gold"] - b["gold"]) / max(b["gold_std"], 1e-8)
        lines += [f"PPO moved the mean gold score by {a['gold'] - b['gold']:+.3f}, i.e. {gain:+.2f} standard "
                  f"deviations of the SFT policy's gold scores.", ""]
    lines += [f"Time: SFT {sft['seconds']:.0f} s, reward model {rm['seconds']:.0f} s, PPO {ppo['seconds']:.0f} s "
              f"(rollout {ppo['rollout_seconds']:.0f} s, update {ppo['update_seconds']:.0f} s).", ""]
    lines += ["## Answers side by side", ""]
    for sb, sa in list(zip(before, after))[:n_examples]:
        lines += [f"**Prompt:** {sb['prompt']}", "", f"- SFT: {sb['response']}" + ("" if sb["eos"] else " *(no EOS)*"),
                  f"- PPO: {sa['response']}" + ("" if sa["eos"] else " *(no EOS)*")]
        if builtin:
            from data import minichat
            lines[-2] += f"  (gold {minichat.gold(sb['prompt'], sb['response'], sb['eos']):+.2f})"
            lines[-1] += f"  (gold {minichat.gold(sa['prompt'], sa['response'], sa['eos']):+.2f})"
        lines.append("")
    os.makedirs(out, exist_ok=True)
    pngs, note = plots(out, log, evals)
    lines += ["## The PPO run", ""]
    if pngs:
        lines += [f"![{p}]({p})" for p in pngs]
    else:
        lines.append(note)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft_dir", default="out/sft")
    p.add_argument("--rm_dir", default="out/rm")
    p.add_argument("--ppo_dir", default="out/ppo")
    p.add_argument("--out", default="out", help="where report.md and the plots go")
    args = p.parse_args(argv)
    for flag, d in (("--sft_dir", args.sft_dir), ("--rm_dir", args.rm_dir), ("--ppo_dir", args.ppo_dir)):
        if not os.path.isfile(os.path.join(d, "summary.json")):
            fail(f"{flag}={d}: {d}/summary.json is missing: run the stage that writes it first")
    try:
        text = build(args.sft_dir, args.rm_dir, args.ppo_dir, args.out)
    except KeyError as e:  # a summary of another stage, or of an older version
        fail(f"a figure the report needs ({e}) is missing: are --sft_dir, --rm_dir and --ppo_dir each the right "
             "stage's folder?")
    except OSError as e:
        fail(f"--out={args.out}: could not write the report ({e.strerror})")
    print(text)
    print(f"report written to {os.path.join(args.out, 'report.md')}")


if __name__ == "__main__":
    main()
