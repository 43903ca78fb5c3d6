"""Tests for the PPO loop of train_ppo.py, the behaviour no unit test of ppo.py can see: the critic starts as the
normalised reward model (RLHF_DETAILS #22), the missing-EOS penalty reaches the returns through rollout (#16), the
first-minibatch check of update fires on a mismatch and ignores padding (#27), the learning rate anneals linearly to
0 (#30), the adaptive controller moves β by its exact factor (#28), and tiny end-to-end runs of --policy_loss=penalty,
--whiten_rewards=1, --target_kl=0 and --oracle=1, each compared with a plain run of the same seed: the flag must
change what it is for, and nothing of the first rollout that it has no business changing.

Every run is in process (runs.run_main) on the session's tiny SFT -> RM chain (conftest.py), with spies on
train_ppo.rollout and train_ppo.update that record what the loop hands them. CPU, one thread, about 6 s
(plus about 10 s for the chain when this file runs alone).

    python -m pytest -q tests/test_ppo_loop.py
"""
import math
import os

import pytest
import torch

import common as C
import reward
import train_ppo
from runs import do_rollout, do_update, ppo_args, ppo_setup, read_json, run_main, step_rows

# the same tiny run as the smoke chain's, 3 iterations so that β is adapted twice (the first KL is exactly 0), a short
# controller horizon so that its factor 1 ± 0.2·8/40 = 1 ± 0.04 is large, and 16 held-out prompts so that the SFT
# gold on them has a spread (the oracle divides by it)
TINY = ["--iters=3", "--batch_size=8", "--num_minibatches=2", "--ppo_epochs=2", "--response_length=16",
        "--n_eval_prompts=16", "--eval_interval=100", "--n_show=0", "--threads=1", "--kl_horizon=40"]
# what one rollout decides, before any update: a flag that only changes the update or the rewards leaves these alone
ROLLOUT_KEYS = ["objective/kl", "objective/kl_k3", "objective/entropy", "objective/rm_raw", "response/length",
                "response/eos_share", "ppo/val/mean"]


# ----------------------------------------------------------------------------------------------------------------
# helpers (the in-process pattern of test_scripts.py)


def has_eos(batch, eos_id):
    """Which responses of a rollout ended with EOS, read from its tokens (not from the rollout's own flag)."""
    return ((batch["responses"] == eos_id) & batch["response_mask"]).any(1)                   # (B,)


def last_real(x, mask):
    """x at the last real response token of each row. x, mask: (B, Tn) -> (B,)"""
    n = mask.long().sum(1)                                                                     # (B,)
    return x.gather(1, (n - 1)[:, None]).squeeze(1)


def rm_scores(m, batch):
    """(r − μ)/σ of a rollout's prompt + response, scored here by the frozen reward model."""
    with torch.no_grad():
        raw = reward.score(m["rm"], batch["tokens"], batch["attn_mask"])
    return (raw - m["mu"]) / m["sigma"]


@pytest.fixture(scope="module")
def tiny_run(chain, tmp_path_factory):
    """run(name, *flags): train_ppo.main on the chain with TINY + flags, once per name. Returns the step rows of
    log.jsonl, evals.json, summary.json, and what the spies saw: the optimizers' learning rates at each call of
    update, and the prompts and batch of each call of rollout."""
    done = {}
    real_rollout, real_update = train_ppo.rollout, train_ppo.update

    def run(name, *flags):
        if name in done:
            return done[name]
        seen = {"lr_policy": [], "lr_critic": [], "prompts": [], "batches": []}

        def rollout_spy(*a, **kw):
            batch = real_rollout(*a, **kw)
            seen["prompts"].append(a[7])
            seen["batches"].append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
            return batch

        def update_spy(*a, **kw):
            opt_policy, opt_critic = a[2], a[3]
            seen["lr_policy"].append([g["lr"] for g in opt_policy.param_groups])
            seen["lr_critic"].append([g["lr"] for g in opt_critic.param_groups])
            return real_update(*a, **kw)

        out = str(tmp_path_factory.mktemp(name))
        argv = [f"--init_from={chain['sft_ckpt']}", f"--reward_model={chain['rm_ckpt']}", *TINY, *flags,
                f"--out_dir={out}"]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_ppo, "rollout", rollout_spy)
            mp.setattr(train_ppo, "update", update_spy)
            code, stdout, err = run_main(train_ppo, argv)
        assert code == 0, f"train_ppo {' '.join(flags)}: exit {code}\n{err[-3000:]}"
        done[name] = {"rows": step_rows(os.path.join(out, "log.jsonl")),
                      "evals": read_json(os.path.join(out, "evals.json")),
                      "summary": read_json(os.path.join(out, "summary.json")), **seen}
        return done[name]
    return run


# ----------------------------------------------------------------------------------------------------------------
# the critic, the missing-EOS penalty, the first-minibatch check (in process, one rollout each)


def test_critic_starts_as_the_normalised_reward_model(chain, ppo_prompts):
    """RLHF_DETAILS #22 with #13: load_models folds μ, σ into the critic's head, so before training V at the last
    real token of prompt + response is the normalised score (r − μ)/σ the rollout pays, on left-padded prompts and
    right-padded responses alike."""
    args = ppo_args(chain, "--batch_size=16")
    m = ppo_setup(args)
    assert abs(m["mu"]) > 0.05 and abs(m["sigma"] - 1) > 0.05, \
        f"μ = {m['mu']}, σ = {m['sigma']}: too close to 0 and 1 for the test to tell (r − μ)/σ from r"
    batch = do_rollout(m, ppo_prompts[:16], args, seed=0)
    assert (~batch["response_mask"]).any() and (batch["tokens"][:, 0] == m["tok"].pad_id).any(), \
        "no right or no left padding in the batch: the last-real-token index would be untested"
    with torch.no_grad():
        values = m["critic"](batch["tokens"], attention_mask=batch["attn_mask"])                # (B, T)
    v_last = values.gather(1, reward.last_token_index(batch["attn_mask"])[:, None]).squeeze(1)  # (B,)
    expected = rm_scores(m, batch)
    torch.testing.assert_close(v_last, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        raw = reward.score(m["rm"], batch["tokens"], batch["attn_mask"])
    # unfolded, V would equal the raw score at every sample (0 difference); one sample can sit near r = μ/(1 − σ),
    # where the two agree anyway, so the largest difference is what tells them apart
    assert (v_last - raw).abs().max() > 0.1, "the critic reads the raw score: the normalisation was not folded in"


def test_an_ensemble_scores_the_aggregate_of_its_members(chain, ppo_prompts, tmp_path):
    """--reward_model=a,b: the rollout pays the aggregate of the two members' own normalised scores (each computed
    here through a one-member run on the same samples), and the critic starts as the first member."""
    ck = torch.load(chain["rm_ckpt"], map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    ck["model"]["head.weight"] = ck["model"]["head.weight"] + 0.5 * torch.randn(ck["model"]["head.weight"].shape, generator=g)
    ck["mu"], ck["sigma"] = ck["mu"] + 0.3, ck["sigma"] * 1.7
    other = str(tmp_path / "rm_b.pt")
    torch.save(ck, other)
    single = {}
    for name, path in (("a", chain["rm_ckpt"]), ("b", other)):
        args = ppo_args(chain, f"--reward_model={path}", "--batch_size=16")
        m = ppo_setup(args)
        batch = do_rollout(m, ppo_prompts[:16], args, seed=3)
        single[name] = (rm_scores(m, batch), batch)
    assert (single["a"][0] - single["b"][0]).abs().max() > 0.1, "the two members agree: nothing to aggregate"
    both = torch.stack([single["a"][0], single["b"][0]])                                  # (2, B)
    for how, expected in (("mean", both.mean(0)), ("worst", both.min(0).values),
                          ("uwo", both.mean(0) - 0.5 * ((both[0] - both[1]) / 2) ** 2)):  # variance of 2: (Δ/2)²
        args = ppo_args(chain, f"--reward_model={chain['rm_ckpt']},{other}", f"--rm_aggregate={how}",
                        "--uwo_lambda=0.5", "--batch_size=16")
        m = ppo_setup(args)
        assert (m["mu"], m["sigma"]) == (0.0, 1.0)
        batch = do_rollout(m, ppo_prompts[:16], args, seed=3)
        assert torch.equal(batch["responses"], single["a"][1]["responses"])  # the same samples
        torch.testing.assert_close(rm_scores(m, batch), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(batch["stats"]["objective/rm_raw"], expected.mean(), atol=1e-5, rtol=0)  # paid
        torch.testing.assert_close(batch["values"], single["a"][1]["values"], atol=1e-6, rtol=0)


def test_missing_eos_penalty_reaches_the_returns(chain, ppo_prompts):
    """RLHF_DETAILS #16 through train_ppo.rollout. With β = 0 the only reward is the score at the last real token,
    so the return there is the score itself (R = r + γ·0 for any λ): a response cut at --response_length without
    EOS must get exactly --missing_eos_penalty, one that ended the reward model's (r − μ)/σ. Two penalties on the
    same samples: only the rows without EOS change, at token t by ΔP·(γλ)^(n−1−t), as GAE carries it back."""
    out = {}
    for penalty in (-1.0, -2.5):
        args = ppo_args(chain, "--response_length=5", "--kl_coef=0", "--batch_size=16",
                        f"--missing_eos_penalty={penalty}")
        m = ppo_setup(args)
        out[penalty] = (do_rollout(m, ppo_prompts[:16], args, seed=0), m)
    (a, m), (b, _) = out[-1.0], out[-2.5]
    assert torch.equal(a["tokens"], b["tokens"]), "the same seed sampled different responses"
    mask = a["response_mask"]
    eos = has_eos(a, m["tok"].eos_id)
    assert eos.any() and (~eos).any(), f"want responses with and without EOS, got eos = {eos.tolist()}"
    for batch, penalty in ((a, -1.0), (b, -2.5)):
        last = last_real(batch["returns"], mask)                                              # (B,)
        torch.testing.assert_close(last[~eos], torch.full_like(last[~eos], penalty), atol=1e-6, rtol=0)
        torch.testing.assert_close(last[eos], rm_scores(m, batch)[eos], atol=1e-5, rtol=0)
    # the difference between the two rollouts: 0 on rows with EOS, ΔP·λ^(n−1−t) on the others (γ = 1, λ = 0.95)
    n = mask.long().sum(1)                                                                    # (B,)
    t = torch.arange(mask.size(1))                                                            # (Tn,)
    decay = 0.95 ** (n[:, None] - 1 - t[None, :]).clamp(min=0).double()                      # (B, Tn)
    expected = torch.where(~eos[:, None] & mask, -1.5 * decay, torch.zeros_like(decay))
    torch.testing.assert_close((b["returns"] - a["returns"]).double(), expected, atol=1e-5, rtol=0)
    share = (~eos).float().mean().item()
    assert b["stats"]["objective/scores"].item() - a["stats"]["objective/scores"].item() == \
        pytest.approx(-1.5 * share, abs=1e-5)


def test_first_minibatch_check_fires_on_a_mismatch_and_ignores_padding(chain, ppo_prompts):
    """RLHF_DETAILS #27 in train_ppo.update: old log-probs 0.01 off at one real token of every row (a temperature or
    position-id mismatch in miniature) must stop the update with its message; huge garbage at the padded positions
    must change nothing at all: the same updated weights and the same statistics as the clean batch."""
    args = ppo_args(chain)
    m = ppo_setup(args)
    batch = do_rollout(m, ppo_prompts[:8], args, seed=1)
    mask = batch["response_mask"]
    assert (~mask).any(), "no padded position in the batch: the padding half would check nothing"

    off = dict(batch, logprobs=batch["logprobs"].clone())
    off["logprobs"][:, 0] -= 0.01  # token 0 is real in every row, so whichever rows the first minibatch draws
    with pytest.raises(AssertionError, match="first minibatch"):
        do_update(ppo_setup(args), off, args, seed=5)

    garbage = dict(batch)
    for k, big in (("logprobs", -50.0), ("values", 1e4), ("advantages", 1e4), ("returns", -1e4)):
        garbage[k] = batch[k].masked_fill(~mask, big)
    clean_m, garbage_m = ppo_setup(args), ppo_setup(args)
    clean = do_update(clean_m, batch, args, seed=5)
    dirty = do_update(garbage_m, garbage, args, seed=5)
    assert clean == dirty, f"padding changed the update's statistics:\n{clean}\n{dirty}"
    for net in ("policy", "critic"):
        a, b = clean_m[net].state_dict(), garbage_m[net].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"padding changed the updated {net}"


# ----------------------------------------------------------------------------------------------------------------
# the loop: learning rate and the adaptive KL controller


def test_learning_rates_anneal_linearly_to_zero(tiny_run):
    """RLHF_DETAILS #30: at iteration it of --iters = 3 every parameter group runs at lr·(1 − it/3): policy 1e-4,
    6.666667e-5, 3.333333e-5 and critic 5e-4, 3.333333e-4, 1.666667e-4 (the defaults), as update sees them."""
    r = tiny_run("plain")
    for seen, lrs in ((r["lr_policy"], [1e-4, 6.666667e-5, 3.333333e-5]),
                      (r["lr_critic"], [5e-4, 3.333333e-4, 1.666667e-4])):
        assert len(seen) == 3, f"update called {len(seen)} times in 3 iterations"
        for it, (groups, lr) in enumerate(zip(seen, lrs)):
            assert len(groups) == 2 and all(g == pytest.approx(lr, rel=1e-6) for g in groups), \
                f"iteration {it}: learning rates {groups}, expected {lr}"


def test_adaptive_kl_controller_moves_beta_in_the_loop(tiny_run):
    """RLHF_DETAILS #28 in the loop: β ← β(1 + clip(KL/KL_target − 1, ±0.2)·n/horizon) once per batch, with KL the
    logged objective/kl (k1) of that batch and n = --batch_size = 8, horizon 40. The first rollout's KL is 0 (the
    policy is the reference), so β first falls by 0.96 whatever the target. Then, with a target far above the KL,
    it falls again (0.05 -> 0.048 -> 0.04608); far below, it rises (0.05 -> 0.048 -> 0.04992); and with the target
    at 1.1 × the second batch's KL the error −1/11 is inside the clip: 0.048·(1 − 0.2/11) = 0.04712727. The second
    batch is the same in all three runs (its β is 0.048 in each), so that target is known from the plain run."""
    plain = tiny_run("plain")["rows"]
    kl1 = plain[1]["objective/kl"]
    assert kl1 > 1e-3, f"the second batch's KL {kl1} is too small to aim a target at"
    for name, target, expected in (("plain", 4.0, [0.05, 0.048, 0.04608]),
                                   ("low_target", 1e-3, [0.05, 0.048, 0.04992]),
                                   ("near_target", 1.1 * kl1, [0.05, 0.048, 0.04712727])):
        rows = plain if name == "plain" else tiny_run(name, f"--target_kl={target!r}")["rows"]
        kl = [r["objective/kl"] for r in rows]
        assert abs(kl[0]) < 1e-4, f"the first rollout's KL is {kl[0]}, expected 0 (π = π_ref)"
        assert kl[1] == kl1, f"{name}: the second batch differs from the plain run's, KL {kl[1]} vs {kl1}"
        if name == "plain":
            assert max(abs(x) for x in kl) < 0.8 * target, f"KL {kl} not far below the target {target}"
        elif name == "low_target":
            assert kl[1] > 1.2 * target, f"KL {kl[1]} after one update is not above the target {target}"
        beta = [r["objective/kl_coef"] for r in rows]
        assert beta == pytest.approx(expected, rel=1e-7, abs=0), f"target {target}: β {beta}, expected {expected}"
        # and the same from the controller's formula on each logged KL, whatever branch of the clip it takes
        for i in range(len(rows) - 1):
            e = min(max(kl[i] / target - 1.0, -0.2), 0.2)
            assert beta[i + 1] == pytest.approx(beta[i] * (1 + e * 8 / 40), rel=1e-12), (name, i, kl, beta)


# ----------------------------------------------------------------------------------------------------------------
# one flag at a time: what it must change, and what of the first rollout it must leave alone


def test_fixed_kl_coef_with_target_kl_zero(tiny_run):
    plain, fixed = tiny_run("plain"), tiny_run("fixed", "--target_kl=0", "--kl_coef=0.05")
    assert len({r["objective/kl_coef"] for r in plain["rows"]}) == 3, "β does not move in the plain run either"
    assert [r["objective/kl_coef"] for r in fixed["rows"]] == [0.05, 0.05, 0.05]
    assert fixed["summary"]["kl_coef_final"] == 0.05 and fixed["summary"]["target_kl"] is None
    # iteration 0 ran with the same β: the whole row, update included, is the plain run's
    assert fixed["rows"][0] == plain["rows"][0]


def test_penalty_policy_loss_run(tiny_run):
    """--policy_loss=penalty: the KL(π_old‖π_θ) term and its β are logged, nothing is clipped, β only ever halves or
    doubles from --penalty_beta (whichever KL its rule reads); the clip run logs neither. The first rollout is
    the clip run's; its update is not."""
    plain, pen = tiny_run("plain"), tiny_run("penalty", "--policy_loss=penalty", "--penalty_beta=0.3")
    for r in plain["rows"]:
        assert "ppo/policy/kl_old_new" not in r and "ppo/policy/penalty_beta" not in r, r
    for r in pen["rows"]:
        assert r["ppo/policy/clipfrac"] == 0.0, r
        assert math.isfinite(r["ppo/policy/kl_old_new"]) and r["ppo/policy/kl_old_new"] >= 0, r  # k3 ≥ 0
        k = math.log2(r["ppo/policy/penalty_beta"] / 0.3)
        assert abs(k - round(k)) < 1e-9, f"penalty β {r['ppo/policy/penalty_beta']} is not 0.3·2^k"
    for k in ROLLOUT_KEYS + ["objective/scores", "ppo/returns/mean"]:
        assert pen["rows"][0][k] == plain["rows"][0][k], k
    assert pen["rows"][0]["ppo/loss/policy"] != plain["rows"][0]["ppo/loss/policy"]


def test_whiten_rewards_run(tiny_run):
    """--whiten_rewards=1 rescales the rewards before GAE: the first rollout's samples and scores are the plain
    run's, its returns are not. In the first batch (the rewards are recovered from the returns, R_t − R_{t+1},
    with λ = 1, where the values cancel) the whitened rewards keep the plain run's mean over real tokens, have
    population variance 1 and are a positive multiple of its rewards minus that mean."""
    plain, wh = tiny_run("plain"), tiny_run("whiten", "--whiten_rewards=1")
    for k in ROLLOUT_KEYS + ["objective/scores"]:
        assert wh["rows"][0][k] == plain["rows"][0][k], k
    assert abs(wh["rows"][0]["ppo/returns/mean"] - plain["rows"][0]["ppo/returns/mean"]) > 1e-3

    plain1, wh1 = tiny_run("plain_lam1", "--lam=1"), tiny_run("whiten_lam1", "--lam=1", "--whiten_rewards=1")
    a, b = plain1["batches"][0], wh1["batches"][0]
    assert torch.equal(a["tokens"], b["tokens"])
    mask = a["response_mask"]

    def rewards_from_returns(returns):
        nxt = torch.cat([returns[:, 1:], torch.zeros_like(returns[:, :1])], 1)               # (B, Tn) R_{t+1}
        return ((returns - nxt) * mask).double()[mask]                                      # (N,) real tokens
    r, w = rewards_from_returns(a["returns"]), rewards_from_returns(b["returns"])
    assert abs(r.var(unbiased=False).item() - 1) > 0.1, "the plain rewards already have variance 1"
    assert w.mean().item() == pytest.approx(r.mean().item(), abs=1e-5)
    assert w.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)  # unbiased would be off by 1/N here
    slope = (w - w.mean()) / (r - r.mean())
    big = (r - r.mean()).abs() > 0.1
    assert big.sum() > 2 and (slope[big] > 0).all()
    assert slope[big].max().item() == pytest.approx(slope[big].min().item(), rel=1e-3), "not one affine map"


def test_oracle_scores_are_the_normalised_gold(chain, tiny_run):
    """--oracle=1 pays each response its gold score (the built-in task's hidden labeler), normalised with the SFT
    policy's gold mean and std on the held-out prompts (evals.json iteration 0), instead of the reward model's;
    a response without EOS still gets --missing_eos_penalty. Checked per response at the first rollout through
    the return at its last token (β·KL is 0 there, π = π_ref), and the logged mean; the reward model's own scores
    of the same batch are different. Samples and everything else the first rollout logs are the plain run's."""
    from data import minichat
    from data.formats import load_prompts
    from tokenizer import render_prompt
    plain, orc = tiny_run("plain"), tiny_run("oracle", "--oracle=1")
    before = orc["evals"][0]
    assert before["gold_std"] > 0.1, f"SFT gold std {before['gold_std']}: too flat to normalise with"
    for k in ROLLOUT_KEYS:
        assert orc["rows"][0][k] == plain["rows"][0][k], k

    args = ppo_args(chain)
    m = ppo_setup(args)
    tok = m["tok"]
    # which request each rollout prompt was: the train prompts rendered as main renders them
    request_of = {tuple(render_prompt(tok, p, max_tokens=256 - 16)): p[-1]["content"]
                  for p in load_prompts(C.prepare_builtin(quiet=True)["prompts_train"])}
    batch, prompts = orc["batches"][0], orc["prompts"][0]
    eos = has_eos(batch, tok.eos_id)
    assert eos.any(), "no response ended: every score would be the penalty"
    expected = []
    for p, r, mk, e in zip(prompts, batch["responses"], batch["response_mask"], eos.tolist()):
        text, ended = C.decode_response(tok, r, mk)
        assert ended == e
        g = minichat.gold(request_of[tuple(p)], text, ended)
        expected.append((g - before["gold"]) / before["gold_std"] if e else args.missing_eos_penalty)
    expected = torch.tensor(expected)
    paid = last_real(batch["returns"], batch["response_mask"])                               # (B,)
    torch.testing.assert_close(paid, expected, atol=1e-4, rtol=0)
    assert orc["rows"][0]["objective/scores"] == pytest.approx(expected.mean().item(), abs=1e-5)
    by_rm = torch.where(eos, rm_scores(m, batch), torch.full_like(paid, args.missing_eos_penalty))
    assert (by_rm - expected).abs().max() > 0.1, "the reward model's scores equal the gold ones: nothing is shown"
    # every iteration: objective/scores (scores only, no KL) is the mean normalised gold, the penalty included
    n_cut = 0
    for it, (batch, prompts) in enumerate(zip(orc["batches"], orc["prompts"])):
        golds = []
        for p, r, mk in zip(prompts, batch["responses"], batch["response_mask"]):
            text, ended = C.decode_response(tok, r, mk)
            n_cut += not ended
            golds.append((minichat.gold(request_of[tuple(p)], text, ended) - before["gold"]) / before["gold_std"]
                         if ended else args.missing_eos_penalty)
        assert orc["rows"][it]["objective/scores"] == pytest.approx(sum(golds) / len(golds), abs=1e-5), it
    assert n_cut > 0, "no response without EOS in the oracle run: its penalty is untested"
