"""Tests for train_rm.py's ensembles (--members, Coste et al. 2024) and its later rounds of iterated RLHF
(--collect_from, --prior_data), on the session's tiny chain (tests/runs.py). CPU, about half a minute.

    python -m pytest -q tests/test_ensemble.py
"""
import json
import os

import torch

import common as C
import reward
import train_rm
from runs import RM_CHAIN, load, read_json, read_jsonl, run_main, step_rows
from tokenizer import Tokenizer


def test_members_are_saved_scored_and_aggregated(chain, tmp_path):
    """--members=2: two finished, normalised reward models; member 0 is the single reward model of the same flags
    (the chain's); the summary's ensemble accuracy against the labels equals a count done here, pair by pair, on the
    members' own normalised scores averaged by hand."""
    out = str(tmp_path / "ens")
    code, stdout, err = run_main(train_rm, [f"--init_from={chain['sft_ckpt']}", *RM_CHAIN, "--members=2",
                                            f"--out_dir={out}"])
    assert code == 0, err
    cks = [load(os.path.join(out, name)) for name in ("ckpt.pt", "ckpt1.pt")]
    assert all(ck["complete"] and ck["normalised"] and ck["stage"] == "rm" for ck in cks)
    single = load(chain["rm_ckpt"])
    for key, w in single["model"].items():
        torch.testing.assert_close(cks[0]["model"][key], w, atol=1e-6, rtol=0, msg=f"member 0 differs at {key}")
    assert (cks[0]["model"]["head.weight"] - cks[1]["model"]["head.weight"]).abs().max() > 1e-3, "the same head"
    summary = read_json(os.path.join(out, "summary.json"))
    assert [m["mu"] for m in summary["members"]] == [cks[0]["mu"], cks[1]["mu"]]
    assert summary["ensemble_reward_model"] == f"{out}/ckpt.pt,{out}/ckpt1.pt"
    assert os.path.exists(os.path.join(out, "log1.jsonl")) and "the ensemble for PPO" in stdout

    # the reference: each member scores every held-out response on its own, normalised by its μ, σ; mean; pairs
    tok = Tokenizer.from_dict(single["tokenizer"])
    items = [json.loads(line) for line in open(os.path.join(out, "comparisons_val.jsonl"))]
    from data.formats import load_preferences
    val = C.Comparisons(load_preferences(os.path.join(out, "comparisons_val.jsonl")), tok, 256, "val")
    assert len(val.items) == len(items)
    members = [reward.load_reward_model(ck) for ck in cks]
    right = total = 0
    with torch.no_grad():
        per_member = [train_rm.batch_rewards(rm, val.batch(list(range(len(items))), "cpu"), "cpu", "float32")
                      for rm, _, _ in members]
    k = per_member[0][1]
    mean = sum(reward.normalize(r, mu, sd) for (r, _), (_, mu, sd) in zip(per_member, members)) / 2   # (N, K)
    for n in range(len(items)):
        for i in range(int(k[n])):
            for j in range(i + 1, int(k[n])):  # i ranked above j by the labeler
                right += bool(mean[n, i] > mean[n, j])
                total += 1
    assert total > 10
    assert abs(summary["ensemble"]["mean"]["val_accuracy"] - right / total) < 1e-9
    assert set(summary["ensemble"]) == {"mean", "worst", "uwo"}
    assert "val_accuracy_gold" in summary["ensemble"]["uwo"] and "val_accuracy_gold" in summary["members"][1]


def test_members_resume_equals_uninterrupted(chain, tmp_path):
    """Stopped inside the second member (--stop_after counts the steps of the whole run), resumed: both members'
    logs and weights are those of the uninterrupted run."""
    flags = [f"--init_from={chain['sft_ckpt']}", f"--data={chain['rm']}/comparisons_train.jsonl",
             f"--val_data={chain['rm']}/comparisons_val.jsonl", "--batch_size=4", "--epochs=1", "--eval_interval=4",
             "--n_norm=0", "--threads=1", "--members=2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_main(train_rm, flags + [f"--out_dir={a}"])[0] == 0
    code, out, err = run_main(train_rm, flags + [f"--out_dir={b}", "--stop_after=8"])  # 6 steps per member
    assert code == 0 and "--stop_after" in out, err
    assert len(step_rows(os.path.join(b, "log1.jsonl"))) == 2
    code, out, err = run_main(train_rm, flags + [f"--out_dir={b}", "--resume=1"])
    assert code == 0, err
    assert f"resuming {os.path.join(b, 'ckpt1.pt')} at step 2" in out
    for name in ("log.jsonl", "log1.jsonl"):
        assert step_rows(os.path.join(a, name)) == step_rows(os.path.join(b, name)), name
    for name in ("ckpt.pt", "ckpt1.pt"):
        wa, wb = load(os.path.join(a, name))["model"], load(os.path.join(b, name))["model"]
        assert all(torch.equal(wa[key], wb[key]) for key in wa), f"{name}: weights differ after resume"
    assert read_json(os.path.join(a, "summary.json"))["ensemble"] == read_json(os.path.join(b, "summary.json"))["ensemble"]


def test_round_two_samples_the_ppo_policy_and_keeps_round_one(chain, tmp_path):
    """--collect_from=<PPO checkpoint> --prior_data=<round 1's comparisons>: the new comparisons are the PPO
    policy's answers (with the same prompts and seed the SFT policy gave the chain's), trained on with round 1's."""
    out = str(tmp_path / "round2")
    round1 = f"{chain['rm']}/comparisons_train.jsonl"
    code, stdout, err = run_main(train_rm, [f"--init_from={chain['sft_ckpt']}", *RM_CHAIN,
                                            f"--collect_from={chain['ppo_ckpt']}", f"--prior_data={round1}",
                                            f"--out_dir={out}"])
    assert code == 0, err
    meta = read_json(os.path.join(out, "comparisons_meta.json"))
    assert meta["init_from"] == os.path.abspath(chain["ppo_ckpt"])
    new, old = read_jsonl(os.path.join(out, "comparisons_train.jsonl")), read_jsonl(round1)
    assert [r["prompt"] for r in new[:5]] == [r["prompt"] for r in old[:5]]  # the same prompts ...
    assert [r["responses"] for r in new] != [r["responses"] for r in old]  # ... answered by another policy
    summary = read_json(os.path.join(out, "summary.json"))
    assert summary["train_prompts"] == len(new) + len(old)
    assert f"adding {len(old)} comparisons of an earlier round" in stdout


def test_study_runs_the_ensemble_rows(chain, tmp_path):
    """study.py with an ensemble of two: its mean and uncertainty-weighted rows are there, and on the same samples
    (best-of-1, PPO's iteration-0 evaluation) the uwo proxy is the mean proxy minus a variance: never above it."""
    import study
    ck = load(chain["rm_ckpt"])
    ck["model"]["head.weight"] = ck["model"]["head.weight"] * -0.5  # a second member that disagrees
    other = str(tmp_path / "rm_b.pt")
    torch.save(ck, other)
    out = str(tmp_path / "study")
    code, stdout, err = run_main(study, [f"--sft={chain['sft_ckpt']}", f"--rm={chain['rm_ckpt']}", "--big_rm=0",
                                         f"--ensemble_rm={chain['rm_ckpt']},{other}", "--kl_coefs=0", "--iters=2",
                                         "--eval_interval=1", "--n_eval_prompts=6", "--bon_n=1,2", "--max_new_tokens=16",
                                         f"--out_dir={out}", "--device=cpu"])
    assert code == 0, err
    res = read_json(os.path.join(out, "study.json"))
    assert {"rm", "ensemble_mean", "ensemble_uwo"} <= set(res)
    mean, uwo = res["ensemble_mean"], res["ensemble_uwo"]
    assert mean["members"] == uwo["members"] == 2 and uwo["aggregate"] == "uwo"
    assert uwo["bon"][0]["proxy"] < mean["bon"][0]["proxy"] - 1e-4  # the members disagree: a real penalty
    assert uwo["bon"][0]["gold"] == mean["bon"][0]["gold"]  # best-of-1: the same samples
    assert uwo["ppo"]["0.0"][0]["proxy"] < mean["ppo"]["0.0"][0]["proxy"]
    assert "an ensemble of 2 reward models, aggregated by uwo" in open(os.path.join(out, "study.md")).read()
