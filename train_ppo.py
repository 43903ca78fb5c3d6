"""
Stage 3: RLHF with PPO. The policy (initialised from the SFT model) maximises the reward model's score minus a
KL penalty to the frozen SFT model (InstructGPT eq. 2), with GAE, the clipped surrogate (or the KL-penalty
variant), a separate critic initialised from the reward model, an adaptive KL coefficient and PPO-ptx.

One iteration, in paper order (the numbered comments below):
  1. rollout: left-padded prompts, KV-cached pure sampling at temperature T from the current policy
  2. log-probs (logits / T) of the policy and of the frozen reference, values from the critic
  3. the frozen reward model scores prompt + truncated response, normalised with its stored μ, σ
  4. KL-shaped per-token rewards;  5. GAE and advantage whitening
  6. ppo_epochs × num_minibatches updates;  7. PPO-ptx;  8. adapt β;  9. log

Reads --init_from (SFT checkpoint), --reward_model (RM checkpoint), prompts (--prompts, or the built-in task's).
Writes <out_dir>/ckpt.pt (policy, critic, optimizers, KL controller, RNG; atomic), log.jsonl (one line per
iteration), evals.json (held-out evaluations), samples_before.json / samples_after.json, summary.json.

  python train_ppo.py                                    # built-in task, after train_sft.py and train_rm.py
  python train_ppo.py --kl_coef=0.02 --target_kl=0       # a fixed β
  python train_ppo.py --algo=rloo --group_size=4         # RLOO: no critic, the other answers are the baseline
  python train_ppo.py --algo=grpo --group_size=4         # GRPO: group-normalised advantages, KL as a loss term

--algo picks the advantage estimator and the policy loss; the loop, the rollout, the reward model, the KL to the
reference and the logs are the same for all three. The critic-free ones build no critic (no value network, no
gradients or Adam states for it: half of the trained parameters' memory).
"""

import argparse
import gc
from collections import Counter
import math
import os
import time

import torch

import common as C
import ppo
import reward
from model import GPT, GPTConfig, GPTScalar


def get_args(argv=None):
    p = C.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--init_from", default="out/sft/ckpt.pt", help="SFT checkpoint: the initial policy and the frozen reference")
    a("--reward_model", default="out/rm/ckpt.pt", help="reward-model checkpoint (also initialises the critic); "
      "several, comma-separated: an ensemble scored by --rm_aggregate (the first initialises the critic)")
    a("--rm_aggregate", default="mean", choices=["mean", "worst", "uwo"],
      help="an ensemble's score (Coste et al. 2024): the members' mean, their minimum, or uwo: mean − λ·variance")
    a("--uwo_lambda", type=C.nonneg, default=1.0, help="λ of --rm_aggregate=uwo")
    a("--prompts", default="", help="PPO prompts JSONL ({'prompt'} or {'messages'}); empty = the built-in task's")
    a("--eval_prompts", default="", help="held-out prompts JSONL; empty = the built-in task's held-out prompts")
    a("--ptx_data", default="", help="PPO-ptx text: SFT-format JSONL; empty = the built-in task's SFT data")
    a("--out_dir", default="out/ppo")
    # the RL problem
    a("--kl_coef", type=C.nonneg, default=0.05, help="β: weight of the per-token KL penalty to the SFT model (initial "
                                                 "value when adaptive)")
    a("--target_kl", type=C.nonneg, default=4.0, help="KL_target in nats per response for the adaptive controller "
                                                  "(Ziegler et al.), ≥ 0; 0 = keep β fixed")
    a("--kl_horizon", type=C.count(), default=400, help="controller horizon in episodes (Ziegler: 10000 for long runs)")
    a("--missing_eos_penalty", type=C.number(float), default=-1.0, help="normalised score of a response without EOS")
    a("--oracle", type=C.flag01, default=0, help="built-in task only, a diagnostic: 1 = optimise the gold labeler itself "
                                           "(normalised on SFT samples) instead of the reward model")
    a("--whiten_rewards", type=C.flag01, default=0, help="1: whiten the rewards (keeping their mean) before GAE")
    a("--gamma", type=C.unit, default=1.0, help="γ: discount")
    a("--lam", type=C.unit, default=0.95, help="λ: GAE parameter")
    a("--critic", type=C.flag01, default=1, help="--algo=ppo: 0 = no critic, V ≡ 0, so that with --lam=1 Â_t is the "
                                                "return-to-go Σ_{t'≥t} γ^{t'−t} r_{t'}: REINFORCE without a baseline")
    # the estimator: PPO (GAE with a critic), or critic-free with k answers per prompt
    a("--algo", default="ppo", choices=["ppo", "rloo", "grpo"],
      help="ppo: GAE and a critic; rloo: leave-one-out baseline over --group_size answers (Ahmadian et al. 2024); "
           "grpo: group-normalised advantages, KL to the reference as a k3 loss term (Shao et al. 2024)")
    a("--group_size", type=C.count(0), default=0, help="k: answers sampled per prompt (0 = 1 for ppo, 4 otherwise); "
                                                       "--batch_size counts answers, so it takes batch_size / k prompts")
    a("--rloo_loss", default="clip", choices=["clip", "reinforce"],
      help="rloo: PPO-clip over the answer's tokens, or REINFORCE on the whole answer (the paper's, exact with "
           "--ppo_epochs=1 --num_minibatches=1)")
    a("--dr_grpo", type=C.flag01, default=0, help="grpo: 1 = Dr. GRPO (Liu et al. 2025): no division by the group's "
                                                 "std, each answer's token sum divided by --response_length")
    # PPO
    a("--policy_loss", default="clip", choices=["clip", "penalty"], help="clipped surrogate, or PPO's KL penalty")
    a("--cliprange", type=C.positive, default=0.2, help="ε of the clipped surrogate")
    a("--penalty_beta", type=C.positive, default=0.1, help="initial β of the PPO-penalty objective (halved/doubled)")
    a("--penalty_target", type=C.positive, default=0.01, help="d_targ: KL(π_old‖π_θ) the PPO-penalty β aims for")
    a("--cliprange_value", type=C.positive, default=0.2, help="ε_v of the clipped value loss")
    a("--vf_coef", type=C.positive, default=0.1,
      help="weight of the value loss (lm-human-preferences' vf_coef). Here the critic is a separate network with its "
           "own Adam, which divides each step by the gradient's scale, and --grad_clip rescales a large gradient to "
           "a fixed norm: so vf_coef leaves the critic's steps as they are (up to Adam's ε, and in a step where the "
           "clip acts at one weight and not at the other) and never touches the policy. Kept so that commands and "
           "logs compare with the original code; the critic's step size is --critic_learning_rate")
    a("--ppo_epochs", type=C.count(), default=2, help="passes over each rollout batch (4 is common, InstructGPT used 1; "
                                              "here 2 reach the gold of 4 in 60%% of the time)")
    a("--num_minibatches", type=C.count(), default=4, help="minibatches per pass")
    a("--batch_size", type=C.count(), default=64, help="prompts (episodes) per rollout")
    a("--iters", type=C.count(), default=100, help="PPO iterations (rollout + update)")
    a("--learning_rate", type=C.positive, default=1e-4, help="policy learning rate, annealed linearly to 0")
    a("--critic_learning_rate", type=C.positive, default=5e-4, help="critic learning rate, annealed linearly to 0")
    a("--adam_eps", type=C.positive, default=1e-5, help="Adam ε (RLHF_DETAILS #30)")
    a("--grad_clip", type=C.nonneg, default=1.0, help="clip each network's gradient norm (0 = off)")
    a("--ptx_coef", type=C.nonneg, default=0.0, help="PPO-ptx γ: weight of the LM loss on --ptx_data (0 = plain PPO)")
    a("--ptx_batch_size", type=C.count(), default=16, help="PPO-ptx sequences per minibatch")
    # sampling
    a("--response_length", type=C.count(), default=64, help="max new tokens per response")
    a("--temperature", type=C.positive, default=0.7, help="T > 0: rollouts sample softmax(logits/T); every log-prob uses T")
    # evaluation and logging
    a("--eval_interval", type=C.count(), default=20, help="iterations between held-out evaluations (and checkpoints)")
    a("--n_eval_prompts", type=C.count(), default=256, help="held-out prompts of each evaluation")
    a("--n_show", type=C.count(0), default=2, help="samples printed at each eval")
    # system
    a("--device", default="auto")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 autocast on CUDA")
    a("--compile", type=C.flag01, default=0, help="1: torch.compile the policy and critic forward of the update")
    a("--threads", type=C.count(0), default=0, help="torch CPU threads (0 = torch's default)")
    a("--seed", type=int, default=1337)
    C.add_run_flags(a)
    args = p.parse_args(argv)
    args.group_size = args.group_size or (1 if args.algo == "ppo" else 4)
    if args.algo != "ppo" and args.group_size < 2:
        C.fail(f"--algo={args.algo} needs --group_size ≥ 2 (the other answers to a prompt are its baseline)")
    if args.algo != "ppo" and (args.policy_loss != "clip" or args.whiten_rewards):
        C.fail(f"--algo={args.algo} has its own loss and no per-token rewards: --policy_loss=penalty and "
               "--whiten_rewards=1 are PPO's")
    if args.batch_size % args.group_size:
        C.fail(f"--batch_size={args.batch_size} (answers) is not divisible by --group_size={args.group_size}")
    if args.batch_size % args.num_minibatches:
        C.fail(f"--batch_size={args.batch_size} is not divisible by --num_minibatches={args.num_minibatches}")
    for flag in ("prompts", "eval_prompts", "ptx_data"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            C.fail(f"--{flag}={path}: no such file")
    return args


# ----------------------------------------------------------------------------------------------------------------
# the four networks


def load_models(args, device):
    """Policy and frozen reference from the SFT checkpoint; frozen reward model and the critic from the RM one."""
    from tokenizer import Tokenizer
    sft = C.load_checkpoint(args.init_from, "--init_from", kinds=("sft",))
    # one reward model, or an ensemble of several (comma-separated) whose aggregate is the score
    rm, mu, sigma, rm_ckpt = C.load_reward_models(args.reward_model, "--reward_model", device, args.rm_aggregate,
                                                  args.uwo_lambda, tokenizer=sft.get("tokenizer"))
    tok = Tokenizer.from_dict(sft["tokenizer"])
    config = GPTConfig(**{**sft["model_args"], "dropout": 0.0})  # dropout off during RL (RLHF_DETAILS #6)
    if args.response_length + 8 > config.block_size:
        C.fail(f"--response_length={args.response_length} leaves no room for a prompt in block_size={config.block_size}")
    policy = GPT(config)
    policy.load_state_dict(sft["model"])
    ref = GPT(config)
    ref.load_state_dict(sft["model"])
    critic = None  # the critic-free estimators build none
    if args.algo == "ppo" and args.critic:  # from the (first) reward model
        critic = GPTScalar(GPTConfig(**{**rm_ckpt["model_args"], "dropout": 0.0}))
        critic.load_state_dict(rm_ckpt["model"])
        c_mu, c_sigma = rm_ckpt.get("mu", 0.0), rm_ckpt.get("sigma", 1.0)
        with torch.no_grad():  # fold the normalisation into the critic's head: at first, V(last token) = (r − μ)/σ
            critic.head.weight /= c_sigma
            critic.head.bias.sub_(c_mu).div_(c_sigma)
        critic = critic.to(device).eval()
    # The reference keeps fp32 weights like the policy, under the same autocast: it must compute its log-probs
    # exactly as the policy does, so that KL is exactly 0 at iteration 0 in bf16 too and the policy never pays a
    # KL penalty for rounding. The reward model is compared with nothing: bf16 weights on CUDA save its memory.
    ref.eval().requires_grad_(False)
    if device.startswith("cuda") and args.dtype in ("auto", "bfloat16"):
        rm.to(torch.bfloat16)
    return policy.to(device).eval(), ref.to(device), critic, rm, mu, sigma, tok


def response_values(critic, tokens, attn_mask, Tp):
    """V(s_t) for each response token: the critic at the same positions as the log-probs."""
    return critic(tokens, attention_mask=attn_mask)[:, Tp - 1:-1].float()             # (B, Tn)


# ----------------------------------------------------------------------------------------------------------------
# one PPO iteration


@torch.no_grad()
def rollout(policy, ref, critic, rm, mu, sigma, tok, prompts, args, kl_coef, gen, device, dtype, stop_at_eos=True,
            oracle=None):
    """Steps 1–5: sample, score and compute advantages for a batch of prompts (lists of token ids).
    oracle: optional function (responses, response_mask) -> normalised scores that replaces the reward model
    (the built-in task's gold labeler, as a diagnostic of what PPO does with a perfect reward model)."""
    # 1. rollout: KV-cached pure sampling from softmax(logits / T) of the current policy (RLHF_DETAILS #3)
    s = C.sample_responses(policy, tok, prompts, args.response_length, args.temperature, gen, device, dtype,
                           stop_at_eos)
    tokens, attn_mask, responses, response_mask, has_eos, Tp = (
        s[k] for k in ("tokens", "attn_mask", "responses", "response_mask", "has_eos", "Tp"))

    # 2. log-probs of the policy and of the frozen reference (same T, same autocast), values from the critic
    with C.autocast(device, dtype):
        logprobs, entropy = C.response_logprobs(policy, tokens, attn_mask, responses, response_mask, Tp,
                                              args.temperature, with_entropy=True)     # (B, Tn) each
        # RLHF_DETAILS #27 in its real meaning: the training forward at the sampler's own weights must give the
        # log-probs the KV-cached sampler drew each token with. A temperature, position-id, padding or cache
        # mismatch between sampling and training shows here, on every token of every iteration.
        sampler_dev = check_sampler_logprobs(s["sampler_logprobs"], logprobs, response_mask, dtype)
        ref_logprobs = C.response_logprobs(ref, tokens, attn_mask, responses, response_mask, Tp, args.temperature)
        values = (response_values(critic, tokens, attn_mask, Tp) if critic is not None
                  else torch.zeros_like(logprobs))                                     # (B, Tn)

        # 3. score: the reward model at the last real token, normalised; a response without EOS gets the penalty
        raw = reward.score(rm, tokens, attn_mask).float()                              # (B,)
    normalised = reward.normalize(raw, mu, sigma) if oracle is None else oracle(responses, response_mask)
    scores = ppo.apply_missing_eos_penalty(normalised, has_eos, args.missing_eos_penalty)  # (B,)

    kl = (ppo.kl_k1(logprobs, ref_logprobs) * response_mask).sum(1)                    # (B,) k1 per response
    if args.algo == "ppo":
        # 4. KL-shaped per-token rewards: −β(log π − log π_ref) at every token, the score added at the last one
        rewards = ppo.kl_shaped_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef)  # (B, Tn)
        if args.whiten_rewards:
            rewards = ppo.masked_whiten(rewards, response_mask, shift_mean=False)

        # 5. GAE; returns before whitening; then the advantages are whitened over real tokens
        advantages, returns = ppo.gae(rewards, values, response_mask, args.gamma, args.lam)  # (B, Tn) each
        adv_var = ppo.masked_var(advantages, response_mask)  # what a baseline reduces; whitening only rescales it
        advantages = ppo.masked_whiten(advantages, response_mask)
    else:
        # 4–5, critic-free: one advantage per answer against the other answers to its prompt, at all its tokens.
        # RLOO's return is KL-shaped (score − β·KL of that answer); GRPO's is the score alone (its KL is a loss term)
        if args.algo == "rloo":
            seq_adv = ppo.rloo_advantages(scores - kl_coef * kl, args.group_size)     # (B,)
        else:
            seq_adv = ppo.grpo_advantages(scores, args.group_size, scale=not args.dr_grpo)  # (B,)
        advantages = seq_adv[:, None] * response_mask                                 # (B, Tn)
        returns = torch.zeros_like(advantages)
        adv_var = ppo.masked_var(advantages, response_mask)

    stats = {"objective/scores": scores.mean(), "objective/kl": kl.mean(),
             "objective/kl_k3": (ppo.kl_k3(logprobs, ref_logprobs) * response_mask).sum(1).mean(),
             "objective/entropy": ppo.masked_mean(entropy, response_mask),
             "objective/rm_raw": raw.mean(), "ppo/returns/mean": ppo.masked_mean(returns, response_mask),
             "ppo/advantages/var": adv_var,
             "response/length": response_mask.float().sum(1).mean(), "response/eos_share": has_eos.float().mean(),
             "ppo/sampler_max_dev": torch.tensor(sampler_dev)}
    if critic is not None:
        stats["ppo/val/mean"] = ppo.masked_mean(values, response_mask)
    return {"tokens": tokens, "attn_mask": attn_mask, "responses": responses, "response_mask": response_mask,
            "Tp": Tp, "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values,
            "advantages": advantages, "returns": returns, "stats": stats, "n_tokens": int(response_mask.sum()),
            "seq_advantages": seq_adv if args.algo != "ppo" else None}


# max |log π_sampler − log π_trainer| over real response tokens at equal weights: fp32 differs only by the order of
# the sums (the cache against the full forward; measured ≤ 2e-6 here); bf16 autocast rounds each matmul's inputs to
# 8 bits of mantissa, and the two paths round different partial sums (measured with CPU bf16 autocast: ≤ 0.017 on
# the tests' trained tiny model, 0.006–0.011 on GPT-2-initialised 4×128 and 6×384 models).
SAMPLER_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25}


def check_sampler_logprobs(sampler_logprobs, logprobs, mask, dtype):
    dev = ((sampler_logprobs - logprobs).abs() * mask).max().item()
    tol = SAMPLER_TOLERANCE.get(dtype, SAMPLER_TOLERANCE["bfloat16"])
    assert dev <= tol, (f"sampler against trainer: the training forward's log-probs differ from the sampler's by "
                        f"up to {dev:.2e} nats (tolerance {tol:.0e} for {dtype}): sampling and training disagree "
                        f"on the temperature, the position ids, the padding or the KV cache")
    return dev


class PolicyForward(torch.nn.Module):
    """The policy's part of one update step as a single module call (response log-probs, and the PPO-ptx LM loss
    when there is ptx text), so that under torchrun DistributedDataParallel sees one forward per backward."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, tokens, attn_mask, responses, mask, Tp, temperature, ptx_x=None, ptx_y=None):
        logprobs = C.response_logprobs(self.policy, tokens, attn_mask, responses, mask, Tp, temperature)
        ptx_loss = self.policy(ptx_x, targets=ptx_y)[1] if ptx_x is not None else None
        return logprobs, ptx_loss


def update(policy, critic, opt_policy, opt_critic, batch, args, device, dtype, gen, penalty_beta, ptx=None,
           policy_fwd=None, critic_fwd=None, kl_coef=0.0):
    """Steps 6–7: ppo_epochs × num_minibatches updates of policy and critic on one rollout batch (the policy alone
    for the critic-free estimators: critic is None). policy_fwd / critic_fwd: the DDP-wrapped modules under torchrun
    (default: the plain networks). kl_coef: GRPO's β, the weight of its KL loss term."""
    policy_fwd = PolicyForward(policy) if policy_fwd is None else policy_fwd
    critic_fwd = critic if critic_fwd is None else critic_fwd
    B, Tp = batch["tokens"].size(0), batch["Tp"]
    mb = B // args.num_minibatches
    stats = []
    for epoch in range(args.ppo_epochs):
        perm = torch.randperm(B, generator=gen)  # a fresh permutation every epoch (RLHF_DETAILS #26)
        for m in range(args.num_minibatches):
            idx = perm[m * mb:(m + 1) * mb].to(device)
            tokens, attn_mask = batch["tokens"][idx], batch["attn_mask"][idx]
            responses, mask = batch["responses"][idx], batch["response_mask"][idx]
            old_logprobs, old_values = batch["logprobs"][idx], batch["values"][idx]
            advantages, returns = batch["advantages"][idx], batch["returns"][idx]

            # 7. (its data) PPO-ptx: a batch of pretraining/SFT text for the same step
            x = y = None
            if args.ptx_coef > 0:
                x, y = ptx.batch(args.ptx_batch_size, int(torch.randint(1 << 30, (1,), generator=gen)), args.seed,
                                 device)
            # 6. the clipped surrogate (or PPO-penalty) for the policy, the clipped value loss for the critic
            with C.autocast(device, dtype):
                logprobs, ptx_loss = policy_fwd(tokens, attn_mask, responses, mask, Tp, args.temperature, x, y)
                values = response_values(critic_fwd, tokens, attn_mask, Tp) if critic is not None else None
            if args.algo == "grpo":
                pg_loss, pg = ppo.policy_loss_grpo(logprobs, old_logprobs, batch["ref_logprobs"][idx],
                                                   batch["seq_advantages"][idx], mask, args.cliprange, kl_coef,
                                                   args.response_length if args.dr_grpo else None)
            elif args.algo == "rloo" and args.rloo_loss == "reinforce":
                pg_loss = ppo.policy_loss_reinforce(logprobs, batch["seq_advantages"][idx], mask)
                pg = ppo.policy_loss_clipped(logprobs.detach(), old_logprobs, advantages, mask, args.cliprange)[1]
            elif args.policy_loss == "clip":
                pg_loss, pg = ppo.policy_loss_clipped(logprobs, old_logprobs, advantages, mask, args.cliprange)
            else:
                pg_loss, pg = ppo.policy_loss_penalty(logprobs, old_logprobs, advantages, mask, penalty_beta)
            if critic is not None:
                vf_loss, vf = ppo.value_loss_clipped(values, old_values, returns, mask, args.cliprange_value)
            if epoch == 0 and m == 0:
                # the first minibatch sees the rollout's own policy: ρ ≡ 1 (RLHF_DETAILS #27). A failure here
                # means a temperature, dropout, padding or position-id mismatch between sampling and training.
                tol = 1e-4 if dtype == "float32" else 5e-2
                dev, akl = pg["ratio_max_dev"].item(), pg["approxkl"].item()
                assert dev < tol and akl < tol ** 2 and pg["clipfrac"].item() == 0, \
                    f"first minibatch: expected ρ ≡ 1, found max|ρ−1| = {dev:.2e}, approxkl = {akl:.2e}"

            # 7. PPO-ptx: γ_ptx · the language-modelling loss on pretraining/SFT text, in the same step
            loss = pg_loss
            if args.ptx_coef > 0:
                loss = loss + args.ptx_coef * ptx_loss
            opt_policy.zero_grad(set_to_none=True)
            if critic is not None:
                opt_critic.zero_grad(set_to_none=True)
                loss = loss + args.vf_coef * vf_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip or math.inf, foreach=True)
            opt_policy.step()
            row = {"ppo/policy/approxkl": pg["approxkl"], "ppo/policy/clipfrac": pg["clipfrac"],
                   "ppo/policy/ratio_max_dev": pg["ratio_max_dev"], "ppo/loss/policy": pg_loss.detach()}
            if critic is not None:
                torch.nn.utils.clip_grad_norm_(critic.parameters(), args.grad_clip or math.inf, foreach=True)
                opt_critic.step()
                row.update({"ppo/loss/value": vf_loss.detach(), "ppo/val/clipfrac": vf["clipfrac"],
                            "ppo/val/var_explained": ppo.explained_variance(values.detach(), returns, mask)})
            if args.algo == "grpo":
                row["ppo/policy/kl_ref"] = pg["kl_ref"]
            if args.ptx_coef > 0:
                row["ppo/loss/ptx"] = ptx_loss.detach()
            stats.append(row)
    # one sync for the whole update: means over its minibatches
    out = {k: torch.stack([s[k] for s in stats]).float().mean().item() for k in stats[0]}
    # max |ρ − 1| over every minibatch of the update: how far the policy moved from the one that sampled the batch
    # (under torchrun, like every logged figure, the mean over the processes of each one's own maximum)
    out["ppo/policy/ratio_max_dev"] = max(s["ppo/policy/ratio_max_dev"] for s in stats).item()
    if args.policy_loss == "penalty":  # the d that PPO-penalty's β rule reads: after the update, not during it
        out["ppo/policy/kl_old_new"] = kl_old_new(policy, batch, args, device, dtype)
    return out


# d = E_t[ KL(π_old ‖ π_θ) ] once the epochs of updates are done                              (PPO, Schulman et al. 2017, §4)
@torch.no_grad()
def kl_old_new(policy, batch, args, device, dtype):
    """The KL from the rollout's policy to the updated one, by k3 on the rollout's tokens (they were drawn from
    π_old, so k3 is unbiased), over every real response token of the batch. Taken before each step instead, as the
    minibatch losses see it, it would start at 0 by construction and read about half the real value."""
    B, mb = batch["tokens"].size(0), batch["tokens"].size(0) // args.num_minibatches
    new = []
    for s in range(0, B, mb):
        rows = slice(s, s + mb)
        with C.autocast(device, dtype):
            new.append(C.response_logprobs(policy, batch["tokens"][rows], batch["attn_mask"][rows],
                                         batch["responses"][rows], batch["response_mask"][rows], batch["Tp"],
                                         args.temperature))                             # (mb, Tn)
    return ppo.masked_mean(ppo.kl_k3(batch["logprobs"], torch.cat(new)), batch["response_mask"]).item()


# ----------------------------------------------------------------------------------------------------------------
# evaluation on held-out prompts


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    from data.formats import DataError, load_prompts, load_sft
    from tokenizer import render_prompt
    args = get_args(argv)
    rank, world = C.init_distributed(args)  # torchrun: each process rolls out its own prompts with its own seed
    master = rank == 0                      # the one process that evaluates, logs and writes checkpoints
    device, dtype, ckpt_path = C.start_run(args)
    t_start = time.time()

    policy, ref, critic, rm, mu, sigma, tok = load_models(args, device)
    builtin = not args.prompts
    try:
        paths = C.prepare_builtin(quiet=True) if builtin or not args.eval_prompts else None
        train_prompts = load_prompts(args.prompts or paths["prompts_train"])
        eval_prompts = load_prompts(args.eval_prompts or paths["prompts_val"])[:args.n_eval_prompts]
        ptx = None
        if args.ptx_coef > 0:
            ptx_path = args.ptx_data or C.prepare_builtin(quiet=True)["sft_train"]
            ptx = C.ChatData(load_sft(ptx_path), tok, policy.config.block_size, ptx_path)
    except DataError as e:
        C.fail(str(e))
    max_prompt = policy.config.block_size - args.response_length
    train_requests = [m[-1]["content"] for m in train_prompts]
    cuts = Counter()
    train_prompts = [render_prompt(tok, m, max_tokens=max_prompt, cuts=cuts) for m in train_prompts]
    if master:
        C.report_cuts(args.prompts or "the built-in prompts", cuts, len(train_prompts), max_prompt)
    if args.oracle and (not builtin or world > 1):
        C.fail("--oracle=1 needs the built-in task (its gold labeler) and a single process")
    if master:
            print(f"policy {policy.get_num_params() / 1e6:.2f}M params; {len(train_prompts)} train prompts, "
              f"{len(eval_prompts)} held-out; reward normalisation μ={mu:.3f} σ={sigma:.3f}"
              + (f"; {world} processes × {args.batch_size} prompts" if world > 1 else ""))

    opt_policy = policy.configure_optimizers(0.0, args.learning_rate, (0.9, 0.999), args.adam_eps, device.split(":")[0])
    opt_critic = None if critic is None else GPT.configure_optimizers(
        critic, 0.0, args.critic_learning_rate, (0.9, 0.999), args.adam_eps, device.split(":")[0])
    kl_ctl = (ppo.AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon) if args.target_kl > 0
              else ppo.FixedKLController(args.kl_coef))
    penalty_beta = args.penalty_beta
    gen = torch.Generator(device=device).manual_seed(args.seed + rank)        # sampling
    cpu_gen = torch.Generator().manual_seed(args.seed + 1 + 1000 * rank)     # prompt order, minibatch permutations
    # under torchrun, DDP averages the gradients of policy and critic over the processes
    policy_fwd = C.ddp(PolicyForward(policy), world, device)
    critic_fwd = None if critic is None else C.ddp(critic, world, device)
    if args.compile:  # the update's forward passes; sampling and scoring stay eager (their shapes change)
        policy_fwd = torch.compile(policy_fwd)
        critic_fwd = None if critic is None else torch.compile(critic_fwd)
    if world > 1:
        rank_log = C.RunLog(args.out_dir, name=f"log_rank{rank}.jsonl")  # each process's own, before all-reduce
    start_it, before, evals = 0, None, []
    log = None
    if args.resume:
        ck = C.load_checkpoint(ckpt_path, "--resume", kinds=("ppo",))
        policy.load_state_dict(ck["policy"])
        opt_policy.load_state_dict(ck["opt_policy"])
        if critic is not None:
            critic.load_state_dict(ck["critic"])
            opt_critic.load_state_dict(ck["opt_critic"])
        kl_ctl.load_state_dict(ck["kl_ctl"])
        penalty_beta = ck["penalty_beta"]
        rngs = ck["rng"] if isinstance(ck["rng"], list) else [ck["rng"]]  # one per process (older: rank 0's only)
        if len(rngs) != world:
            C.fail(f"--resume: {ckpt_path} was written by {len(rngs)} processes, this run has {world}: resume with "
                   f"the same number (each process continues its own random streams)")
        C.set_rng_state(rngs[rank], gen, cpu_gen)
        start_it, before, evals = ck["iter"], ck["before"], ck["evals"]
        print(f"resuming {ckpt_path} at iteration {start_it}")
    log = C.RunLog(args.out_dir, resume_step=start_it if args.resume else None) if master else None

    def save(it, rngs):
        """rngs: every process's random state (C.rng_states_of_all_ranks, which all of them must call)."""
        if not master:
            return
        C.save_checkpoint(ckpt_path, {
            "stage": "ppo", "algo": args.algo, "policy": policy.state_dict(),
            "critic": None if critic is None else critic.state_dict(), "model_args": C.model_args(policy),
            "opt_policy": opt_policy.state_dict(), "opt_critic": None if critic is None else opt_critic.state_dict(), "kl_ctl": kl_ctl.state_dict(), "penalty_beta": penalty_beta,
            "iter": it, "before": before, "evals": evals, "args": vars(args), "tokenizer": tok.to_dict(),
            "rng": rngs, "mu": mu, "sigma": sigma, "complete": it == args.iters})

    def run_eval(it):
        ev = C.evaluate_policy(policy, ref, rm, mu, sigma, tok, eval_prompts, args, device, dtype, args.seed + 2,
                             builtin, n_show=args.n_show)
        row = {"iter": it, "kl_coef": kl_ctl.value, **{k: v for k, v in ev.items() if k != "samples"}}
        evals.append(row)
        C.write_json(os.path.join(args.out_dir, "evals.json"), evals)
        print(f"eval iter {it} | " + " | ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "iter"), flush=True)
        return ev

    if before is None and master:  # the SFT policy on the held-out prompts: the "before" of every comparison
        ev0 = run_eval(0)
        C.write_json(os.path.join(args.out_dir, "samples_before.json"), ev0["samples"])
        before = {k: v for k, v in ev0.items() if k != "samples"}
    gc.collect()
    gc.freeze()  # the models and data are long-lived: keep the garbage collector from rescanning them each pause

    def lr_frac(it):  # linear annealing to 0 over the run (RLHF_DETAILS #30)
        return 1.0 - it / args.iters

    t_rollout = t_update = 0.0
    t_loop, done_here = time.time(), 0
    for it in range(start_it, args.iters):
        for group in opt_policy.param_groups:
            group["lr"] = args.learning_rate * lr_frac(it)
        for group in (opt_critic.param_groups if critic is not None else []):
            group["lr"] = args.critic_learning_rate * lr_frac(it)
        t0 = time.time()
        # batch_size answers: batch_size / k prompts, each answered k times in a row (k = 1 for PPO)
        pick = torch.randint(len(train_prompts), (args.batch_size // args.group_size,), generator=cpu_gen)
        pick = pick.repeat_interleave(args.group_size).tolist()
        oracle = None
        if args.oracle:  # gold of each response, normalised like the reward model: SFT samples -> mean 0, std 1
            from data import minichat
            requests = [train_requests[i] for i in pick]
            oracle = lambda resp, mask: torch.tensor(  # noqa: E731
                [(minichat.gold(q, *C.decode_response(tok, r, m)) - before["gold"]) / max(before["gold_std"], 1e-3)
                 for q, r, m in zip(requests, resp.cpu(), mask.cpu())], device=device)
        batch = rollout(policy, ref, critic, rm, mu, sigma, tok, [train_prompts[i] for i in pick], args,
                        kl_ctl.value, gen, device, dtype, oracle=oracle)
        t1 = time.time()
        upd = update(policy, critic, opt_policy, opt_critic, batch, args, device, dtype, cpu_gen, penalty_beta, ptx,
                     policy_fwd, critic_fwd, kl_coef=kl_ctl.value)
        t2 = time.time()
        t_rollout, t_update = t_rollout + t1 - t0, t_update + t2 - t1
        stats = {k: v.item() for k, v in batch["stats"].items()}
        if world > 1:  # every logged metric, and the KL that steers β, is the mean over the processes
            rank_log.log({"step": it, **stats, **upd})
            stats = {k: C.all_reduce_mean(torch.tensor(v, dtype=torch.float64, device=device), world).item()
                     for k, v in stats.items()}
            upd = {k: C.all_reduce_mean(torch.tensor(v, dtype=torch.float64, device=device), world).item()
                   for k, v in upd.items()}
        C.check_finite(upd["ppo/loss/policy"] + upd.get("ppo/loss/value", 0.0), "PPO loss", it, ckpt_path)

        # 8. adapt β toward the target KL (or keep it fixed); the PPO-penalty variant adapts its own β too
        kl_coef_used, penalty_beta_used = kl_ctl.value, penalty_beta
        kl_ctl.update(stats["objective/kl"], args.batch_size * world)  # n: episodes of the global batch
        if args.policy_loss == "penalty":
            penalty_beta = ppo.update_penalty_beta(penalty_beta, upd["ppo/policy/kl_old_new"], args.penalty_target)

        # 9. log
        done_here += 1
        row = {"step": it, **stats, **upd, "objective/kl_coef": kl_coef_used, "time/rollout": t1 - t0,
               "time/update": t2 - t1, "tokens_per_s": batch["n_tokens"] / (t2 - t0)}
        if args.policy_loss == "penalty":
            row["ppo/policy/penalty_beta"] = penalty_beta_used
        if master:
            log.log(row, f"ppo iter {it}/{args.iters} | score {stats['objective/scores']:+.3f} | "
                         f"kl {stats['objective/kl']:.3f} | β {kl_coef_used:.4f} | "
                         f"ent {stats['objective/entropy']:.3f} | len {stats['response/length']:.1f} | "
                         f"eos {stats['response/eos_share']:.2f} | approxkl {upd['ppo/policy/approxkl']:.4f} | "
                         f"clipfrac {upd['ppo/policy/clipfrac']:.3f} | max|ρ−1| {upd['ppo/policy/ratio_max_dev']:.3f} | "
                         f"adv_var {stats['ppo/advantages/var']:.3f} | "
                         + (f"vexp {upd['ppo/val/var_explained']:.2f} | " if critic is not None else "")
                         + (f"β_pen {penalty_beta_used:.4f} | d {upd['ppo/policy/kl_old_new']:.4f} | "
                            if args.policy_loss == "penalty" else "")
                         + (f"ptx {upd['ppo/loss/ptx']:.3f} | " if args.ptx_coef > 0 else "") +
                         f"{t1 - t0:.2f}s+{t2 - t1:.2f}s | eta {C.eta(t_loop, done_here, args.iters - start_it)}")
        if (it + 1) % args.eval_interval == 0 and it + 1 < args.iters:
            rngs = C.rng_states_of_all_ranks(world, gen, cpu_gen)
            if master:
                run_eval(it + 1)
                save(it + 1, rngs)
        if args.stop_after and done_here >= args.stop_after and it + 1 < args.iters:
            save(it + 1, C.rng_states_of_all_ranks(world, gen, cpu_gen))
            print(f"stopping after {done_here} iterations (--stop_after); continue with --resume=1")
            return C.finish_distributed(world)
    rngs = C.rng_states_of_all_ranks(world, gen, cpu_gen)
    if not master:
        return C.finish_distributed(world)
    after = run_eval(args.iters)
    save(args.iters, rngs)
    C.write_json(os.path.join(args.out_dir, "samples_after.json"), after["samples"])
    kls = [r for r in _read_log(log.path)]
    last_fifth = kls[-max(1, len(kls) // 5):]
    summary = {"seconds": time.time() - t_start, "rollout_seconds": t_rollout, "update_seconds": t_update,
               "iters": args.iters, "score_before": before["score"], "score_after": after["score"],
               "kl_final": after["kl"], "target_kl": args.target_kl if args.target_kl > 0 else None,
               "kl_last_fifth": sum(r["objective/kl"] for r in last_fifth) / len(last_fifth),
               "kl_coef_final": kl_ctl.value, "length_before": before["length"], "length_after": after["length"],
               "eos_share_before": before["eos_share"], "eos_share_after": after["eos_share"],
               "algo": args.algo, "peak_memory_mb": C.peak_memory_mb(device)}
    if builtin:
        summary.update(gold_before=before["gold"], gold_after=after["gold"], gold_std_before=before["gold_std"],
                       gold_std_after=after["gold_std"], well_formed_before=before["well_formed"],
                       well_formed_after=after["well_formed"])
    C.write_json(os.path.join(args.out_dir, "summary.json"), summary)
    print("summary: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    C.finish_distributed(world)


def _read_log(path):
    import json
    with open(path) as f:
        return [r for r in map(json.loads, f) if "objective/kl" in r]


if __name__ == "__main__":
    main()
