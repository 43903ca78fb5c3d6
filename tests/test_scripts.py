"""Tests for the three training scripts as a user runs them: a chained smoke run of train_sft.py -> train_rm.py ->
train_ppo.py as subprocesses with tiny flags (exit 0, the summary.json / log.jsonl / checkpoint contracts), resume
after a simulated kill equal to an uninterrupted run (bit for bit, CPU), the NaN guard, clear messages with exit
status 2 for bad flags and bad data, and in-process invariants of PPO: the frozen reference never moves, ptx_coef=0
is plain PPO, nothing after EOS carries an advantage or a return.

CPU only, one thread per run, about 25 s in all. The built-in task's data is generated on first use into
data/minichat/ (gitignored, deterministic).

    python -m pytest -q tests/test_scripts.py
"""
import json
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

import common as C
import train_ppo
import train_rm
import train_sft
from runs import (SFT_TINY, do_rollout, do_update, finite, ok, ppo_args, ppo_setup, read_json, read_jsonl,
                  run_main, run_script, step_rows)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PPO_LOG_KEYS = ["objective/kl", "objective/scores", "objective/kl_coef", "objective/entropy", "ppo/policy/approxkl",
                "ppo/policy/clipfrac", "ppo/val/clipfrac", "ppo/val/var_explained", "ppo/returns/mean"]


# ----------------------------------------------------------------------------------------------------------------
# 1. the chained smoke run (tests/runs.py, built once per session by conftest.py)


def test_sft_smoke_contract(chain):
    s = read_json(os.path.join(chain["sft"], "summary.json"))
    for k in ("val_loss", "seconds", "gold_mean", "gold_std", "well_formed"):
        assert k in s and finite(s[k]), f"summary.json: {k} missing or not finite in {s}"
    assert 0.0 <= s["well_formed"] <= 1.0, s
    assert s["gold_std"] >= 0 and s["seconds"] > 0, s
    # 300 tiny steps learn something: well below the uniform loss ln(1024) = 6.93
    assert s["val_loss"] < math.log(C.BUILTIN_VOCAB) - 2, f"val_loss {s['val_loss']} barely below uniform"
    rows = read_jsonl(os.path.join(chain["sft"], "log.jsonl"))
    assert [r["step"] for r in rows if "loss" in r] == list(range(300))
    assert [r["step"] for r in rows if "val_loss" in r] == [150, 300]
    ck = torch.load(chain["sft_ckpt"], map_location="cpu", weights_only=True)
    assert ck["stage"] == "sft" and ck["iter"] == 300 and ck["model_args"]["n_embd"] == 32
    assert "summary: val_loss" in chain["procs"]["sft"].stdout


def test_rm_smoke_contract(chain):
    from data.formats import load_preferences
    s = read_json(os.path.join(chain["rm"], "summary.json"))
    for k in ("val_accuracy", "seconds", "reward_mean", "reward_std", "val_accuracy_gold", "labeler_agreement"):
        assert k in s and finite(s[k]), f"summary.json: {k} missing or not finite in {s}"
    for k in ("val_accuracy", "val_accuracy_gold", "labeler_agreement"):
        assert 0.0 <= s[k] <= 1.0, (k, s[k])
    assert s["reward_std"] > 0, s
    by_term = s["val_accuracy_gold_by_term"]  # which gold terms the differing pairs differ in, and how it did on each
    assert isinstance(by_term, dict) and set(by_term) <= {"on_topic", "facts_beyond_3", "off_topic", "repeats", "rude", "opener",
                                        "closer", "extra_polite", "words_over_30", "malformed"}, by_term
    assert all(0.0 <= v["accuracy"] <= 1.0 and 1 <= v["pairs"] <= 8 * 3 for v in by_term.values()), by_term
    for split, n_prompts in (("train", 24), ("val", 8)):
        path = os.path.join(chain["rm"], f"comparisons_{split}.jsonl")
        items = load_preferences(path)
        assert 0 < len(items) <= n_prompts, f"{path}: {len(items)} comparisons"
        for it in items:  # K = 3 samples; the ones that ended with EOS are kept, at least 2
            assert 2 <= len(it["responses"]) <= 3 and it["prompt"][-1]["role"] == "user", it
        raw = read_jsonl(path)
        assert all(sorted(r["ranking"]) == list(range(len(r["responses"]))) for r in raw)
    ck = torch.load(chain["rm_ckpt"], map_location="cpu", weights_only=True)
    assert ck["stage"] == "rm" and "head.weight" in ck["model"]
    assert ck["mu"] == s["reward_mean"] and ck["sigma"] == s["reward_std"], (ck["mu"], ck["sigma"], s)
    assert ck["iter"] == s["iters"] == 6  # one epoch of 24 prompts at 4 per step


def test_ppo_smoke_contract(chain):
    s = read_json(os.path.join(chain["ppo"], "summary.json"))
    for k in ("seconds", "rollout_seconds", "update_seconds", "score_before", "score_after", "kl_final",
              "target_kl", "gold_before", "gold_after", "gold_std_before"):
        assert k in s and finite(s[k]), f"summary.json: {k} missing or not finite in {s}"
    assert s["target_kl"] == 4.0 and s["iters"] == 3
    assert 0 < s["rollout_seconds"] + s["update_seconds"] < s["seconds"], s
    rows = read_jsonl(os.path.join(chain["ppo"], "log.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        for k in PPO_LOG_KEYS:
            assert k in r and finite(r[k]), f"log.jsonl step {r['step']}: {k} missing or not finite"
        assert 0.0 <= r["ppo/policy/clipfrac"] <= 1.0 and 0.0 <= r["ppo/val/clipfrac"] <= 1.0, r
        assert r["objective/entropy"] > 0 and r["objective/kl_coef"] > 0, r
    assert rows[0]["objective/kl"] == 0.0  # the first rollout's policy is the reference itself
    evals = read_json(os.path.join(chain["ppo"], "evals.json"))
    assert [e["iter"] for e in evals] == [0, 2, 3]
    assert evals[0]["score"] == s["score_before"] and evals[-1]["score"] == s["score_after"]
    ck = torch.load(os.path.join(chain["ppo"], "ckpt.pt"), map_location="cpu", weights_only=True)
    rm_ck = torch.load(chain["rm_ckpt"], map_location="cpu", weights_only=True)
    assert ck["stage"] == "ppo" and ck["iter"] == 3
    assert (ck["mu"], ck["sigma"]) == (rm_ck["mu"], rm_ck["sigma"])
    for name in ("samples_before.json", "samples_after.json"):
        samples = read_json(os.path.join(chain["ppo"], name))
        assert len(samples) == 8 and all({"prompt", "response", "eos"} <= set(x) for x in samples), name


# ----------------------------------------------------------------------------------------------------------------
# 2. resume after a kill equals the uninterrupted run, bit for bit (CPU, same seed)


def check_resume(module, flags, tmp_path, n_steps, stop_after):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_main(module, flags + [f"--out_dir={a}"])[0] == 0
    code, out, err = run_main(module, flags + [f"--out_dir={b}", f"--stop_after={stop_after}"])
    assert code == 0, err
    assert "--stop_after" in out and not os.path.exists(os.path.join(b, "summary.json"))
    assert len(step_rows(os.path.join(b, "log.jsonl"))) == stop_after  # it really stopped early
    code, out, err = run_main(module, flags + [f"--out_dir={b}", "--resume=1"])
    assert code == 0, err
    assert f"resuming {os.path.join(b, 'ckpt.pt')}" in out
    rows_a, rows_b = step_rows(os.path.join(a, "log.jsonl")), step_rows(os.path.join(b, "log.jsonl"))
    assert [r["step"] for r in rows_a] == list(range(n_steps))
    assert [r["step"] for r in rows_b] == list(range(n_steps)), "the resumed log lost or repeated steps"
    for ra, rb in zip(rows_a, rows_b):
        assert ra == rb, f"step {ra['step']}: uninterrupted {ra} != resumed {rb}"
    return a, b


def test_sft_resume_equals_uninterrupted(tmp_path):
    flags = SFT_TINY + ["--max_iters=8", "--eval_interval=4", "--n_eval_prompts=4", "--max_new_tokens=16"]
    a, b = check_resume(train_sft, flags, tmp_path, n_steps=8, stop_after=3)
    losses = [r["loss"] for r in step_rows(os.path.join(a, "log.jsonl"))]
    assert len(set(losses)) == 8  # the steps differ, so equal lists are not a coincidence
    ev_a = [r for r in read_jsonl(os.path.join(a, "log.jsonl")) if "val_loss" in r]
    ev_b = [r for r in read_jsonl(os.path.join(b, "log.jsonl")) if "val_loss" in r]
    assert ev_a == ev_b and [r["step"] for r in ev_a] == [4, 8]
    sa, sb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["model"] for d in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "final weights differ after resume"


def test_rm_resume_equals_uninterrupted(chain, tmp_path):
    # --data/--val_data: the fixture's comparisons (so no gold eval); 3 epochs of 24 prompts / 4 = 18 steps with a
    # new order at steps 6 and 12. The kill at step 8 falls after the first reshuffle, so the resumed run must
    # restore the shuffling generator's state, not just reseed it.
    flags = [f"--init_from={chain['sft_ckpt']}", f"--data={chain['rm']}/comparisons_train.jsonl",
             f"--val_data={chain['rm']}/comparisons_val.jsonl", "--batch_size=4", "--epochs=3", "--eval_interval=4",
             "--n_norm=0", "--threads=1"]
    n_train = len(read_jsonl(f"{chain['rm']}/comparisons_train.jsonl"))
    assert n_train == 24, f"the fixture collected {n_train} comparisons, this test assumes 24 (6 steps an epoch)"
    a, b = check_resume(train_rm, flags, tmp_path, n_steps=18, stop_after=8)
    assert len({r["loss"] for r in step_rows(os.path.join(a, "log.jsonl"))}) == 18
    sa, sb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["model"] for d in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "final weights differ after resume"


def test_ppo_resume_equals_uninterrupted(chain, tmp_path):
    flags = [f"--init_from={chain['sft_ckpt']}", f"--reward_model={chain['rm_ckpt']}", "--iters=4", "--batch_size=8",
             "--num_minibatches=2", "--ppo_epochs=2", "--response_length=16", "--n_eval_prompts=4",
             "--eval_interval=2", "--n_show=0", "--threads=1"]
    a, b = check_resume(train_ppo, flags, tmp_path, n_steps=4, stop_after=2)  # the kill lands on the eval at 2
    ev_a, ev_b = (read_json(os.path.join(d, "evals.json")) for d in (a, b))
    assert [e["iter"] for e in ev_a] == [0, 2, 4] and ev_a == ev_b
    rows = step_rows(os.path.join(a, "log.jsonl"))
    assert len({r["ppo/loss/policy"] for r in rows}) == 4 and len({r["objective/scores"] for r in rows}) > 1
    sa, sb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (a, b))
    for net in ("policy", "critic"):
        assert all(torch.equal(sa[net][k], sb[net][k]) for k in sa[net]), f"final {net} differs after resume"
    assert read_json(os.path.join(a, "summary.json"))["score_after"] == read_json(os.path.join(b, "summary.json"))["score_after"]



def test_ppo_compile_flag(chain, tmp_path):
    """--compile=1 compiles the update's policy and critic forward: the same run as eager, step for step (to the
    rounding of another kernel order), and the first-minibatch check (ρ ≡ 1 against the eager rollout's log-probs)
    held in every iteration."""
    flags = [f"--init_from={chain['sft_ckpt']}", f"--reward_model={chain['rm_ckpt']}", "--iters=2", "--batch_size=8",
             "--num_minibatches=2", "--ppo_epochs=2", "--response_length=16", "--n_eval_prompts=4",
             "--eval_interval=2", "--n_show=0", "--threads=1"]
    rows = {}
    for name, extra in (("eager", []), ("compiled", ["--compile=1"])):
        out = str(tmp_path / name)
        p = run_script("train_ppo.py", *flags, *extra, f"--out_dir={out}")
        assert p.returncode == 0, p.stderr[-3000:]
        rows[name] = step_rows(os.path.join(out, "log.jsonl"))
    assert len(rows["compiled"]) == 2
    for e, c in zip(rows["eager"], rows["compiled"]):
        for k in ("ppo/loss/policy", "ppo/loss/value", "ppo/policy/approxkl", "objective/scores", "objective/kl"):
            assert abs(e[k] - c[k]) <= 1e-4 * max(1.0, abs(e[k])), (e["step"], k, e[k], c[k])
    assert rows["eager"][1]["ppo/loss/policy"] != rows["eager"][0]["ppo/loss/policy"]  # two different steps


# ----------------------------------------------------------------------------------------------------------------
# 3. the NaN guard: a clear stop, not a traceback and not a run that trains on garbage


def test_nan_guard_sft_subprocess(tmp_path):
    out = str(tmp_path / "nan")
    p = run_script("train_sft.py", *SFT_TINY, "--max_iters=20", "--eval_interval=1000", "--learning_rate=1e6",
                   "--warmup_iters=1", f"--out_dir={out}")
    assert p.returncode != 0, "a learning rate of 1e6 trained to the end without a NaN stop"
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert "nan" in p.stderr.lower() or "inf" in p.stderr.lower(), p.stderr
    assert "training loss" in p.stderr and "lower learning rate" in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(out, "summary.json"))


def test_nan_guard_ppo(chain, tmp_path):
    code, out, err = run_main(train_ppo, [
        f"--init_from={chain['sft_ckpt']}", f"--reward_model={chain['rm_ckpt']}", "--iters=4", "--batch_size=8",
        "--num_minibatches=2", "--ppo_epochs=2", "--response_length=16", "--n_eval_prompts=4", "--n_show=0",
        "--learning_rate=1e6", "--critic_learning_rate=1e6", "--threads=1", f"--out_dir={tmp_path / 'nan'}"])
    assert code == 2, f"exit {code}\n{err}"
    assert "PPO loss is nan" in err or "PPO loss is inf" in err, err


def test_nan_guard_rm(chain, tmp_path):
    code, out, err = run_main(train_rm, [
        f"--init_from={chain['sft_ckpt']}", f"--data={chain['rm']}/comparisons_train.jsonl",
        f"--val_data={chain['rm']}/comparisons_val.jsonl", "--batch_size=4", "--epochs=3", "--learning_rate=1e6",
        "--warmup_iters=1", "--n_norm=0", "--threads=1", f"--out_dir={tmp_path / 'nan'}"])
    assert code == 2, f"exit {code}\n{err}"
    assert "reward-model loss is nan" in err or "reward-model loss is inf" in err, err


# ----------------------------------------------------------------------------------------------------------------
# 4. bad flags and bad data: exit status 2 and one clear line, never a stack trace


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}
    files = {"csv": d / "data.csv", "bad_json": d / "bad_json.jsonl", "bad_pref": d / "bad_pref.jsonl",
             "bad_sft": d / "bad_sft.jsonl"}
    files["csv"].write_text("prompt,response\nhi,hello\n")
    files["bad_json"].write_text(json.dumps(good) + "\n" + '{"prompt": "Name a colour.", "chosen": \n')
    files["bad_pref"].write_text(json.dumps(good) + "\n\n" + json.dumps({"prompt": "Hi", "chosen": "Hello"}) + "\n")
    files["bad_sft"].write_text(json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n" +
                                json.dumps({"messages": [{"role": "assistant", "content": "Hi"}]}) + "\n")
    return {k: str(v) for k, v in files.items()}


BAD_CASES = [
    # (id, script, flags, substrings the message must contain); {sft}, {rm}, {name} are filled in below
    ("missing_data", "sft", ["--data=/nonexistent/train.jsonl"], ["--data=/nonexistent/train.jsonl", "no such file"]),
    ("wrong_extension", "sft", ["--data={csv}"], ["{csv}", ".jsonl"]),
    ("rm_csv_data", "rm", ["--init_from={sft}", "--data={csv}"], ["{csv}:1:", "bad JSON"]),
    ("not_divisible", "ppo", ["--init_from={sft}", "--reward_model={rm}", "--batch_size=6", "--num_minibatches=4"],
     ["--batch_size=6", "--num_minibatches=4"]),
    ("missing_init_rm", "rm", ["--init_from=/nonexistent/ckpt.pt"], ["/nonexistent/ckpt.pt", "does not exist"]),
    ("missing_init_ppo", "ppo", ["--init_from=/nonexistent/ckpt.pt", "--reward_model={rm}"],
     ["/nonexistent/ckpt.pt", "does not exist"]),
    ("missing_reward_model", "ppo", ["--init_from={sft}", "--reward_model=/nonexistent/rm.pt"],
     ["/nonexistent/rm.pt", "does not exist"]),
    ("missing_init_sft", "sft", ["--init_from=/nonexistent/ckpt.pt"], ["/nonexistent/ckpt.pt", "does not exist"]),
    ("block_size_too_long", "sft", ["--init_from={sft}", "--block_size=512"], ["--block_size=512", "256"]),
    ("rm_bad_json_line", "rm", ["--init_from={sft}", "--data={bad_json}"], ["{bad_json}:2:", "bad JSON"]),
    ("rm_bad_record_line", "rm", ["--init_from={sft}", "--data={bad_pref}"], ["{bad_pref}:3:", "rejected"]),
    ("sft_bad_record_line", "sft", ["--init_from={sft}", "--data={bad_sft}"], ["{bad_sft}:2:"]),
    ("K_1", "rm", ["--init_from={sft}", "--K=1"], ["argument --K", "≥ 2, got 1"]),
    ("response_length_too_long", "ppo", ["--init_from={sft}", "--reward_model={rm}", "--response_length=250"],
     ["--response_length=250", "block_size=256"]),
]
MODULES = {"sft": train_sft, "rm": train_rm, "ppo": train_ppo}


@pytest.mark.parametrize("name,script,flags,expect", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_flags_and_data_fail_clearly(chain, bad_files, tmp_path, name, script, flags, expect):
    fill = {"sft": chain["sft_ckpt"], "rm": chain["rm_ckpt"], **bad_files}
    argv = [f.format(**fill) for f in flags] + ["--threads=1", f"--out_dir={tmp_path / 'out'}"]
    code, out, err = run_main(MODULES[script], argv)  # any exception but SystemExit fails the test with its trace
    assert code == 2, f"exit {code}, expected 2\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, f"expected one 'error: ...' line, got {err!r}"
    for e in expect:
        assert e.format(**fill) in err, f"{e.format(**fill)!r} not in {err!r}"


def test_bad_flag_through_the_command_line(chain, bad_files):
    """The same contract through `python train_rm.py`: exit 2, the file:line, no traceback."""
    p = run_script("train_rm.py", f"--init_from={chain['sft_ckpt']}", f"--data={bad_files['bad_json']}",
                   "--threads=1", f"--out_dir={chain['dir'] / 'bad_cli'}")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"{bad_files['bad_json']}:2:" in p.stderr, p.stderr


# ----------------------------------------------------------------------------------------------------------------
# 5 and 6. PPO internals, in process: the frozen reference, PPO-ptx with γ = 0, masks after EOS


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ppo_reference_and_reward_model_never_change(chain, ppo_prompts):
    args = ppo_args(chain)
    m = ppo_setup(args)
    ref0, rm0, pol0 = snapshot(m["ref"]), snapshot(m["rm"]), snapshot(m["policy"])
    assert all(torch.equal(ref0[k], pol0[k]) for k in ref0)  # both start as the SFT model
    for i in range(2):
        batch = do_rollout(m, ppo_prompts[8 * i:8 * (i + 1)], args, seed=i)
        do_update(m, batch, args, seed=100 + i)
    assert all(torch.equal(ref0[k], v) for k, v in m["ref"].state_dict().items()), "the reference model moved"
    assert all(torch.equal(rm0[k], v) for k, v in m["rm"].state_dict().items()), "the reward model moved"
    assert not any(p.requires_grad for p in m["ref"].parameters())
    moved = [k for k, v in m["policy"].state_dict().items() if not torch.equal(pol0[k], v)]
    assert len(moved) > len(pol0) // 2, f"the policy barely moved: {moved}"


def test_ptx_coef_zero_is_plain_ppo(chain, ppo_prompts):
    from data.formats import load_sft
    path = C.prepare_builtin(quiet=True)["sft_val"]
    results = {}
    batch = None
    for name, coef, with_ptx in (("plain", 0.0, False), ("ptx0", 0.0, True), ("ptx1", 1.0, True)):
        args = ppo_args(chain, f"--ptx_coef={coef}", "--ptx_batch_size=4")
        m = ppo_setup(args)  # identical fresh states from the checkpoints
        if batch is None:
            batch = do_rollout(m, ppo_prompts[:8], args, seed=0)
        ptx = C.ChatData(load_sft(path), m["tok"], m["policy"].config.block_size, path) if with_ptx else None
        upd = do_update(m, batch, args, seed=7, ptx=ptx)
        results[name] = (snapshot(m["policy"]), snapshot(m["critic"]), upd)
    plain, ptx0, ptx1 = results["plain"], results["ptx0"], results["ptx1"]
    for net in (0, 1):
        assert all(torch.equal(plain[net][k], ptx0[net][k]) for k in plain[net]), "ptx_coef=0 differs from plain PPO"
    assert plain[2] == ptx0[2] and "ppo/loss/ptx" not in ptx0[2]
    # and the ptx path is really wired: γ = 1 changes the policy and logs its loss
    assert "ppo/loss/ptx" in ptx1[2] and ptx1[2]["ppo/loss/ptx"] > 0
    assert any(not torch.equal(plain[0][k], ptx1[0][k]) for k in plain[0]), "ptx_coef=1 changed nothing"


def test_ppo_rollout_masks_after_eos(chain, ppo_prompts):
    args = ppo_args(chain, "--batch_size=32")
    m = ppo_setup(args)
    b = do_rollout(m, ppo_prompts[:32], args, seed=3)
    tok = m["tok"]
    mask, resp = b["response_mask"], b["responses"]
    B, Tn = resp.shape
    assert mask.dtype == torch.bool and mask.shape == (B, Tn) == b["advantages"].shape == b["returns"].shape
    # the mask is a prefix: ones, then zeros
    assert torch.equal(mask, mask.long().cumprod(1).bool()), "response_mask has a hole"
    n = mask.sum(1)                                                                    # (B,) real tokens per row
    ends_early = (n < Tn).nonzero().squeeze(1).tolist()
    assert ends_early, "no response ended before the others: the test would check nothing"
    for i in ends_early:  # a row shorter than the batch ended with EOS, and after it there is only PAD
        assert resp[i, n[i] - 1] == tok.eos_id, f"row {i}: shorter than the batch but its last token is not EOS"
        assert (resp[i, n[i]:] == tok.pad_id).all()
    after = ~mask
    assert after.any()
    assert (b["advantages"][after] == 0).all(), "an advantage after EOS is not 0"
    assert (b["returns"][after] == 0).all(), "a return after EOS is not 0"
    assert (b["advantages"][mask] != 0).any() and (b["returns"][mask] != 0).any()  # not all zero anyway
    # the token counts and the logged length count real tokens only
    assert b["n_tokens"] == int(mask.sum())
    assert b["stats"]["response/length"].item() == pytest.approx(n.float().mean().item())


# ----------------------------------------------------------------------------------------------------------------
# regressions: bugs found while writing these tests, fixed since


def test_sft_resume_on_an_eval_step_keeps_the_eval_row(tmp_path):
    flags = SFT_TINY + ["--max_iters=8", "--eval_interval=4", "--n_eval_prompts=2", "--max_new_tokens=8"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_main(train_sft, flags + [f"--out_dir={a}"])[0] == 0
    assert run_main(train_sft, flags + [f"--out_dir={b}", "--stop_after=4"])[0] == 0
    assert run_main(train_sft, flags + [f"--out_dir={b}", "--resume=1"])[0] == 0
    ev_a = [r for r in read_jsonl(os.path.join(a, "log.jsonl")) if "val_loss" in r]
    ev_b = [r for r in read_jsonl(os.path.join(b, "log.jsonl")) if "val_loss" in r]
    assert [r["step"] for r in ev_a] == [4, 8]
    assert ev_b == ev_a, f"eval rows after resume at step 4: {[r['step'] for r in ev_b]}"


def test_sft_nan_guard_keeps_no_nan_checkpoint(tmp_path):
    out = str(tmp_path / "nan")
    code, _, err = run_main(train_sft, SFT_TINY + ["--max_iters=20", "--eval_interval=1", "--eval_iters=1",
                                                   "--n_eval_prompts=2", "--max_new_tokens=8", "--learning_rate=1e6",
                                                   "--warmup_iters=1", f"--out_dir={out}"])
    assert code == 2, err
    evals = [r for r in read_jsonl(os.path.join(out, "log.jsonl")) if "val_loss" in r]
    ck_path = os.path.join(out, "ckpt.pt")
    if os.path.exists(ck_path):  # whatever is kept must be a checkpoint whose held-out loss was finite
        it = torch.load(ck_path, weights_only=True)["iter"]
        assert all(math.isfinite(r["val_loss"]) for r in evals if r["step"] == it), \
            f"kept {ck_path} (step {it}) although its eval was {evals}; stderr: {err}"


def test_sft_continues_from_a_short_context_checkpoint_with_default_flags(tmp_path):
    first = str(tmp_path / "first")
    assert run_main(train_sft, SFT_TINY + ["--max_iters=1", "--block_size=64", "--eval_interval=100",
                                           "--n_eval_prompts=1", "--max_new_tokens=4", f"--out_dir={first}"])[0] == 0
    code, _, err = run_main(train_sft, SFT_TINY + [f"--init_from={first}/ckpt.pt", "--max_iters=1",
                                                   "--eval_interval=100", "--n_eval_prompts=1", "--max_new_tokens=4",
                                                   f"--out_dir={tmp_path / 'second'}"])
    assert code == 0, err


def test_rm_does_not_silently_reuse_comparisons_of_another_K(chain, tmp_path):
    import shutil
    out = tmp_path / "rm"
    out.mkdir()
    for split in ("train", "val"):  # K = 3 comparisons from the smoke chain, left in the run folder
        shutil.copy(os.path.join(chain["rm"], f"comparisons_{split}.jsonl"), out)
    code, _, err = run_main(train_rm, [f"--init_from={chain['sft_ckpt']}", "--K=4", "--n_prompts=8",
                                       "--n_val_prompts=4", "--batch_size=4", "--n_norm=0", "--threads=1",
                                       f"--out_dir={out}"])
    if code == 2:  # refusing with a clear message is a fix too
        assert "--K" in err or "--recollect" in err, err
    else:
        assert code == 0, err
        # a prompt keeps the responses that ended with EOS (2 to K of them); K = 3 files reused would top out at 3
        ks = {len(r["responses"]) for r in read_jsonl(os.path.join(out, "comparisons_train.jsonl"))}
        assert max(ks) == 4 and min(ks) >= 2, f"trained a --K=4 reward model on comparisons of K={ks}"


# ----------------------------------------------------------------------------------------------------------------
# sample.py on every stage's checkpoint, its chat mode driven by a pipe, and the report of a tiny run


def test_sample_py_on_each_stage(chain):
    for ckpt in (chain["sft_ckpt"], os.path.join(chain["ppo"], "ckpt.pt")):
        out = ok(run_script("sample.py", f"--ckpt={ckpt}", "--prompt=Tell me about cats.", "--num_samples=2",
                            "--max_new_tokens=12", "--device=cpu"))
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        assert len(rows) == 2 and all(r["prompt"] == "Tell me about cats." for r in rows), out.stdout
    out = ok(run_script("sample.py", f"--ckpt={chain['rm_ckpt']}", "--prompt=Tell me about cats.",
                        "--response=Cats are soft.", "--device=cpu"))
    assert out.stdout.startswith("score "), out.stdout
    bad = run_script("sample.py", f"--ckpt={chain['rm_ckpt']}", "--prompt=hi", "--device=cpu")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--response" in bad.stderr


def test_sample_py_chat_mode_with_piped_input(chain):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--ckpt={chain['sft_ckpt']}", "--chat=1",
                           "--max_new_tokens=12", "--device=cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                          input="Tell me about cats.\nAnd dogs?\nWhat about the sea?\n", timeout=120)
    ok(proc)
    replies = [line for line in proc.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 3, proc.stdout  # one reply per turn; the history is carried along


def test_chat_history_drops_oldest_turns_first(chain):
    import sample
    from tokenizer import render_prompt
    model, tok, _ = sample.load_policy(chain["sft_ckpt"], "cpu")
    messages = []
    for i in range(40):  # far more history than the context holds
        messages += [{"role": "user", "content": f"Tell me about cats number {i}."},
                     {"role": "assistant", "content": "Cats are soft. Cats like to nap in the sun."}]
    messages.append({"role": "user", "content": "And dogs?"})
    budget = model.config.block_size - 16
    ids = render_prompt(tok, messages, max_tokens=budget)
    text = tok.decode(ids)
    assert len(ids) <= budget and text.endswith("And dogs?\n\nAssistant:") and "number 39." in text
    assert "number 0." not in text  # the oldest turns went first


def test_report_from_a_tiny_run(chain, tmp_path):
    import report
    text = report.build(chain["sft"], chain["rm"], chain["ppo"], str(tmp_path))
    assert "| gold score" in text and "SFT" in text and "PPO" in text and "Answers side by side" in text
    assert os.path.exists(tmp_path / "report.md")
    if importlib.util.find_spec("matplotlib") is not None:
        assert os.path.exists(tmp_path / "ppo_scores.png") and os.path.exists(tmp_path / "ppo_kl.png")
    else:
        assert "matplotlib is not installed" in text


def test_rm_batches_group_similar_lengths():
    """Comparisons.epoch_order: a permutation of all items, deterministic for a seed, whose batches hold items of
    similar length (less padding than random batches), with a short last batch kept last."""
    import random
    from types import SimpleNamespace
    rng = random.Random(0)
    lengths = [rng.randint(10, 100) for _ in range(1000)]
    fake = SimpleNamespace(items=[None] * 1000, lengths=torch.tensor(lengths))
    order = C.Comparisons.epoch_order(fake, 16, torch.Generator().manual_seed(1))
    assert sorted(order.tolist()) == list(range(1000))
    assert torch.equal(order, C.Comparisons.epoch_order(fake, 16, torch.Generator().manual_seed(1)))
    assert not torch.equal(order, C.Comparisons.epoch_order(fake, 16, torch.Generator().manual_seed(2)))

    def padded(o):  # tokens a batch pads to, summed over the batches
        return sum(max(lengths[i] for i in b) * len(b) for b in o.split(16))
    random_order = torch.randperm(1000, generator=torch.Generator().manual_seed(1))
    assert padded(order) < 0.75 * padded(random_order), (padded(order), padded(random_order))
    assert len(order.split(16)[-1]) == 1000 % 16  # the short batch is the last one


def test_study_best_of_n_against_the_gold_ceiling(chain):
    """study.best_of_n: the RM's pick can be no better on gold than the gold pick among the same n samples, and the
    gold pick can only improve with n."""
    import reward
    import study
    from data import minichat
    from data.formats import load_prompts
    from model import GPT, GPTConfig
    from tokenizer import Tokenizer
    sft = C.load_checkpoint(chain["sft_ckpt"])
    policy = GPT(GPTConfig(**sft["model_args"]))
    policy.load_state_dict(sft["model"])
    rm, mu, sigma = reward.load_reward_model(C.load_checkpoint(chain["rm_ckpt"]))
    tok = Tokenizer.from_dict(sft["tokenizer"])
    prompts = load_prompts(C.prepare_builtin(quiet=True)["prompts_val"])[:3]
    rows = study.best_of_n(policy.eval(), rm, mu, sigma, tok, prompts, [1, 2, 4], 0.7, 16, 0, "cpu")
    assert [r["n"] for r in rows] == [1, 2, 4]
    assert rows[0]["gold"] == rows[0]["gold_ceiling"], "with n = 1 there is only one sample to pick"
    for small, big in zip(rows, rows[1:]):
        assert big["gold_ceiling"] >= small["gold_ceiling"] - 1e-9, "more samples cannot lower the best gold"
    for r in rows:
        assert r["gold"] <= r["gold_ceiling"] + 1e-9, r
        assert r["kl"] == pytest.approx(math.log(r["n"]) - (r["n"] - 1) / r["n"])
    assert all(-4.0 <= r["gold_ceiling"] <= minichat.GOLD_MAX for r in rows)
