"""Helpers shared by the tests that run the scripts: tiny flags, running a script as a subprocess or in process,
reading a run's logs, and the chained SFT -> RM -> PPO smoke run that conftest.py builds once per session
(the `chain` fixture) for every test file that needs real checkpoints."""
import contextlib
import gc
import io
import json
import math
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smoke chain's SFT stage trains long enough (300 tiny steps, ~2 s) that its samples end with EOS: the built-in
# comparison collection keeps only responses that ended, so a 6-step SFT model yields "no comparisons" and RM stops.
SFT_TINY = ["--batch_size=8", "--n_layer=1", "--n_head=2", "--n_embd=32", "--eval_iters=2", "--n_eval_prompts=8",
            "--n_show=0", "--threads=1"]
SFT_CHAIN = SFT_TINY + ["--max_iters=300", "--eval_interval=150", "--learning_rate=1e-2", "--warmup_iters=5",
                        "--log_interval=100"]
RM_CHAIN = ["--n_prompts=24", "--n_val_prompts=8", "--K=3", "--batch_size=4", "--n_norm=16", "--eval_interval=3",
            "--threads=1"]
PPO_CHAIN = ["--iters=3", "--batch_size=8", "--num_minibatches=2", "--ppo_epochs=2", "--response_length=16",
             "--n_eval_prompts=8", "--eval_interval=2", "--n_show=0", "--threads=1"]

TIMING_KEYS = {"ms", "time/rollout", "time/update", "tokens_per_s"}  # wall-clock figures: never reproducible


def run_script(script, *flags, **kw):
    """`python <script> flags...` from the repo root; returns the CompletedProcess (text stdout/stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=kw.get("timeout", 300))


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    return proc


def run_main(module, argv):
    """module.main(argv) in this process -> (exit code, stdout, stderr). C.fail's sys.exit(2) becomes the code;
    any other exception propagates (a traceback is a failure). Torch's thread count and the garbage collector
    are put back as they were (main may set the first, train_ppo freezes the second)."""
    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
        gc.unfreeze()
    return code, out.getvalue(), err.getvalue()


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def step_rows(path):
    """The per-step rows of a run's log.jsonl (not the eval rows), timing figures dropped, in file order."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(path)
            if "loss" in r or "objective/scores" in r]


def load(path):
    """A checkpoint as every script loads it (weights only: no code runs)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def make_chain(d):
    """SFT -> RM -> PPO as subprocesses with tiny flags in folder d; the paths and the finished processes."""
    sft, rm, ppo_dir = str(d / "sft"), str(d / "rm"), str(d / "ppo")
    procs = {"sft": ok(run_script("train_sft.py", *SFT_CHAIN, f"--out_dir={sft}"))}
    procs["rm"] = ok(run_script("train_rm.py", f"--init_from={sft}/ckpt.pt", *RM_CHAIN, f"--out_dir={rm}"))
    procs["ppo"] = ok(run_script("train_ppo.py", f"--init_from={sft}/ckpt.pt", f"--reward_model={rm}/ckpt.pt",
                                 *PPO_CHAIN, f"--out_dir={ppo_dir}"))
    return {"dir": d, "sft": sft, "rm": rm, "ppo": ppo_dir, "sft_ckpt": f"{sft}/ckpt.pt", "rm_ckpt": f"{rm}/ckpt.pt",
            "ppo_ckpt": f"{ppo_dir}/ckpt.pt", "procs": procs}


# ----------------------------------------------------------------------------------------------------------------
# PPO in process, on the chain's checkpoints: the networks exactly as train_ppo.main builds them, one rollout, one
# update


def ppo_args(chain, *extra):
    import train_ppo
    return train_ppo.get_args([f"--init_from={chain['sft_ckpt']}", f"--reward_model={chain['rm_ckpt']}",
                               "--batch_size=8", "--num_minibatches=2", "--ppo_epochs=2", "--response_length=16",
                               *extra])


def ppo_setup(args):
    """The four networks and the two optimizers exactly as train_ppo.main builds them, on CPU."""
    import train_ppo
    policy, ref, critic, rm, mu, sigma, tok = train_ppo.load_models(args, "cpu")
    opt_p = policy.configure_optimizers(0.0, args.learning_rate, (0.9, 0.999), args.adam_eps, "cpu")
    opt_c = None if critic is None else train_ppo.GPT.configure_optimizers(
        critic, 0.0, args.critic_learning_rate, (0.9, 0.999), args.adam_eps, "cpu")
    return {"policy": policy, "ref": ref, "critic": critic, "rm": rm, "mu": mu, "sigma": sigma, "tok": tok,
            "opt_p": opt_p, "opt_c": opt_c}


def rendered_prompts(chain, n=64, response_length=16):
    """The built-in task's first n held-out prompts as token ids, as train_ppo renders them."""
    import common as C
    from data.formats import load_prompts
    from tokenizer import Tokenizer, render_prompt
    tok = Tokenizer.from_dict(load(chain["sft_ckpt"])["tokenizer"])
    prompts = load_prompts(C.prepare_builtin(quiet=True)["prompts_val"])[:n]
    return [render_prompt(tok, m, max_tokens=256 - response_length) for m in prompts]


def do_rollout(m, prompts, args, seed, dtype="float32"):
    import train_ppo
    gen = torch.Generator().manual_seed(seed)
    return train_ppo.rollout(m["policy"], m["ref"], m["critic"], m["rm"], m["mu"], m["sigma"], m["tok"], prompts,
                             args, args.kl_coef, gen, "cpu", dtype)


def do_update(m, batch, args, seed, ptx=None, dtype="float32"):
    import train_ppo
    gen = torch.Generator().manual_seed(seed)
    return train_ppo.update(m["policy"], m["critic"], m["opt_p"], m["opt_c"], batch, args, "cpu", dtype, gen,
                            args.penalty_beta, ptx)
