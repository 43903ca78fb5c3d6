"""The PPO loop's invariants, checked where they can fail, each pinned by a test that failed before its fix:
the sampler's own log-probs against the training forward (RLHF_DETAILS #27 in its real meaning), the d that
PPO-penalty's β rule reads, bf16 autocast with a reference that computes exactly as the policy, the reward
normalisation measured on the token ids PPO scores, what --vf_coef does with a separate critic, and no stage script
importing another. The torchrun items (per-rank random streams on resume, the controller's global episode count)
are in test_distributed.py.

In process on the session's tiny SFT -> RM chain (conftest.py). CPU, one thread, a few seconds.

    python -m pytest -q tests/test_ppo_invariants.py
"""
import ast
import os

import pytest
import torch

import common as C
import reward
import train_ppo
import train_rm
from runs import ROOT, do_rollout, do_update, ppo_args, ppo_setup, read_json, step_rows


# ----------------------------------------------------------------------------------------------------------------
# 1. sampler against trainer


def test_rollout_checks_the_sampler_against_the_training_forward(chain, ppo_prompts, monkeypatch):
    """A sampler that draws at another temperature than the one every log-prob uses (the kind of mismatch the old
    ρ ≡ 1 check could not see: it compared the training forward with itself) stops the rollout."""
    args = ppo_args(chain)
    m = ppo_setup(args)
    b = do_rollout(m, ppo_prompts[:8], args, seed=0)  # the honest sampler passes, and the gap is measured
    assert 0 < b["stats"]["ppo/sampler_max_dev"].item() <= 1e-4
    generate = m["policy"].generate
    monkeypatch.setattr(m["policy"], "generate", lambda *a, **k: generate(*a, **{**k, "temperature": 0.9}))
    with pytest.raises(AssertionError, match="sampler against trainer"):
        do_rollout(m, ppo_prompts[:8], args, seed=0)


def test_every_iteration_logs_the_sampler_gap(chain):
    rows = step_rows(os.path.join(chain["ppo"], "log.jsonl"))
    gaps = [r["ppo/sampler_max_dev"] for r in rows]
    assert len(gaps) == 3 and all(0 <= g <= 1e-4 for g in gaps), gaps


# ----------------------------------------------------------------------------------------------------------------
# 2. PPO-penalty's β rule reads KL(π_old ‖ π_θ) after the update


def test_penalty_beta_reads_the_kl_after_the_update(chain, ppo_prompts):
    args = ppo_args(chain, "--policy_loss=penalty", "--learning_rate=3e-3")
    m = ppo_setup(args)
    batch = do_rollout(m, ppo_prompts[:8], args, seed=1)
    upd = do_update(m, batch, args, seed=2)
    # the policy as the update left it, on the rollout's tokens (drawn from π_old): k3 of log π_θ/π_old
    with torch.no_grad():
        new = C.response_logprobs(m["policy"], batch["tokens"], batch["attn_mask"], batch["responses"],
                                          batch["response_mask"], batch["Tp"], args.temperature)
    log_ratio = (new - batch["logprobs"]).double()
    k3 = (log_ratio.exp() - 1 - log_ratio)[batch["response_mask"]]  # (ρ − 1) − log ρ on the real tokens
    d_after = k3.mean().item()
    assert d_after > 1e-4, "the update barely moved the policy: the test would not tell the two d's apart"
    assert upd["ppo/policy/kl_old_new"] == pytest.approx(d_after, rel=1e-4), \
        f"β rule read d = {upd['ppo/policy/kl_old_new']}, the KL after the update is {d_after}"


# ----------------------------------------------------------------------------------------------------------------
# 4. mixed precision: bf16 autocast, the reference computing exactly as the policy


def test_bf16_autocast_is_real_on_cpu():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with C.autocast("cpu", "bfloat16"):
        assert (a @ b).dtype == torch.bfloat16, "--dtype=bfloat16 on CPU ran in fp32"
    with C.autocast("cpu", "float32"):
        assert (a @ b).dtype == torch.float32


def test_bf16_kl_to_the_reference_is_exactly_zero_at_iteration_0(chain, ppo_prompts):
    args = ppo_args(chain, "--dtype=bfloat16")
    m = ppo_setup(args)
    assert all(p.dtype == torch.float32 for p in m["ref"].parameters()), "the reference must keep the policy's dtype"
    b = do_rollout(m, ppo_prompts[:16], args, seed=3, dtype="bfloat16")
    assert b["stats"]["objective/kl"].item() == 0.0 and b["stats"]["objective/kl_k3"].item() == 0.0
    # bf16 is really on: the sampler (KV cache) and the full forward round differently, within the stated tolerance
    dev = b["stats"]["ppo/sampler_max_dev"].item()
    assert 1e-4 < dev <= train_ppo.SAMPLER_TOLERANCE["bfloat16"], dev
    do_update(m, b, args, seed=4, dtype="bfloat16")  # its first-minibatch check (ρ ≡ 1) holds in bf16 too


def test_fp16_is_refused_in_one_line(chain, tmp_path):
    from runs import run_main
    import train_sft
    code, _, err = run_main(train_sft, ["--dtype=float16", f"--out_dir={tmp_path}"])
    assert code == 2 and "--dtype=float16 is not supported" in err, err


# ----------------------------------------------------------------------------------------------------------------
# 5. the normalisation is measured on what PPO scores


def test_normalisation_scores_the_sampled_ids(chain, monkeypatch):
    """measure_normalisation must score the sampler's own ids (left-padded prompt + response up to EOS), the very
    tensors PPO's rollout hands the reward model, not the responses' text decoded and encoded again."""
    from data.formats import load_prompts
    from tokenizer import render_prompt
    ck = C.load_checkpoint(chain["sft_ckpt"])
    policy = train_ppo.GPT(train_ppo.GPTConfig(**ck["model_args"]))
    policy.load_state_dict(ck["model"])
    policy.eval()
    rm, mu, sigma = reward.load_reward_model(C.load_checkpoint(chain["rm_ckpt"]))
    from tokenizer import Tokenizer
    tok = Tokenizer.from_dict(ck["tokenizer"])
    requests = load_prompts(C.prepare_builtin(quiet=True)["prompts_val"])[:24]
    seen = []
    score = reward.score
    monkeypatch.setattr(reward, "score", lambda model, x, mask: seen.append((x, mask)) or score(model, x, mask))
    mean, std = train_rm.measure_normalisation(rm, policy, tok, requests, 16, 0.7, 5, "cpu", "float32")
    prompts = [render_prompt(tok, r, max_tokens=256 - 16) for r in requests]
    want = C.sample_responses(policy, tok, prompts, 16, 0.7, torch.Generator().manual_seed(5), "cpu", "float32")
    assert len(seen) == 1, "24 prompts are one scoring batch"
    x, mask = seen[0]
    assert torch.equal(x, want["tokens"]) and torch.equal(mask.bool(), want["attn_mask"]), \
        "the normalisation scored other token ids than the ones PPO samples and scores"
    with torch.no_grad():
        raw = score(rm, want["tokens"], want["attn_mask"])[want["has_eos"]].double()
    assert mean == pytest.approx(raw.mean().item(), abs=1e-6)
    assert std == pytest.approx(raw.std(unbiased=False).item(), abs=1e-6)


def test_reward_model_normalisation_check_holds(chain, tmp_path):
    """RLHF_DETAILS #13: normalised with μ, σ of one set of SFT samples, a fresh set scores mean 0 ± 0.1 and std
    1 ± 0.1 (the check train_rm.py writes to its summary; 600 + 600 samples of the chain's tiny SFT model)."""
    from runs import run_main
    out = str(tmp_path / "rm")
    from runs import RM_CHAIN
    code, _, err = run_main(train_rm, [f"--init_from={chain['sft_ckpt']}", *RM_CHAIN, "--n_norm=600",
                                       f"--out_dir={out}"])
    assert code == 0, err
    s = read_json(os.path.join(out, "summary.json"))
    assert abs(s["normalised_check_mean"]) <= 0.1 and abs(s["normalised_check_std"] - 1) <= 0.1, s
    assert s["reward_std"] > 0.05, "a near-constant reward model would make the check meaningless"


# ----------------------------------------------------------------------------------------------------------------
# 6. --vf_coef with a separate critic and its own Adam


def test_vf_coef_does_not_change_the_separate_critics_steps(chain, ppo_prompts):
    """What --help says: the critic has its own Adam, which divides each step by the gradient's scale, and a clip at
    --grad_clip rescales the gradient to a fixed norm; so vf_coef = 0.1 and 1.0 move the critic alike (up to Adam's
    ε) whether the clip is off or active, and the policy exactly alike, while the critic's learning rate does move
    it (the comparison that shows the test can see a change)."""
    def steps(*flags):
        args = ppo_args(chain, *flags)
        m = ppo_setup(args)
        start = {k: v.clone() for k, v in m["critic"].state_dict().items()}
        do_update(m, do_rollout(m, ppo_prompts[:8], args, seed=6), args, seed=7)
        step = torch.cat([(v - start[k]).flatten() for k, v in m["critic"].state_dict().items()])
        return step, torch.cat([p.detach().flatten() for p in m["policy"].parameters()])

    unclipped = None
    for clip in ("--grad_clip=0", "--grad_clip=1e-4"):
        a, pa = steps("--vf_coef=0.1", clip)
        b, pb = steps("--vf_coef=1.0", clip)
        assert torch.equal(pa, pb), "the value loss's weight reached the policy"
        assert (a - b).norm() < 0.05 * a.norm(), (clip, (a - b).norm(), a.norm())
        unclipped = a if unclipped is None else unclipped
    c, _ = steps("--vf_coef=0.1", "--grad_clip=0", "--critic_learning_rate=5e-5")  # a tenth of the default
    assert c.norm() < 0.25 * unclipped.norm(), (c.norm(), unclipped.norm())  # ~ a tenth (Adam's steps ∝ lr)


# ----------------------------------------------------------------------------------------------------------------
# 7. no stage script imports another


@pytest.mark.parametrize("script", ["train_sft.py", "train_rm.py", "train_ppo.py"])
def test_no_stage_script_imports_another(script):
    stages = {"train_sft", "train_rm", "train_ppo"} - {script[:-3]}
    names = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, script)).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & stages, f"{script} imports {names & stages}: move what both use to common.py"
