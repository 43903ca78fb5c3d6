"""Beside PPO: the critic-free estimators on the same loop (train_ppo.py --algo=rloo|grpo) and DPO's stage script
(train_dpo.py), end to end on the session's tiny SFT -> RM chain, with what each must do and PPO must not lose.

    python -m pytest -q tests/test_methods.py
"""
import math
import os

import pytest
import torch

import reward
import train_dpo
import train_ppo
from runs import do_rollout, load, ppo_args, ppo_setup, read_json, read_jsonl, run_main, run_script, step_rows

TINY = ["--iters=2", "--batch_size=8", "--num_minibatches=2", "--ppo_epochs=2", "--response_length=16",
        "--n_eval_prompts=8", "--eval_interval=100", "--n_show=0", "--threads=1"]


@pytest.mark.parametrize("flags", [["--algo=rloo"], ["--algo=rloo", "--rloo_loss=reinforce"], ["--algo=grpo"],
                                   ["--algo=grpo", "--dr_grpo=1"]], ids=["rloo", "rloo_reinforce", "grpo", "dr_grpo"])
def test_critic_free_runs(chain, tmp_path, flags):
    out = str(tmp_path / "run")
    code, _, err = run_main(train_ppo, [f"--init_from={chain['sft_ckpt']}", f"--reward_model={chain['rm_ckpt']}",
                                        *TINY, *flags, "--group_size=4", f"--out_dir={out}"])
    assert code == 0, err
    rows = step_rows(os.path.join(out, "log.jsonl"))
    assert len(rows) == 2 and rows[0]["objective/kl"] == 0.0
    assert not any(k.startswith(("ppo/val/", "ppo/loss/value")) for k in rows[0]), "a critic-free run logged a critic"
    assert all(math.isfinite(r["ppo/loss/policy"]) for r in rows)
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["critic"] is None and ck["opt_critic"] is None and ck["algo"] == flags[0].split("=")[1]
    if "grpo" in flags[0]:
        assert all("ppo/policy/kl_ref" in r for r in rows)


def test_rollout_groups_and_advantages(chain, ppo_prompts):
    """k answers per prompt in consecutive rows; RLOO's advantages sum to 0 in each group (leave-one-out:
    Σ_i (r_i − mean_{j≠i} r_j) = 0) and are the same at every token of an answer; GRPO's have mean 0 and sample std
    1 in each group; Dr. GRPO's have mean 0 but keep the scores' scale. No critic is built."""
    prompts = [p for p in ppo_prompts[:4] for _ in range(4)]  # as train_ppo.main repeats them
    out = {}
    for name, flags in (("rloo", ["--algo=rloo"]), ("grpo", ["--algo=grpo"]), ("dr", ["--algo=grpo", "--dr_grpo=1"])):
        args = ppo_args(chain, *flags, "--group_size=4", "--batch_size=16")
        m = ppo_setup(args)
        assert m["critic"] is None
        b = do_rollout(m, prompts, args, seed=0)
        Tp = b["Tp"]
        assert all(torch.equal(b["tokens"][4 * g, :Tp], b["tokens"][4 * g + i, :Tp]) for g in range(4) for i in range(4))
        a = b["seq_advantages"].view(4, 4).double()
        mask = b["response_mask"]
        assert torch.equal(b["advantages"], b["seq_advantages"][:, None] * mask)  # one advantage per answer
        out[name] = a
    assert out["rloo"].sum(1).abs().max() < 1e-5
    assert out["grpo"].mean(1).abs().max() < 1e-5
    spread = out["dr"].std(1) > 1e-3  # groups whose answers scored differently
    assert spread.any()
    assert (out["grpo"].std(1)[spread] - 1).abs().max() < 1e-2
    assert (out["dr"].mean(1)).abs().max() < 1e-5 and (out["dr"].std(1)[spread] - 1).abs().max() > 1e-2


def test_group_size_must_divide_the_batch(chain, tmp_path):
    code, _, err = run_main(train_ppo, [f"--init_from={chain['sft_ckpt']}", f"--reward_model={chain['rm_ckpt']}",
                                        "--algo=rloo", "--group_size=3", "--batch_size=8", f"--out_dir={tmp_path}"])
    assert code == 2 and "--group_size=3" in err, err
    code, _, err = run_main(train_ppo, ["--algo=grpo", "--group_size=1", f"--out_dir={tmp_path}"])
    assert code == 2 and "--group_size ≥ 2" in err, err


# ----------------------------------------------------------------------------------------------------------------
# DPO


def dpo_flags(chain, *extra):
    return [f"--init_from={chain['sft_ckpt']}", f"--rm_dir={chain['rm']}", f"--reward_model={chain['rm_ckpt']}",
            "--batch_size=4", "--n_eval_prompts=8", "--response_length=16", "--n_show=0", "--threads=1",
            "--eval_interval=3", *extra]


@pytest.mark.parametrize("loss", ["dpo", "dpo_pl", "ipo"])
def test_dpo_runs_on_the_reward_models_comparisons(chain, tmp_path, loss):
    out = str(tmp_path / loss)
    code, stdout, err = run_main(train_dpo, dpo_flags(chain, f"--loss={loss}", "--learning_rate=1e-3",
                                                      f"--out_dir={out}"))
    assert code == 0, err
    rows = step_rows(os.path.join(out, "log.jsonl"))
    n_train = len(read_jsonl(os.path.join(chain["rm"], "comparisons_train.jsonl")))
    assert [r["step"] for r in rows] == list(range(math.ceil(n_train / 4)))
    if loss == "dpo":  # π = π_ref at step 0: every pair's DPO loss is ln 2
        assert abs(rows[0]["loss"] - math.log(2)) < 1e-5, rows[0]
    elif loss == "ipo":  # ... and every pair's IPO loss (0 − 1/(2β))² = 25 at β = 0.1
        assert abs(rows[0]["loss"] - 25.0) < 1e-4, rows[0]
    assert rows[0]["logratio/chosen"] == 0.0
    s = read_json(os.path.join(out, "summary.json"))
    for k in ("val_accuracy_before", "val_accuracy_after", "val_accuracy_gold_after", "gold_before", "gold_after",
              "kl_before", "kl_after", "score_after"):
        assert k in s and math.isfinite(s[k]), (k, s)
    assert s["kl_before"] == 0.0 and s["kl_after"] != 0.0
    assert load(os.path.join(out, "ckpt.pt"))["stage"] == "dpo"


def test_dpo_moves_the_implicit_reward_toward_the_labels(chain, tmp_path):
    """Three epochs on the chain's comparisons: the chosen answers' log-ratio rises and the training pairs' accuracy
    of the implicit reward goes up from chance (ties at step 0: every r is 0)."""
    out = str(tmp_path / "dpo")
    code, _, err = run_main(train_dpo, dpo_flags(chain, "--epochs=3", "--learning_rate=3e-3", "--beta=0.5",
                                                 f"--out_dir={out}"))
    assert code == 0, err
    rows = step_rows(os.path.join(out, "log.jsonl"))
    assert rows[0]["accuracy"] == 0.0  # r_w > r_l is false for every pair when all r are 0
    first, last = rows[:6], rows[-6:]
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first)
    assert sum(r["accuracy"] for r in last) / 6 > 0.6, [r["accuracy"] for r in last]


def test_dpo_resume_equals_uninterrupted(chain, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = dpo_flags(chain, "--epochs=2")
    assert run_main(train_dpo, flags + [f"--out_dir={a}"])[0] == 0
    assert run_main(train_dpo, flags + [f"--out_dir={b}", "--stop_after=5"])[0] == 0
    code, out, err = run_main(train_dpo, flags + [f"--out_dir={b}", "--resume=1"])
    assert code == 0 and "resuming" in out, err
    assert step_rows(os.path.join(a, "log.jsonl")) == step_rows(os.path.join(b, "log.jsonl"))
    sa, sb = load(os.path.join(a, "ckpt.pt"))["model"], load(os.path.join(b, "ckpt.pt"))["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert read_json(os.path.join(a, "evals.json")) == read_json(os.path.join(b, "evals.json"))


def test_dpo_checkpoint_talks_through_sample_py(chain, tmp_path):
    out = str(tmp_path / "dpo")
    assert run_main(train_dpo, dpo_flags(chain, f"--out_dir={out}"))[0] == 0
    p = run_script("sample.py", f"--ckpt={out}/ckpt.pt", "--prompt=Tell me about cats.", "--max_new_tokens=8",
                   "--device=cpu")
    assert p.returncode == 0 and p.stdout.startswith("{"), p.stderr[-2000:]


def test_dpo_implicit_reward_is_beta_log_ratio(chain):
    """train_dpo.sequence_logprobs sums the response tokens' log-probs only (not the prompt's): checked against a
    token-by-token sum through the full logits of one sequence."""
    import common as C
    from model import GPT, GPTConfig
    from tokenizer import Tokenizer
    ck = load(chain["sft_ckpt"])
    model = GPT(GPTConfig(**ck["model_args"]))
    model.load_state_dict(ck["model"])
    model.eval()
    tok = Tokenizer.from_dict(ck["tokenizer"])
    items = [{"prompt": [{"role": "user", "content": "Tell me about cats."}], "responses": ["Cats are soft.", "No."]}]
    comps = C.Comparisons(items, tok, 256, "test")
    batch = comps.batch([0], "cpu")
    with torch.no_grad():
        lp, k = train_dpo.sequence_logprobs(model, batch, 0.7)
        for j, (ids, learn) in enumerate(zip(comps.items[0], comps.learn[0])):
            logits = model(torch.tensor([ids]))[0][0] / 0.7                            # (T, V)
            logp = torch.log_softmax(logits.float(), -1)
            want = sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if learn[t])
            assert abs(lp[0, j].item() - want) < 1e-4, (j, lp[0, j].item(), want)
    assert k.tolist() == [2] and reward.ranking_loss(0.0 * lp, k).item() == pytest.approx(math.log(2))
