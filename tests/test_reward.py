"""Tests for reward.py: the pairwise and ranking losses against RLHF_DETAILS #11, per-prompt averaging with ragged
K, pair accuracy, where the score is read (the last real token, with left or right padding, #9) on a real tiny
GPTScalar, and normalisation (#13). CPU, a second or two.

    python -m pytest -q tests/test_reward.py
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_
from model import GPTConfig, GPTScalar
from reward import all_pairs, last_token_index, normalize, pair_accuracy, pairwise_loss, ranking_loss, score

V = 50
EOS = 1
PAD = V  # outside the vocabulary on purpose: a PAD must never be looked up unmasked


def close(a, b, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# losses (#11)


@pytest.mark.parametrize("margin, loss", [(0.0, 0.693147), (1.0, 0.313262), (2.0, 0.126928), (-1.0, 1.313262)])
def test_pairwise_loss_vectors(margin, loss):
    close(pairwise_loss(torch.tensor([0.3 + margin]), torch.tensor([0.3])), loss, atol=1e-6)


def test_pairwise_loss_is_mean_over_pairs():
    rw, rl = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 0.0])
    close(pairwise_loss(rw, rl), (0.313262 + 0.693147 + 0.126928) / 3, atol=1e-6)


def test_ranking_loss_k3_vector():
    close(ranking_loss(torch.tensor([[2.0, 1.0, 0.0]])), 0.251150, atol=1e-5)


def test_ranking_loss_equals_mean_pairwise_loss_k4():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 4, generator=g, dtype=torch.float64) * 2
    pairs = list(itertools.combinations(range(4), 2))
    assert len(pairs) == 6 and pairs == all_pairs(4)
    for row in rewards:  # one prompt at a time
        rw = torch.stack([row[i] for i, _ in pairs])
        rl = torch.stack([row[j] for _, j in pairs])
        close(ranking_loss(row[None]), pairwise_loss(rw, rl))
    # the batch: every row has the same K, so the mean of per-prompt means is the mean over all pairs
    rw = torch.cat([rewards[:, i:i + 1] for i, _ in pairs], 1)
    rl = torch.cat([rewards[:, j:j + 1] for _, j in pairs], 1)
    close(ranking_loss(rewards), pairwise_loss(rw.flatten(), rl.flatten()))


def test_ranking_loss_gradient_is_better_above_worse():
    rewards = torch.zeros(1, 3, requires_grad=True)
    ranking_loss(rewards).backward()
    g = rewards.grad[0]
    assert g[0] < 0 < g[2], f"the best response should be pushed up, the worst down; grad {g.tolist()}"


def test_ranking_loss_ragged_k_per_prompt_mean():
    # row 0: K = 4, six pairs with small losses; row 1: K = 2, one pair with a big loss, then two padding slots
    row0 = torch.tensor([3.0, 2.0, 1.0, 0.0])
    row1 = torch.tensor([0.0, 5.0])
    k = torch.tensor([4, 2])
    pairs0 = [-F.logsigmoid(row0[i] - row0[j]) for i, j in itertools.combinations(range(4), 2)]
    pair1 = -F.logsigmoid(row1[0] - row1[1])
    per_prompt = (torch.stack(pairs0).mean() + pair1) / 2                 # InstructGPT: mean over prompts
    over_pairs = (torch.stack(pairs0).sum() + pair1) / 7                  # the wrong one: pairs as samples
    assert abs(per_prompt - over_pairs) > 0.5  # the example tells them apart
    losses = []
    for fill in (-100.0, 0.0, 37.0, float(torch.randn(1))):
        rewards = torch.stack([row0, torch.cat([row1, torch.full((2,), fill)])])
        losses.append(ranking_loss(rewards, k))
        close(losses[-1], per_prompt)
    # padding slots get no gradient
    rewards = torch.stack([row0, torch.cat([row1, torch.tensor([9.0, -9.0])])]).requires_grad_(True)
    ranking_loss(rewards, k).backward()
    close(rewards.grad[1, 2:], torch.zeros(2))
    assert (rewards.grad[1, :2].abs() > 0).all()


def test_pair_accuracy_counts():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 0.0]])
    # row 0: (0,1) right, (0,2) right, (1,2) wrong; row 1 with k = 2: (0,1) wrong; padding pairs not counted
    for fill in (-50.0, 50.0):
        rewards[1, 2] = fill
        right, total = pair_accuracy(rewards, torch.tensor([3, 2]))
        assert (right, total) == (2, 4)
    right, total = pair_accuracy(torch.tensor([[3.0, 1.0, 2.0], [2.0, 1.0, 0.0]]))
    assert (right, total) == (5, 6)
    assert pair_accuracy(torch.tensor([[1.0, 1.0]])) == (0, 1)  # a tie is not a correct ordering


# ----------------------------------------------------------------------------------------------------------------
# where the score is read (#9)


def test_last_token_index():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 0, 4]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(right.bool()).tolist() == [2, 0, 4]
    # prompt left-padded, response right-padded (what train_ppo scores): last real token in the middle
    both = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    assert last_token_index(both).tolist() == [3, 5]


def make_rm(seed=0):
    """A tiny GPTScalar in eval mode with O(1) weights: GPT-2's std-0.02 init makes every position's output nearly
    independent of the input, so a 1e-5 comparison would pass on a wrong index or a broken mask."""
    rm = GPTScalar(GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.0))
    return randomize_(rm, seed)


SEQ = [7, 12, 3, 44, 9, 21, EOS]   # prompt + response, ending with EOS


def pad(seq, left=0, right=0, pad_id=PAD):
    tokens = torch.tensor([[pad_id] * left + seq + [pad_id] * right])
    mask = torch.tensor([[0] * left + [1] * len(seq) + [0] * right])
    return tokens, mask


@torch.no_grad()
def test_score_reads_last_real_token():
    rm = make_rm()
    tokens, mask = pad(SEQ)
    s = score(rm, tokens, mask)
    assert s.shape == (1,)
    close(s, rm(tokens)[:, -1])  # with no padding: the scalar at the last position
    # not the score at any other position (a bug reading position 0 or −2 would pass otherwise)
    values = rm(tokens)[0]
    assert (values[:-1] - s).abs().min() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("left, right", [(3, 0), (0, 3), (2, 4), (5, 1)])
def test_score_padding_invariance(left, right):
    rm = make_rm()
    s0 = score(rm, *pad(SEQ))
    close(score(rm, *pad(SEQ, left, right)), s0, atol=1e-5)
    # a PAD's token id does not matter either
    s1 = score(rm, *pad(SEQ, left, right, pad_id=17))
    close(s1, s0, atol=1e-5)


@torch.no_grad()
def test_score_batch_mixed_padding():
    rm = make_rm()
    other = [4, 8, 15, 16, 23, EOS]
    s_seq, s_other = score(rm, *pad(SEQ)), score(rm, *pad(other))
    t1, m1 = pad(SEQ, 0, 2)        # right-padded to 9
    t2, m2 = pad(other, 3, 0)      # left-padded to 9
    s = score(rm, torch.cat([t1, t2]), torch.cat([m1, m2]))
    close(s, torch.cat([s_seq, s_other]), atol=1e-5)


@torch.no_grad()
def test_score_depends_on_last_token_not_on_pad():
    rm = make_rm()
    s0 = score(rm, *pad(SEQ, 2, 2))
    changed = SEQ[:-1] + [30]
    s1 = score(rm, *pad(changed, 2, 2))
    assert (s1 - s0).abs().item() > 1e-3, "changing the last real token must change the score"
    tokens, mask = pad(SEQ, 2, 2)
    tokens[0, 0], tokens[0, -1] = 5, 33  # change one left and one right PAD id
    close(score(rm, tokens, mask), s0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# normalisation (#13)


def test_normalize_vector():
    # μ, σ are the SFT samples' (stored in the RM checkpoint), not the batch's: by hand with μ = 0.2, σ = 0.35,
    #   (0.9 − 0.2)/0.35 = 2,  (0.2 − 0.2)/0.35 = 0,  (−0.5 − 0.2)/0.35 = −2,  (1.6 − 0.2)/0.35 = 4,
    #   (0.13 − 0.2)/0.35 = −0.2
    # (x − μ)·σ would give 0.245 first, x/σ − μ 2.371429, (x − μ)/σ² 5.714286.
    out = normalize(torch.tensor([0.9, 0.2, -0.5, 1.6, 0.13], dtype=torch.float64), 0.2, 0.35)
    close(out, torch.tensor([2.0, 0.0, -2.0, 4.0, -0.2], dtype=torch.float64), atol=1e-9)


def test_normalize_inverts_the_affine_map():
    """Scores built as μ + σ·z for z, μ, σ chosen independently of each other come back as exactly z, for any
    batch (the normaliser must not look at the batch's own statistics): here a batch of 3 whose own mean and
    std are far from μ, σ, and a single score."""
    g = torch.Generator().manual_seed(0)
    for mu, sigma in ((2.1, 3.7), (-0.4, 0.05), (0.0, 1.0)):
        z = torch.tensor([1.5, 2.5, 3.0], dtype=torch.float64)  # batch mean 2.33, far from 0
        close(normalize(mu + sigma * z, mu, sigma), z, atol=1e-9)
        z1 = torch.randn(1, generator=g, dtype=torch.float64)
        close(normalize(mu + sigma * z1, mu, sigma), z1, atol=1e-9)


def test_dpo_and_ipo_loss_vectors():
    """RLHF_DETAILS #34: β = 0.1, log π(y_w) = −10, log π_ref(y_w) = −12, log π(y_l) = −15, log π_ref(y_l) = −14:
    h = 0.1·(2 − (−1)) = 0.3, −log σ(0.3) = 0.554355; IPO (3 − 5)² = 4.0; π = π_ref gives ln 2 for every pair."""
    from reward import dpo_loss, ipo_loss
    f = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss, h = dpo_loss(f(-10.0), f(-12.0), f(-15.0), f(-14.0), beta=0.1)
    assert abs(loss.item() - 0.554355) < 1e-6 and abs(h.item() - 0.3) < 1e-12
    loss, _ = ipo_loss(f(-10.0), f(-12.0), f(-15.0), f(-14.0), beta=0.1)
    assert abs(loss.item() - 4.0) < 1e-12
    lp = f(-3.0, -7.5, -1.25)
    loss0, h0 = dpo_loss(lp, lp.clone(), lp.flip(0), lp.flip(0).clone())
    assert abs(loss0.item() - math.log(2)) < 1e-12 and (h0 == 0).all()
    # the sign: raising the chosen answer's log-prob lowers the loss
    assert dpo_loss(f(-9.0), f(-12.0), f(-15.0), f(-14.0))[0] < dpo_loss(f(-10.0), f(-12.0), f(-15.0), f(-14.0))[0]


def test_dpo_over_rankings_is_the_ranking_loss_on_implicit_rewards():
    """DPO over a ranking's C(K,2) pairs = mean over pairs of dpo_loss, i.e. ranking_loss(β·logratio): checked
    against an explicit loop over the pairs with dpo_loss."""
    from reward import dpo_loss
    g = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 20, -torch.rand(3, 4, generator=g, dtype=torch.float64) * 20
    k = torch.tensor([4, 3, 2])
    beta = 0.1
    want = []
    for n in range(3):
        pairs = [dpo_loss(lp[n, i], ref[n, i], lp[n, j], ref[n, j], beta)[0] for i, j in all_pairs(int(k[n]))]
        want.append(sum(pairs) / len(pairs))
    assert abs(ranking_loss(beta * (lp - ref), k).item() - (sum(want) / 3).item()) < 1e-12


def test_ipo_ranking_loss_vector():
    from reward import ipo_ranking_loss
    # one pair: margin 3 (RLHF_DETAILS #34) -> (3 − 5)² = 4; a ranking of 3: margins 3, 4, 1 -> ((−2)² + (−1)² + (−4)²)/3
    assert abs(ipo_ranking_loss(torch.tensor([[2.0, -1.0]]), 0.1).item() - 4.0) < 1e-6
    v = ipo_ranking_loss(torch.tensor([[2.0, -1.0, -2.0]]), 0.1).item()
    assert abs(v - (4 + 1 + 16) / 3) < 1e-5


def test_plackett_luce_loss_vectors():
    from reward import plackett_luce_loss
    # K = 2: the Bradley–Terry pair loss (margin 1 -> 0.313262, RLHF_DETAILS #11)
    assert abs(plackett_luce_loss(torch.tensor([[2.0, 1.0]])).item() - 0.313262) < 1e-6
    # K = 3, r = [2, 1, 0]: −(log e²/(e²+e+1) + log e/(e+1))/2 = (0.407606 + 0.313262)/2 = 0.360434
    assert abs(plackett_luce_loss(torch.tensor([[2.0, 1.0, 0.0]])).item() - 0.360434) < 1e-6
    # a row with k = 2 of K = 3 ignores its padding slot
    both = plackett_luce_loss(torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 99.0]]), torch.tensor([3, 2]))
    assert abs(both.item() - (0.360434 + 0.313262) / 2) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# ensembles (#35)


def test_ensemble_aggregates_hand_vector():
    from reward import aggregate, ensemble_mean, ensemble_uwo, ensemble_worst
    s = torch.tensor([0.2, 1.0, 0.6], dtype=torch.float64)[:, None]     # 3 members, one answer
    close(ensemble_mean(s), [0.6])
    close(ensemble_worst(s), [0.2])
    close(ensemble_uwo(s, 1.0), [0.6 - 0.32 / 3])                        # population variance 0.106667 -> 0.493333
    close(ensemble_uwo(s, 1.0), [0.493333])
    close(ensemble_uwo(s, 0.5), [0.6 - 0.5 * 0.106667])
    # per answer, not over answers: two answers with different spreads
    s2 = torch.tensor([[0.2, 1.0], [1.0, 1.0], [0.6, 1.0]], dtype=torch.float64)  # (M=3, B=2)
    close(aggregate(s2, "mean"), [0.6, 1.0])
    close(aggregate(s2, "worst"), [0.2, 1.0])
    close(aggregate(s2, "uwo", 1.0), [0.493333, 1.0])  # an answer the members agree on pays nothing
    with pytest.raises(ValueError, match="unknown ensemble aggregate"):
        aggregate(s2, "median")


@torch.no_grad()
def test_ensemble_score_equals_aggregate_of_member_scores():
    """Ensemble.forward aggregates position by position: read at the last real token it must equal the aggregate of
    each member's own normalised score() (computed here one member at a time), under mixed padding."""
    from reward import Ensemble, aggregate
    members = [make_rm(seed) for seed in (0, 1, 2)]
    mus, sigmas = [0.3, -1.0, 2.0], [0.5, 2.0, 1.5]
    tokens, mask = pad(SEQ, 2, 1)
    other, omask = pad([4, 8, 15, 16, 23, EOS], 0, 3 + len(SEQ) - 6)
    tokens, mask = torch.cat([tokens, other]), torch.cat([mask, omask])
    each = torch.stack([normalize(score(m, tokens, mask), mu, sd) for m, mu, sd in zip(members, mus, sigmas)])
    for how in ("mean", "worst", "uwo"):
        ens = Ensemble(members, mus, sigmas, how, lam=0.7)
        close(score(ens, tokens, mask), aggregate(each.double(), how, 0.7), atol=1e-5)
    # a one-member ensemble is that member, normalised
    close(score(Ensemble(members[:1], mus[:1], sigmas[:1]), tokens, mask), each[0], atol=1e-5)
