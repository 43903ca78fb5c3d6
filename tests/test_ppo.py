"""Tests for ppo.py: every RL equation against the hand-computed vectors of RLHF_DETAILS.md, gradients where a
clip must stop them, Monte-Carlo checks of the KL estimators, and "nothing after EOS reaches a loss": garbage at
masked positions never changes an output at a real position or a scalar loss. CPU, fp64 where it helps, < 1 s.

    python -m pytest -q tests/test_ppo.py
"""
import math

import pytest
import torch

from ppo import (AdaptiveKLController, FixedKLController, apply_missing_eos_penalty, best_of_n_kl,
                 entropy_from_logits, explained_variance, gae, kl_k1, kl_k2, kl_k3, kl_shaped_rewards,
                 masked_mean, masked_var, masked_whiten, policy_loss_clipped, policy_loss_penalty,
                 truncate_at_eos, update_penalty_beta, value_loss_clipped)

EOS = 1


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def close(a, b, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=atol, rtol=0)


def garbage_like(x, mask, seed, scale=1e3):
    """x with its masked-out positions replaced by large random numbers (finite, so 0·garbage stays 0)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype) * scale
    return torch.where(mask.bool(), x, noise)


# ----------------------------------------------------------------------------------------------------------------
# masked statistics


def test_masked_mean_and_var_ignore_masked_garbage():
    x = t([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    real = t([1.0, 2.0, 3.0, 4.0, 5.0])
    for seed in range(3):
        xg = garbage_like(x, mask, seed)
        close(masked_mean(xg, mask), real.mean())
        close(masked_var(xg, mask), real.var(unbiased=False))  # population variance (#21)
        close(masked_mean(xg, mask, dim=1), t([2.0, 4.5]))
    # bool masks work the same as float ones
    close(masked_mean(x, mask.bool()), 3.0)


def test_masked_var_is_population_variance():
    x = t([[1.0, 2.0, 3.0, 4.0]])
    close(masked_var(x, torch.ones_like(x)), 1.25)  # not 5/3 (unbiased)


def test_whiten_advantages_vector():
    # RLHF_DETAILS #21: [1, 2, 3, 4] -> [−1.342, −0.447, 0.447, 1.342]
    x = t([[1.0, 2.0, 3.0, 4.0]])
    out = masked_whiten(x, torch.ones_like(x))
    close(out, t([[-1.3416408, -0.4472136, 0.4472136, 1.3416408]]), atol=1e-5)


def test_whiten_rewards_keeps_mean_vector():
    # RLHF_DETAILS #21 with shift_mean=False (0.1394 first would mean unbiased variance)
    x = t([[1.2, 1.3, 1.4], [1.5, 1.6, 1.7], [1.8, 1.9, 2.0]])
    out = masked_whiten(x, torch.ones_like(x), shift_mean=False)
    expected = t([[0.0508, 0.4381, 0.8254], [1.2127, 1.6000, 1.9873], [2.3746, 2.7619, 3.1492]])
    close(out, expected, atol=1e-4)
    close(out.mean(), x.mean())


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_ignores_masked_garbage(shift_mean):
    x = t([[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 5.0, 0.0]])
    mask = t([[1, 1, 0, 0], [1, 1, 1, 0]])
    real = t([1.0, 2.0, 3.0, 4.0, 5.0])
    ref = (real - real.mean()) / torch.sqrt(real.var(unbiased=False) + 1e-8) + (0 if shift_mean else real.mean())
    outs = [masked_whiten(garbage_like(x, mask, seed), mask, shift_mean=shift_mean) for seed in range(3)]
    for out in outs:
        close(out[mask.bool()], ref)
        close(out[~mask.bool()], torch.zeros(3, dtype=torch.float64))  # padding comes out as 0 (docstring)
        close(out, outs[0])


# ----------------------------------------------------------------------------------------------------------------
# where responses end


def test_truncate_at_eos():
    r = torch.tensor([[5, EOS, 7, EOS],    # EOS at 1, garbage and a 2nd EOS after it
                      [EOS, 3, 4, 5],      # EOS first
                      [3, 4, 5, 6],        # no EOS: kept whole
                      [3, 4, 5, EOS]])     # EOS at the very end
    out, mask, has_eos = truncate_at_eos(r, EOS, 99)
    assert torch.equal(mask.bool(), torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]).bool())
    assert torch.equal(out, torch.tensor([[5, EOS, 99, 99], [EOS, 99, 99, 99], [3, 4, 5, 6], [3, 4, 5, EOS]]))
    assert has_eos.tolist() == [True, True, False, True]


def test_apply_missing_eos_penalty():
    scores = t([1.5, 2.0, -0.3])
    out = apply_missing_eos_penalty(scores, torch.tensor([True, False, True]), -1.0)
    close(out, t([1.5, -1.0, -0.3]))


# ----------------------------------------------------------------------------------------------------------------
# KL estimators (#19) and KL-shaped rewards (#15)


def test_kl_estimators_vectors():
    # r = π_ref/π, log r = log π_ref − log π. By hand for log π = [−1, −2, −0.5, −3] and
    # log π_ref = [−1.5, −1, −0.5, −0.2]:
    #   log r = [−0.5, 1, 0, 2.8]
    #   k1 = −log r        = [0.5, −1, 0, −2.8]
    #   k2 = ½ (log r)²     = [0.125, 0.5, 0, 3.92]
    #   k3 = (r − 1) − log r = [e^−0.5 − 0.5, e − 2, 0, e^2.8 − 3.8] = [0.106531, 0.718282, 0, 12.644647]
    # (the first two k3 are RLHF_DETAILS #33's [0.1065, 0.7183]). k3 with π and π_ref swapped would give
    # e^0.5 − 1.5 = 0.148721 first, and k2 without the ½ gives 0.25: the vector tells them apart.
    lp, ref = t([-1.0, -2.0, -0.5, -3.0]), t([-1.5, -1.0, -0.5, -0.2])
    close(kl_k1(lp, ref), t([0.5, -1.0, 0.0, -2.8]), atol=1e-6)
    close(kl_k2(lp, ref), t([0.125, 0.5, 0.0, 3.92]), atol=1e-6)
    close(kl_k3(lp, ref), t([0.106531, 0.718282, 0.0, 12.644647]), atol=1e-6)


def test_kl_estimators_signs():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(64, generator=g, dtype=torch.float64) * 5      # log π
    ref = -torch.rand(64, generator=g, dtype=torch.float64) * 5     # log π_ref
    assert (kl_k1(lp, ref) < 0).any()  # k1 can be negative token by token ...
    assert (kl_k2(lp, ref) >= 0).all() and (kl_k3(lp, ref) >= 0).all()  # ... k2 and k3 never
    for k in (kl_k1, kl_k2, kl_k3):
        close(k(lp, lp), torch.zeros(64, dtype=torch.float64))


def test_kl_k1_k3_unbiased_monte_carlo():
    # x ~ q over a small categorical: E[k1] = E[k3] = KL(q‖p); k2 is biased
    q = t([0.5, 0.2, 0.15, 0.1, 0.05])
    p = t([0.1, 0.3, 0.2, 0.2, 0.2])
    kl_exact = (q * (q / p).log()).sum()
    g = torch.Generator().manual_seed(0)
    N = 200_000
    x = torch.multinomial(q, N, replacement=True, generator=g)
    lp, ref = q.log()[x], p.log()[x]
    for k in (kl_k1, kl_k3):
        est = k(lp, ref)
        se = est.std() / math.sqrt(N)
        assert abs(est.mean() - kl_exact) < 5 * se, (k.__name__, est.mean().item(), kl_exact.item(), se.item())
    est2 = kl_k2(lp, ref)
    assert abs(est2.mean() - kl_exact) > 10 * est2.std() / math.sqrt(N), "k2 should be visibly biased here"


def test_kl_shaped_rewards_vector():
    # RLHF_DETAILS #15: logπ = [−1, −2, −3], logπ_ref = [−1.5, −2, −2], β = 0.1, score 2 -> [−0.05, 0, 2.1]
    r = kl_shaped_rewards(t([2.0]), t([[-1.0, -2.0, -3.0]]), t([[-1.5, -2.0, -2.0]]), t([[1, 1, 1]]), 0.1)
    close(r, t([[-0.05, 0.0, 2.1]]))
    # summed: R = score − β Σ (logπ − logπ_ref)  (InstructGPT eq. 2)
    close(r.sum(), 2.0 - 0.1 * (0.5 + 0.0 - 1.0))


def test_kl_shaped_rewards_pi_equals_ref():
    lp = t([[-0.3, -1.2, -2.0, -0.7], [-1.0, -0.1, -0.4, -3.0]])
    r = kl_shaped_rewards(t([1.5, -0.7]), lp, lp.clone(), torch.ones_like(lp), 0.2)
    close(r, t([[0.0, 0.0, 0.0, 1.5], [0.0, 0.0, 0.0, -0.7]]))


def test_kl_shaped_rewards_right_padding():
    # the score lands on the last real token; nothing after it, whatever the log-probs say there
    lp = t([[-1.0, -2.0, -3.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0, 0.0]])
    ref = t([[-1.5, -2.0, -2.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    scores = t([2.0, 0.5])
    expected = t([[-0.05, 0.0, 2.1, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0, 0.0]])
    for seed in range(3):
        r = kl_shaped_rewards(scores, garbage_like(lp, mask, seed), garbage_like(ref, mask, seed + 10), mask, 0.1)
        close(r, expected)
    # bool mask too
    close(kl_shaped_rewards(scores, lp, ref, mask.bool(), 0.1), expected)


# ----------------------------------------------------------------------------------------------------------------
# GAE (#20)


@pytest.mark.parametrize("lam, adv", [(0.95, [0.46575, 0.385, 0.3]), (1.0, [0.5, 0.4, 0.3]), (0.0, [0.1, 0.1, 0.3])])
def test_gae_vectors(lam, adv):
    r, v = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]])
    a, ret = gae(r, v, torch.ones_like(r), gamma=1.0, lam=lam)
    close(a, t([adv]))
    close(ret, t([adv]) + v)  # returns before whitening: R = Â + V
    if lam == 0.95:
        close(ret, t([[0.96575, 0.985, 1.0]]))


def test_gae_gamma():
    # γ = 0.5, λ = 1: Â_t = Σ γ^k r_{t+k} − V_t (a Monte-Carlo return minus the baseline)
    r, v = t([[1.0, 2.0, 4.0]]), t([[0.1, 0.2, 0.3]])
    a, ret = gae(r, v, torch.ones_like(r), gamma=0.5, lam=1.0)
    close(ret, t([[1 + 1 + 1.0, 2 + 2.0, 4.0]]))
    close(a, ret - v)


def test_gae_padded_batch_ignores_garbage():
    rows = [([0.0, 0.0, 1.0], [0.5, 0.6, 0.7]), ([0.3, -2.0], [1.0, -0.5]), ([0.7, 0.1, -0.2, 0.4, 1.1], [0.2] * 5)]
    T = 5
    rewards = torch.zeros(3, T, dtype=torch.float64)
    values = torch.zeros(3, T, dtype=torch.float64)
    mask = torch.zeros(3, T, dtype=torch.float64)
    for b, (r, v) in enumerate(rows):
        rewards[b, :len(r)], values[b, :len(v)], mask[b, :len(r)] = t(r), t(v), 1.0
    outs = []
    for seed in range(3):
        a, ret = gae(garbage_like(rewards, mask, seed), garbage_like(values, mask, seed + 10), mask, 1.0, 0.95)
        for b, (r, v) in enumerate(rows):  # each row alone, unpadded
            a1, ret1 = gae(t([r]), t([v]), torch.ones(1, len(r), dtype=torch.float64), 1.0, 0.95)
            close(a[b, :len(r)], a1[0])
            close(ret[b, :len(r)], ret1[0])
        outs.append((a, ret))
    for a, ret in outs:
        close(a, outs[0][0])
        close(ret, outs[0][1])
    close(outs[0][0][~mask.bool()], torch.zeros(int((1 - mask).sum()), dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------------
# the PPO losses


@pytest.mark.parametrize("adv, rho, loss, clipped", [(1.0, 1.5, -1.2, True), (1.0, 0.5, -0.5, False),
                                                     (-1.0, 1.5, 1.5, False), (-1.0, 0.5, 0.8, True)])
def test_policy_loss_clipped_per_token(adv, rho, loss, clipped):
    # RLHF_DETAILS #24; gradient w.r.t. log π_θ is −Âρ when unclipped, 0 when clipped
    old = t([[-1.0]])
    lp = (old + math.log(rho)).clone().requires_grad_(True)
    out, stats = policy_loss_clipped(lp, old, t([[adv]]), t([[1]]), cliprange=0.2)
    close(out.detach(), loss)
    close(stats["clipfrac"], 1.0 if clipped else 0.0)
    out.backward()
    close(lp.grad, t([[0.0 if clipped else -adv * rho]]))


def test_policy_loss_clipped_batch_mean_and_stats():
    # the four per-token cases in one batch: the loss is their mean, clipfrac is 2/4
    old = t([[-1.0, -1.0, -1.0, -1.0]])
    lp = old + t([[math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)]])
    loss, stats = policy_loss_clipped(lp, old, t([[1.0, 1.0, -1.0, -1.0]]), torch.ones_like(old))
    close(loss, (-1.2 - 0.5 + 1.5 + 0.8) / 4)
    close(stats["clipfrac"], 0.5)
    close(stats["approxkl"], 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)


def test_first_minibatch_detector_stats():
    """RLHF_DETAILS #27: in the first minibatch ρ ≡ 1, and train_ppo.update asserts it through ratio_max_dev,
    approxkl and clipfrac. Here ρ ≠ 1 on purpose, with known log-ratios, so each statistic must come out at its
    hand-computed value: a detector that is a mean instead of a max, that ignores the sign of Â, or that reads
    masked positions would read wrong here (and would hide a temperature or position-id bug in the real loop)."""
    # 7 real tokens (row 0: 4, row 1: 3) and one masked position holding a huge log-ratio and advantage
    log_ratio = t([[0.3, -0.3, 0.1, -0.1], [0.25, -0.25, 0.0, 20.0]])
    adv = t([[1.0, 1.0, -1.0, 1.0], [-1.0, -1.0, 2.0, 1e3]])
    mask = t([[1, 1, 1, 1], [1, 1, 1, 0]])
    old = t([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.1, -2.2, -0.4]])
    loss, stats = policy_loss_clipped(old + log_ratio, old, adv, mask, cliprange=0.2)
    # max|ρ − 1| over real tokens = e^0.3 − 1 = 0.349859 (the masked e^20 − 1 must not count)
    close(stats["ratio_max_dev"], 0.349859, atol=1e-6)
    # the clip is active only where it lowers the objective: ρ = e^0.3 = 1.3499 > 1.2 with Â > 0, and
    # ρ = e^−0.25 = 0.7788 < 0.8 with Â < 0. ρ = e^−0.3 with Â > 0 and e^0.25 with Â < 0 lie outside [0.8, 1.2]
    # but are not clipped (min picks the unclipped term). 2 of 7 real tokens = 0.285714 (|ρ−1| > ε would say 4/7)
    close(stats["clipfrac"], 0.285714, atol=1e-6)
    # approxkl = ½ mean (log ρ)² = ½ (0.09 + 0.09 + 0.01 + 0.01 + 0.0625 + 0.0625 + 0) / 7 = 0.023214
    close(stats["approxkl"], 0.023214, atol=1e-6)
    # per-token max(−Âρ, −Â clip(ρ)) = [−1.2, −0.740818, 1.105171, −0.904837, 1.284025, 0.8, −2] -> mean −0.236637
    close(loss, -0.236637, atol=1e-6)

    # one token of 24 off by 1e-3 in log-ratio (a small temperature or padding mismatch): the max sees it in full,
    # e^0.001 − 1 = 0.0010005, ten times the update's 1e-4 tolerance; nothing is clipped
    lp = -torch.rand(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    shifted = lp.clone()
    shifted[2, 3] += 1e-3
    _, stats = policy_loss_clipped(shifted, lp, torch.ones_like(lp), torch.ones_like(lp))
    close(stats["ratio_max_dev"], 0.0010005, atol=1e-9)
    close(stats["approxkl"], 0.5e-6 / 24, atol=1e-12)
    close(stats["clipfrac"], 0.0)


def test_policy_loss_penalty_vector():
    """J = E[ρÂ] − β KL(π_old‖π_θ), KL per token by k3 on tokens sampled from π_old: (ρ − 1) − log ρ, ρ = π_θ/π_old.
    By hand, β = 0.3, three real tokens and one masked one full of garbage:
        log ρ  = [0.2, −0.5, 0]            ρ = [1.221403, 0.606531, 1]
        k3     = [0.021403, 0.106531, 0]    mean 0.042644
        −Âρ + β k3 = [−1.214982, 0.335225, −2]   mean −0.959919
        d loss / d log π_θ = (−Âρ + β(ρ − 1)) / 3 = [−0.384994, 0.061742, −0.666667], 0 at the masked token
    KL in the other direction (1/ρ − 1 + log ρ) would give −0.955967, and dividing by 4 tokens −0.719939."""
    old = t([[-1.2, -1.5, -0.7, -0.1]])
    lp = t([[-1.0, -2.0, -0.7, -9.0]]).requires_grad_(True)
    adv = t([[1.0, -0.5, 2.0, 50.0]])
    mask = t([[1, 1, 1, 0]])
    loss, stats = policy_loss_penalty(lp, old, adv, mask, 0.3)
    close(loss.detach(), -0.959919, atol=1e-6)
    close(stats["kl_old_new"], 0.042644, atol=1e-6)
    close(stats["approxkl"], 0.5 * (0.04 + 0.25) / 3, atol=1e-9)
    close(stats["clipfrac"], 0.0)  # nothing is clipped in the penalty variant
    loss.backward()
    close(lp.grad, t([[-0.384994, 0.061742, -0.666667, 0.0]]), atol=1e-6)


def test_policy_loss_penalty_gradient_of_kl_term():
    # d/dlogπ_θ of β[(ρ − 1) − log ρ] = β(ρ − 1): zero at ρ = 1, pushes back toward π_old otherwise
    old = t([[-1.0, -1.0]])
    lp = t([[-1.0, -0.5]]).requires_grad_(True)
    loss, _ = policy_loss_penalty(lp, old, torch.zeros_like(old), torch.ones_like(old), 0.4)
    loss.backward()
    close(lp.grad, t([[0.0, 0.4 * (math.exp(0.5) - 1) / 2]]))


@pytest.mark.parametrize("beta_in, kl, beta_out", [(0.1, 0.005, 0.05), (0.1, 0.02, 0.2), (0.1, 0.01, 0.1),
                                                   (0.1, 0.007, 0.1), (0.1, 0.0149, 0.1)])
def test_update_penalty_beta(beta_in, kl, beta_out):
    # RLHF_DETAILS #25, d_targ = 0.01: below 0.00667 halve, above 0.015 double, in between unchanged
    close(update_penalty_beta(beta_in, kl, 0.01), beta_out, atol=1e-12)


@pytest.mark.parametrize("v, r, loss, clipped", [(0.5, 1.0, 0.32, True), (0.5, 0.3, 0.02, False)])
def test_value_loss_clipped_vectors(v, r, loss, clipped):
    # RLHF_DETAILS #23 with V_old = 0, ε_v = 0.2; zero gradient on the clipped branch
    values = t([[v]]).requires_grad_(True)
    out, stats = value_loss_clipped(values, t([[0.0]]), t([[r]]), t([[1]]), cliprange_value=0.2)
    close(out.detach(), loss)
    close(stats["clipfrac"], 1.0 if clipped else 0.0)
    out.backward()
    close(values.grad, t([[0.0 if clipped else (v - r)]]))


# ----------------------------------------------------------------------------------------------------------------
# nothing after EOS reaches a loss


def _padded_batch(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 6
    mask = t([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    old_values = values + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    return mask, lp, old, adv, values, old_values, returns


def test_policy_losses_ignore_masked_garbage():
    mask, lp, old, adv, *_ = _padded_batch(0)
    ref = policy_loss_clipped(lp, old, adv, mask)
    refp = policy_loss_penalty(lp, old, adv, mask, 0.2)
    for seed in range(3):
        # log-probs stay log-probs (≤ 0, moderate) so exp(log ρ) stays finite; advantages can be anything
        lpg = torch.where(mask.bool(), lp, -torch.rand(lp.shape, generator=torch.Generator().manual_seed(seed)) * 30)
        oldg = torch.where(mask.bool(), old, -torch.rand(lp.shape, generator=torch.Generator().manual_seed(seed + 9)) * 30)
        advg = garbage_like(adv, mask, seed)
        lpg = lpg.double().requires_grad_(True)
        loss, stats = policy_loss_clipped(lpg, oldg.double(), advg, mask)
        close(loss.detach(), ref[0])
        for key in ("clipfrac", "approxkl", "ratio_max_dev"):
            close(stats[key], ref[1][key])
        loss.backward()
        close(lpg.grad[~mask.bool()], torch.zeros(int((1 - mask).sum()), dtype=torch.float64))
        lossp, statsp = policy_loss_penalty(lpg.detach(), oldg.double(), advg, mask, 0.2)
        close(lossp, refp[0])
        close(statsp["kl_old_new"], refp[1]["kl_old_new"])


def test_value_loss_ignores_masked_garbage():
    mask, _, _, _, values, old_values, returns = _padded_batch(1)
    ref, ref_stats = value_loss_clipped(values, old_values, returns, mask)
    for seed in range(3):
        vg = garbage_like(values, mask, seed).requires_grad_(True)
        loss, stats = value_loss_clipped(vg, garbage_like(old_values, mask, seed + 1),
                                         garbage_like(returns, mask, seed + 2), mask)
        close(loss.detach(), ref)
        close(stats["clipfrac"], ref_stats["clipfrac"])
        loss.backward()
        close(vg.grad[~mask.bool()], torch.zeros(int((1 - mask).sum()), dtype=torch.float64))


def test_explained_variance_ignores_masked_garbage():
    mask, _, _, _, values, _, returns = _padded_batch(2)
    ref = explained_variance(values, returns, mask)
    for seed in range(3):
        close(explained_variance(garbage_like(values, mask, seed), garbage_like(returns, mask, seed + 1), mask), ref)


# ----------------------------------------------------------------------------------------------------------------
# statistics: entropy, explained variance


def test_entropy_uniform_and_onehot():
    V = 37
    close(entropy_from_logits(torch.zeros(2, 3, V)), torch.full((2, 3), math.log(V)))
    close(entropy_from_logits(torch.full((2, 3, V), 4.2)), torch.full((2, 3), math.log(V)))  # shift-invariant
    onehot = torch.zeros(1, 1, V)
    onehot[..., 5] = 100.0
    assert entropy_from_logits(onehot).abs().item() < 1e-4


def test_entropy_matches_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=g) * 3
    p = torch.softmax(logits, -1)
    close(entropy_from_logits(logits), -(p * p.log()).sum(-1), atol=1e-5)


def test_explained_variance():
    g = torch.Generator().manual_seed(0)
    returns = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.ones_like(returns)
    close(explained_variance(returns.clone(), returns, mask), 1.0)
    close(explained_variance(torch.full_like(returns, 0.37), returns, mask), 0.0)
    # half the error of a constant predictor at the mean -> 1 − 1/4 = 0.75
    mean = returns.mean()
    close(explained_variance(mean + 0.5 * (returns - mean), returns, mask), 0.75)


# ----------------------------------------------------------------------------------------------------------------
# KL coefficient β (#28) and best-of-n KL


@pytest.mark.parametrize("kl, beta", [(12.0, 0.151536), (3.0, 0.148464), (6.6, 0.150768), (6.0, 0.15),
                                      (100.0, 0.151536), (0.0, 0.148464)])
def test_adaptive_kl_controller(kl, beta):
    ctl = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    ctl.update(kl, 512)
    close(ctl.value, beta, atol=1e-9)


def test_adaptive_kl_controller_state_dict():
    ctl = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    ctl.update(12.0, 512)
    ctl2 = AdaptiveKLController(1.0, target=1.0, horizon=1)
    ctl2.load_state_dict(ctl.state_dict())
    ctl.update(3.0, 256)
    ctl2.update(3.0, 256)
    assert ctl2.value == ctl.value


def test_fixed_kl_controller_unchanged():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 3.0, 100.0):
        ctl.update(kl, 512)
    assert ctl.value == 0.05


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    close(best_of_n_kl(4), math.log(4) - 0.75, atol=1e-12)
    close(best_of_n_kl(4), 0.636294, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# critic-free estimators (RLHF_DETAILS #32, #33)


def test_rloo_baseline_is_leave_one_out():
    from ppo import rloo_advantages
    close(rloo_advantages(t([1.0, 2.0, 3.0, 6.0]), 4), t([-8 / 3, -4 / 3, 0.0, 4.0]))
    # two groups are independent, and a group mean baseline ([−2, −1, 0, 3]) would fail the first group
    out = rloo_advantages(t([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 9.0]), 4)
    close(out, t([-8 / 3, -4 / 3, 0.0, 4.0, -4 / 3, -4 / 3, -4 / 3, 4.0]))
    close(rloo_advantages(t([0.5, -0.5]), 2), t([1.0, -1.0]))  # k = 2: each answer against the other


def test_grpo_advantages_vectors():
    from ppo import grpo_advantages
    close(grpo_advantages(t([1.0, 2.0, 3.0, 6.0]), 4), t([-0.9258, -0.4629, 0.0, 1.3887]), atol=1e-4)  # sample std
    close(grpo_advantages(t([1.0, 2.0, 3.0, 6.0]), 4, scale=False), t([-2.0, -1.0, 0.0, 3.0]))  # Dr. GRPO
    # a group whose answers all scored the same teaches nothing: advantage 0, not a division by zero
    close(grpo_advantages(t([2.0, 2.0, 1.0, 3.0]), 2), t([0.0, 0.0, -0.7071, 0.7071]), atol=1e-4)


def test_policy_loss_grpo_vector():
    """Two answers. Answer 0: 2 tokens, A = +1, π = π_old, log π = [−1, −2], log π_ref = [−1.5, −1]: k3 =
    [0.106531, 0.718282]; with β = 0.1 the per-token loss is −(1 − 0.1·k3) = [−0.989347, −0.928172], its mean over
    the answer's 2 tokens −0.958759. Answer 1: 1 real token (a masked one holds garbage), A = −2, ρ = e^0.5 =
    1.648721 (clipped to 1.2: min(−3.297443, −2.4) = −3.297443, so the unclipped branch counts), π_ref = π: loss
    +3.297443. Mean over answers (length-normalised): 1.169342. Dr. GRPO with L = 4: (−1.917519/4 + 3.297443/4)/2."""
    from ppo import policy_loss_grpo
    lp = t([[-1.0, -2.0], [-0.5, 7.0]])
    old = t([[-1.0, -2.0], [-1.0, -3.0]])
    ref = t([[-1.5, -1.0], [-0.5, 9.0]])
    mask = t([[1, 1], [1, 0]]).bool()
    adv = t([1.0, -2.0])
    loss, stats = policy_loss_grpo(lp, old, ref, adv, mask, cliprange=0.2, kl_coef=0.1)
    close(loss, 1.169342, atol=1e-5)
    close(stats["kl_ref"], (0.106531 + 0.718282 + 0.0) / 3, atol=1e-5)
    close(stats["clipfrac"], 0.0)  # answer 1's ratio is beyond 1 + ε, but with A < 0 the unclipped branch is the min
    loss_dr, _ = policy_loss_grpo(lp, old, ref, adv, mask, cliprange=0.2, kl_coef=0.1, length_norm=4)
    close(loss_dr, (-1.917519 / 4 + 3.297443 / 4) / 2, atol=1e-5)
    # A > 0 with ρ beyond 1 + ε: the clipped branch is the min, its gradient is 0
    lp2 = t([[0.5]]).requires_grad_()
    loss2, stats2 = policy_loss_grpo(lp2, t([[0.0]]), t([[0.5]]), t([1.0]), t([[1]]).bool(), 0.2, 0.0)
    close(loss2, -1.2)
    close(stats2["clipfrac"], 1.0)
    loss2.backward()
    close(lp2.grad, t([[0.0]]))


def test_policy_loss_reinforce_vector():
    # −mean_i A_i Σ_t log π: A = [2, −1], Σ log π over real tokens = [−3, −0.5] -> −(−6 + 0.5)/2 = 2.75
    from ppo import policy_loss_reinforce
    lp = t([[-1.0, -2.0], [-0.5, -99.0]])
    close(policy_loss_reinforce(lp, t([2.0, -1.0]), t([[1, 1], [1, 0]]).bool()), 2.75)
