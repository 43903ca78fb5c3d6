"""
The equations of RLHF with PPO, each as a small pure function with its formula and paper above it.

train_ppo.py calls these in paper order; tests/test_ppo.py pins each one to the hand-computed vectors of
RLHF_DETAILS.md. Nothing here knows about models, files or flags: tensors in, tensors out.

Shapes: B responses per batch, T response tokens (right-padded). `mask` is the response mask: 1 on every real
response token up to and including the first EOS, 0 after it. Every mean over tokens is a masked mean, so nothing
after a response's end reaches a loss, a reward, a value or a statistic.

References:
  Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation" (GAE);
  Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (PPO);
  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (KL-shaped reward, adaptive β);
  Stiennon et al. 2020; Ouyang et al. 2022 (InstructGPT: eq. 2, PPO-ptx);
  Schulman 2020, "Approximating KL Divergence" (k1, k2, k3); Huang et al. 2024, "The N implementation details
  of RLHF with PPO".
"""

import math

import torch

from model import mask_after_eos

# ----------------------------------------------------------------------------------------------------------------
# masked statistics


def masked_mean(x, mask, dim=None):
    """mean of x over the positions where mask is 1 (over everything, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask):
    """Population variance (divide by N, not N − 1) over the masked positions (RLHF_DETAILS #21)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


# x̂ = (x − mean) / √(var + 1e-8)   over valid tokens only; shift_mean=False adds the mean back
def masked_whiten(x, mask, shift_mean=True):
    """Whitening over the real tokens: [1, 2, 3, 4] -> [−1.342, −0.447, 0.447, 1.342]. With shift_mean=False
    (used for rewards) the scale changes but the mean is kept. Padding positions come out as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# responses: where they end


def truncate_at_eos(responses, eos_id, pad_id):
    """Cut each response after its first EOS (the EOS is kept) (RLHF_DETAILS #7).
    Returns the responses with PAD after the end, the (B, T) mask, and which responses have an EOS at all."""
    mask = mask_after_eos(responses, eos_id)                                           # (B, T)
    has_eos = ((responses == eos_id) & mask).any(1)                                    # (B,)
    return responses.masked_fill(~mask, pad_id), mask, has_eos


# score = −penalty if the response hit the length limit without EOS        (Huang et al. 2024, detail on EOS)
def apply_missing_eos_penalty(scores, has_eos, penalty):
    """A response that never ended gets a fixed low score instead of the reward model's opinion; otherwise
    length drifts and becomes the easiest exploit (RLHF_DETAILS #16). penalty is a normalised score, e.g. −1."""
    return torch.where(has_eos, scores, torch.full_like(scores, penalty))


# ----------------------------------------------------------------------------------------------------------------
# KL to the reference, and the reward PPO maximises


# with r = π_ref(x) / π(x) and x ~ π:  k1 = −log r,  k2 = ½ (log r)²,  k3 = (r − 1) − log r     (Schulman 2020)
def kl_k1(logprobs, ref_logprobs):
    """log π − log π_ref per token: unbiased for KL(π‖π_ref), can be negative token by token."""
    return logprobs - ref_logprobs


def kl_k2(logprobs, ref_logprobs):
    """½ (log π − log π_ref)²: biased, never negative, low variance."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs, ref_logprobs):
    """(r − 1) − log r with r = π_ref/π: unbiased and never negative."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


# r_t = −β (log π_old(y_t|s_t) − log π_ref(y_t|s_t)),  plus r_θ(x, y) at the last real token
#   so that Σ_t r_t = r_θ(x, y) − β log π(y|x)/π_ref(y|x)                            (InstructGPT eq. 2; Ziegler et al.)
def kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token rewards (B, T): the KL penalty at every response token and the score only at the last one.
    logπ = [−1, −2, −3], logπ_ref = [−1.5, −2, −2], β = 0.1, score 2 -> [−0.05, 0, 2.1]."""
    mask = mask.to(logprobs.dtype)
    rewards = -kl_coef * kl_k1(logprobs, ref_logprobs) * mask                        # (B, T)
    last = (mask * torch.arange(mask.size(1), device=mask.device)).argmax(1)          # (B,) last real token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))  # (B, T)


# ----------------------------------------------------------------------------------------------------------------
# advantages and returns


# δ_t = r_t + γ V(s_{t+1}) − V(s_t),  Â_t = δ_t + γλ Â_{t+1},  V after the last real token = 0;
# returns R_t = Â_t + V(s_t), taken before the advantages are whitened                 (GAE, Schulman et al. 2016)
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over right-padded responses. rewards, values, mask: (B, T).
    r = [0, 0, 1], V = [0.5, 0.6, 0.7], γ = 1, λ = 0.95 -> Â = [0.46575, 0.385, 0.3], R = [0.96575, 0.985, 1.0]."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask  # nothing after the end: V = 0 there, r = 0 there
    T = rewards.size(1)
    advantages = torch.zeros_like(rewards)                                            # (B, T)
    next_adv = torch.zeros_like(rewards[:, 0])                                        # (B,)
    next_value = torch.zeros_like(values[:, 0])                                       # (B,)
    for t in reversed(range(T)):  # T ≈ 50: a loop over time, vectorised over the batch
        delta = rewards[:, t] + gamma * next_value - values[:, t]                     # (B,)
        next_adv = delta + gamma * lam * next_adv                                     # (B,)
        advantages[:, t] = next_adv
        next_value = values[:, t]
    advantages = advantages * mask
    returns = advantages + values                                                     # (B, T)
    return advantages, returns


# ----------------------------------------------------------------------------------------------------------------
# the PPO losses


# ρ_t = π_θ(y_t|s_t) / π_old(y_t|s_t);  L^CLIP = −E_t[ min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε) Â_t) ]   (PPO, Schulman et al. 2017)
def policy_loss_clipped(logprobs, old_logprobs, advantages, mask, cliprange=0.2):
    """The clipped surrogate, as a loss to minimise. Per token: (Â, ρ) = (+1, 1.5) -> −1.2; (+1, 0.5) -> −0.5;
    (−1, 1.5) -> 1.5; (−1, 0.5) -> 0.8. Returns (loss, stats) with clipfrac and approxkl = ½ E[(log ρ)²] (k2)."""
    log_ratio = logprobs - old_logprobs                                               # (B, T)
    ratio = torch.exp(log_ratio)                                                      # (B, T)
    loss_unclipped = -advantages * ratio                                              # (B, T)
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    loss = masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
                 "approxkl": masked_mean(0.5 * log_ratio ** 2, mask),
                 "ratio_max_dev": ((ratio - 1).abs() * mask).max()}
    return loss, stats


# L^KLPEN = −E_t[ ρ_t Â_t − β KL(π_old ‖ π_θ) ]                                  (PPO, Schulman et al. 2017, §4)
def policy_loss_penalty(logprobs, old_logprobs, advantages, mask, beta):
    """PPO's adaptive-KL-penalty objective, as a loss. KL(π_old‖π_θ) per token is estimated on the tokens sampled
    from π_old with k3 (unbiased, ≥ 0), since storing π_old's whole distribution costs a vocabulary per token."""
    log_ratio = logprobs - old_logprobs                                               # (B, T) log π_θ/π_old
    ratio = torch.exp(log_ratio)                                                      # (B, T)
    kl = kl_k3(old_logprobs, logprobs)                                                # (B, T) ≈ KL(π_old ‖ π_θ)
    loss = masked_mean(-advantages * ratio + beta * kl, mask)
    with torch.no_grad():
        stats = {"clipfrac": torch.zeros((), device=logprobs.device),
                 "approxkl": masked_mean(0.5 * log_ratio ** 2, mask), "kl_old_new": masked_mean(kl, mask),
                 "ratio_max_dev": ((ratio - 1).abs() * mask).max()}
    return loss, stats


# d = KL(π_old ‖ π_θ) after the update:  d < d_targ/1.5 → β ← β/2;   d > 1.5·d_targ → β ← 2β    (PPO §4)
def update_penalty_beta(beta, kl, kl_target):
    if kl < kl_target / 1.5:
        return beta / 2
    if kl > kl_target * 1.5:
        return beta * 2
    return beta


# L^V = ½ E_t[ max( (V_θ − R)², (V_old + clip(V_θ − V_old, −ε_v, ε_v) − R)² ) ]   (Ziegler et al.; lm-human-preferences)
def value_loss_clipped(values, old_values, returns, mask, cliprange_value=0.2):
    """The clipped value loss. V_old = 0, V = 0.5, R = 1 -> 0.32 (the clipped branch, zero gradient);
    V = 0.5, R = 0.3 -> 0.02 (unclipped). Returns (loss, stats) with the share of tokens clipped."""
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)  # (B, T)
    loss_unclipped = (values - returns) ** 2                                          # (B, T)
    loss_clipped = (values_clipped - returns) ** 2                                    # (B, T)
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats


# H(π(·|s)) = −Σ_a π(a|s) log π(a|s) = logsumexp(z) − Σ_a softmax(z)_a z_a
def entropy_from_logits(logits):
    """Exact per-token entropy of softmax(logits) (B, T, V) -> (B, T). Uniform logits over V tokens -> ln V."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def explained_variance(values, returns, mask):
    """1 − Var[R − V] / Var[R] over real tokens: 1 is a perfect critic, 0 no better than a constant."""
    var_r = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_r.clamp(min=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# critic-free estimators: k answers per prompt, the other answers of the same prompt are the baseline. Rows of a
# batch come in groups: rows g·k … g·k + k − 1 answer the same prompt.


# A_i = r_i − 1/(k−1) Σ_{j≠i} r_j  =  k/(k−1) · (r_i − mean_j r_j)              (RLOO, Ahmadian et al. 2024)
def rloo_advantages(returns, k):
    """Leave-one-out baseline: each answer is compared with the mean of the *other* k − 1 answers to its prompt
    (unbiased: the baseline does not depend on the answer itself). returns (B,) sequence returns, B = groups × k.
    r = [1, 2, 3, 6] -> [−2.6667, −1.3333, 0, 4] (the group mean would give [−2, −1, 0, 3])."""
    assert k >= 2 and returns.numel() % k == 0, f"RLOO needs groups of k ≥ 2 answers, got {returns.numel()} rows, k={k}"
    r = returns.view(-1, k)                                                            # (G, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)                                  # (G, k) mean of the others
    return (r - baseline).view(-1)                                                     # (B,)


# A_i = (r_i − mean(r)) / (std(r) + ε), std with k − 1                        (GRPO, Shao et al. 2024, DeepSeekMath)
# Dr. GRPO (Liu et al. 2025): A_i = r_i − mean(r), no division by the std
def grpo_advantages(scores, k, scale=True, eps=1e-4):
    """Group-relative advantages. scores (B,), B = groups × k. With the sample std (the paper's):
    r = [1, 2, 3, 6] -> [−0.9258, −0.4629, 0, 1.3887]; scale=False (Dr. GRPO) -> [−2, −1, 0, 3]."""
    assert k >= 2 and scores.numel() % k == 0, f"GRPO needs groups of k ≥ 2 answers, got {scores.numel()} rows, k={k}"
    r = scores.view(-1, k)                                                             # (G, k)
    a = r - r.mean(1, keepdim=True)                                                    # (G, k)
    if scale:
        a = a / (r.std(1, keepdim=True) + eps)  # torch.std is the sample std (k − 1), as in the paper
    return a.view(-1)                                                                  # (B,)


# J = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ_t A_i, clip(ρ_t, 1±ε) A_i) − β k3_t ],  k3 = π_ref/π − log(π_ref/π) − 1
#   (GRPO eq. 3, Shao et al. 2024); Dr. GRPO divides every answer by the same constant L instead of |o_i|
def policy_loss_grpo(logprobs, old_logprobs, ref_logprobs, advantages, mask, cliprange=0.2, kl_coef=0.04,
                     length_norm=None):
    """GRPO's loss to minimise: the clipped surrogate per token with the answer's advantage at every token, and the
    KL to the reference as a loss term (k3, unbiased and ≥ 0) rather than a shaped reward. Each answer's token sum
    is divided by its own length (length_norm=None, the paper) or by a constant (Dr. GRPO: the generation budget),
    then the mean over answers. advantages: (B,) one per answer."""
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)                                        # (B, T)
    adv = advantages[:, None]                                                         # (B, 1)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * adv)  # (B, T)
    kl = kl_k3(logprobs, ref_logprobs)                                                # (B, T) ≥ 0
    per_token = -(surrogate - kl_coef * kl) * mask                                    # (B, T)
    norm = mask.sum(1).clamp(min=1) if length_norm is None else torch.full_like(mask[:, 0], float(length_norm))
    loss = (per_token.sum(1) / norm).mean()
    with torch.no_grad():
        clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * adv < ratio * adv  # the clip is what counts
        stats = {"clipfrac": masked_mean(clipped.float(), mask), "kl_ref": masked_mean(kl, mask),
                 "approxkl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask),
                 "ratio_max_dev": ((ratio - 1).abs() * mask).max()}
    return loss, stats


# ∇J = E_i[ A_i ∇ Σ_t log π(y_t) ]: REINFORCE on the whole answer, with the RLOO baseline    (Ahmadian et al. 2024)
def policy_loss_reinforce(logprobs, advantages, mask):
    """−mean_i A_i · Σ_t log π(y_t | s_t), the sequence-level REINFORCE loss. advantages: (B,) one per answer."""
    return -(advantages * (logprobs * mask.to(logprobs.dtype)).sum(1)).mean()


# ----------------------------------------------------------------------------------------------------------------
# the KL coefficient β


class AdaptiveKLController:
    """Ziegler et al. 2019: e = clip(KL/KL_target − 1, −0.2, 0.2);  β ← β (1 + e · n / horizon), once per batch
    of n episodes. With β = 0.15, n = 512, horizon 10000: KL 12 -> 0.151536; KL 3 -> 0.148464; KL 6 -> 0.15."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self):
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d):
        self.value, self.target, self.horizon = d["value"], d["target"], d["horizon"]


class FixedKLController:
    """β stays where it was set (target_kl is None)."""

    def __init__(self, kl_coef):
        self.value = kl_coef
        self.target = None

    def update(self, current_kl, n_steps):
        pass

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, d):
        self.value = d["value"]


def best_of_n_kl(n):
    """KL(π_bon ‖ π) of best-of-n sampling = ln n − (n − 1)/n (Stiennon et al. 2020; Gao et al. 2022)."""
    return math.log(n) - (n - 1) / n
