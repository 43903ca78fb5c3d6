"""
The reward model: what it reads, the losses it learns from, and how its scores are normalised.

The network is `model.GPTScalar` (the GPT trunk with an n_embd -> 1 head), initialised from the SFT model. It
reads prompt + response and its score is the scalar at the **last real token** (the response's EOS). This file
holds the equations as small functions; train_rm.py trains it and train_ppo.py uses it.

References: Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022 (InstructGPT, eq. 1).
"""

import itertools

import torch
import torch.nn.functional as F

from model import GPTConfig, GPTScalar


def last_token_index(attention_mask):
    """Index of the last real token of each row of a (B, T) 0/1 mask (works with left and right padding)."""
    T = attention_mask.size(1)
    positions = torch.arange(T, device=attention_mask.device)                        # (T,)
    return (attention_mask.long() * positions).argmax(1)                              # (B,)


def score(rm, tokens, attention_mask):
    """r_θ(x, y): the reward model's scalar read at the last real token of prompt + response. (B, T) -> (B,)"""
    values = rm(tokens, attention_mask=attention_mask)                                # (B, T)
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)     # (B,)


# loss = −log σ(r_θ(x, y_w) − r_θ(x, y_l))                      (Bradley–Terry; Stiennon et al. 2020)
def pairwise_loss(r_chosen, r_rejected):
    """Mean over pairs of −log σ(r_w − r_l). Equal rewards -> ln 2; margin 1 -> 0.313262 (RLHF_DETAILS #11)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


# loss(θ) = −1/C(K,2) · E_(x, y_w, y_l) [ log σ(r_θ(x, y_w) − r_θ(x, y_l)) ]           (InstructGPT, eq. 1)
def ranking_loss(rewards, k=None):
    """InstructGPT's loss over all C(K,2) pairs of K ranked responses per prompt.

    rewards: (N, K) scores of each prompt's responses, sorted best first (rewards[:, 0] is the preferred one).
    k: optional (N,) number of real responses per row when rows have different K (the rest is padding).
    All pairs of one prompt stay in the same batch element and are averaged there (training on the pairs as
    independent samples overfits within an epoch, InstructGPT §3.5); then the mean over prompts.
    K = 3 with rewards [2, 1, 0] -> mean pair loss 0.251150.
    """
    N, K = rewards.shape
    if k is None:
        k = torch.full((N,), K, device=rewards.device)
    i, j = torch.triu_indices(K, K, offset=1, device=rewards.device)                 # (P,) each, i < j: i ranked higher
    pair_loss = -F.logsigmoid(rewards[:, i] - rewards[:, j])                          # (N, P)
    valid = (j[None, :] < k[:, None]).float()                                         # (N, P) both responses real
    per_prompt = (pair_loss * valid).sum(1) / valid.sum(1).clamp(min=1)               # (N,) averaged over its pairs
    return per_prompt.mean()


def pair_accuracy(rewards, k=None):
    """Share of ranked pairs (i above j) the model orders the same way: r_i > r_j. rewards (N, K) best first."""
    N, K = rewards.shape
    if k is None:
        k = torch.full((N,), K, device=rewards.device)
    i, j = torch.triu_indices(K, K, offset=1, device=rewards.device)                 # (P,) each
    valid = j[None, :] < k[:, None]                                                   # (N, P)
    right = (rewards[:, i] > rewards[:, j]) & valid                                   # (N, P)
    return right.sum().item(), valid.sum().item()


# r'(x, y) = (r_θ(x, y) − μ) / σ,  μ, σ measured on samples of the SFT policy   (Ziegler et al. 2019; RLHF_DETAILS #13)
def normalize(scores, mu, sigma):
    """So that SFT samples score mean 0, std 1, and the KL coefficient β keeps the same meaning across RMs."""
    return (scores - mu) / sigma


# h = β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))],  loss = −log σ(h)   (DPO, Rafailov et al. 2023)
def dpo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta=0.1):
    """DPO on pairs of sequence log-probs (summed over response tokens). Returns (mean loss, h per pair). The
    implicit reward of an answer is β(log π(y) − log π_ref(y)): DPO is the Bradley–Terry loss on it. β = 0.1,
    log π(y_w) = −10, log π_ref(y_w) = −12, log π(y_l) = −15, log π_ref(y_l) = −14 -> h = 0.3, loss 0.554355;
    at π = π_ref the loss is ln 2 for every pair."""
    h = beta * ((logp_w - ref_logp_w) - (logp_l - ref_logp_l))                        # (P,)
    return -F.logsigmoid(h).mean(), h


# loss = (h/β − 1/(2β))²,  h/β the log-ratio margin                                   (IPO, Azar et al. 2023)
def ipo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta=0.1):
    """IPO: a squared loss that pulls the log-ratio margin to 1/(2β) instead of pushing it to infinity. The DPO
    vector above gives (3 − 5)² = 4.0."""
    margin = (logp_w - ref_logp_w) - (logp_l - ref_logp_l)                            # (P,)
    return ((margin - 1 / (2 * beta)) ** 2).mean(), beta * margin


# DPO over all C(K,2) pairs of a ranking is InstructGPT's ranking loss on the implicit rewards r = β log π/π_ref:
#   ranking_loss(β · logratio, k).  IPO's over the same pairs:
# loss = 1/C(K,2) Σ_{i<j} ((ℓ_i − ℓ_j) − 1/(2β))²,  ℓ = log π(y) − log π_ref(y)        (IPO, Azar et al. 2023)
def ipo_ranking_loss(logratio, beta, k=None):
    """logratio (N, K): log π − log π_ref of each prompt's K responses, best first; k (N,) real responses per row."""
    N, K = logratio.shape
    k = torch.full((N,), K, device=logratio.device) if k is None else k
    i, j = torch.triu_indices(K, K, offset=1, device=logratio.device)                # (P,) each, i ranked higher
    pair_loss = (logratio[:, i] - logratio[:, j] - 1 / (2 * beta)) ** 2               # (N, P)
    valid = (j[None, :] < k[:, None]).float()                                         # (N, P)
    return ((pair_loss * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()


# P(ranking) = Π_{p=1}^{K−1} exp(r_p) / Σ_{q≥p} exp(r_q),  loss = −1/(K−1) log P          (Plackett–Luce; DPO §A.3)
def plackett_luce_loss(rewards, k=None):
    """The whole ranking's likelihood under Plackett–Luce, per position averaged, then the mean over prompts.
    rewards (N, K) best first. With K = 2 it is the pairwise loss: [[2, 1]] -> 0.313262."""
    N, K = rewards.shape
    k = torch.full((N,), K, device=rewards.device) if k is None else k
    pos = torch.arange(K, device=rewards.device)                                      # (K,)
    real = pos[None, :] < k[:, None]                                                  # (N, K)
    r = rewards.masked_fill(~real, float("-inf"))                                     # (N, K)
    # log Σ_{q ≥ p} exp(r_q): a reversed cumulative logsumexp
    tail = torch.logcumsumexp(r.flip(1), dim=1).flip(1)                               # (N, K)
    terms = (r - tail).masked_fill(~real | (pos[None, :] == (k[:, None] - 1)), 0.0)   # the last position is certain
    return (-(terms.sum(1)) / (k - 1).clamp(min=1)).mean()


def all_pairs(ranking_len):
    """The C(K,2) (better, worse) index pairs of a list ranked best first."""
    return list(itertools.combinations(range(ranking_len), 2))


# Ensembles (Coste et al. 2024, "Reward Model Ensembles Help Mitigate Overoptimization"). s: (M, ...) scores of
# M members for the same answers, each member normalised on its own SFT samples, so the members share one scale.
#   mean:  R = 1/M Σ_m s_m
#   worst: R = min_m s_m                                        (worst-case optimisation, WCO)
#   uwo:   R = 1/M Σ_m s_m − λ · 1/M Σ_m (s_m − s̄)²             (uncertainty-weighted, UWO: the population variance)
# s = [0.2, 1.0, 0.6] -> mean 0.6, worst 0.2, uwo (λ = 1) 0.6 − 0.106667 = 0.493333          (RLHF_DETAILS #35)
def ensemble_mean(s):
    return s.mean(0)


def ensemble_worst(s):
    return s.min(0).values


def ensemble_uwo(s, lam=1.0):
    """The paper's UWO penalises the variance across members (not the std); population variance (1/M)."""
    return s.mean(0) - lam * s.var(0, unbiased=False)


AGGREGATES = ("mean", "worst", "uwo")


def aggregate(s, how="mean", lam=1.0):
    """One of AGGREGATES over the members' axis 0 of s (M, ...)."""
    if how == "mean":
        return ensemble_mean(s)
    if how == "worst":
        return ensemble_worst(s)
    if how == "uwo":
        return ensemble_uwo(s, lam)
    raise ValueError(f"unknown ensemble aggregate {how!r}: one of {', '.join(AGGREGATES)}")


class Ensemble(torch.nn.Module):
    """M frozen reward models read as one: forward returns the aggregate of the members' normalised values at every
    position, (B, T). The aggregate acts position by position, so reading it at the last real token (score()) equals
    aggregating the members' normalised scores; its own μ, σ are 0, 1."""

    def __init__(self, members, mus, sigmas, how="mean", lam=1.0):
        super().__init__()
        aggregate(torch.zeros(1, 1), how, lam)  # an unknown aggregate fails here, not in the first rollout
        self.members = torch.nn.ModuleList(members)
        self.mus, self.sigmas = list(mus), list(sigmas)  # plain floats: a cast of the members to bf16 keeps them
        self.how, self.lam = how, lam

    def member_values(self, tokens, attention_mask=None):
        """(M, B, T): each member's normalised value at every position."""
        raw = torch.stack([m(tokens, attention_mask=attention_mask).float() for m in self.members])  # (M, B, T)
        mu, sigma = (torch.tensor(v, device=raw.device)[:, None, None] for v in (self.mus, self.sigmas))
        return normalize(raw, mu, sigma)

    def forward(self, tokens, attention_mask=None):
        return aggregate(self.member_values(tokens, attention_mask), self.how, self.lam)  # (B, T)


def load_reward_model(ckpt, device="cpu"):
    """(GPTScalar in eval mode without gradients, μ, σ) from a reward-model checkpoint dict."""
    rm = GPTScalar(GPTConfig(**ckpt["model_args"]))
    rm.load_state_dict(ckpt["model"])
    rm.to(device).eval().requires_grad_(False)
    return rm, ckpt.get("mu", 0.0), ckpt.get("sigma", 1.0)
