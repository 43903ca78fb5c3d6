"""
Speed benchmark. Prints progress, then as its LAST line one JSON object that other tools read:

  device, config, train_tokens_per_s (forward + backward + AdamW step), sample_tokens_per_s_cache and
  sample_tokens_per_s_nocache (batch 64, 64-token prompts, 128 new tokens, pure sampling with no early stop),
  kv_cache_speedup, (--hf=1) hf_sample_tokens_per_s_cache / _nocache and sample_speedup_vs_hf_cache (Hugging Face
  generate on the same weights, the same batch), train_mfu on CUDA (against the GPU's bf16 peak), and (--ppo=1)
  ppo_iter_seconds, ppo_rollout_seconds, ppo_update_seconds, ppo_response_tokens (real tokens: 64 × 48)
  (medians at the PPO issue's fixed setting, at --vocab), ppo_model_gflop (the iteration's model FLOPs), and on CPU
  cpu_peak_gflops (this machine's fp32 matmul rate, measured), ppo_floor_seconds (the FLOPs at that rate) and
  ppo_floor_fraction (floor / measured: 1 would be a perfect implementation), and peak memory.

Numbers are medians of repeated timings; the machines are shared and noisy, so compare runs side by side.

  python bench.py                      # CPU, the built-in task's small config, 2 threads
  python bench.py --vocab=50257        # the same at GPT-2's vocabulary
  python bench.py --ppo=0 --hf=1       # sampling, ours against Hugging Face generate on the same weights
  python bench.py --device=cuda --config=gpt2
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch

import common as C
from model import GPT, GPTConfig

CONFIGS = {
    # the built-in task's default model (and the PPO speed setting): GPT-2 architecture, 4 layers, 4 heads, 128 wide
    "small": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=512, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024),
}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    """Median wall time of fn() over `repeat` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_train(model, device, batch, seq, repeat, autocast):
    x = torch.randint(0, model.config.vocab_size - 2, (batch, seq + 1), device=device)
    opt = model.configure_optimizers(0.1, 1e-4, device_type=device)
    model.train()

    def step():
        with autocast:
            _, loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch * seq / timed(step, device, repeat)


# peak dense bf16 matmul throughput, FLOP/s, by the name torch reports (MFU is measured against it)
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def model_flops_per_token(config, seq):
    """6N for the matmuls forward + backward, plus the attention scores: 12·L·C·T (Kaplan et al.; PaLM appendix B)."""
    n = 12 * config.n_layer * config.n_embd ** 2 + config.vocab_size * config.n_embd  # blocks + tied embedding
    return 6 * n + 12 * config.n_layer * config.n_embd * seq


def hf_twin(config, device):
    """Our GPT and a Hugging Face GPT2LMHeadModel with the same weights (one network, two implementations), for
    timing HF `generate` against ours on the same model; transformers is optional and imported only here."""
    try:
        import transformers
    except ImportError:
        C.fail("--hf=1 needs the optional package transformers (pip install transformers), or pass --hf=0")
    V = config.vocab_size
    hf_cfg = transformers.GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                                     vocab_size=V, n_positions=config.block_size, activation_function="gelu_new",
                                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=V - 2,
                                     eos_token_id=None, pad_token_id=V - 1)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.generation_config.eos_token_id = None  # like eos_id=None in ours: every response is max_new_tokens long
    hf.generation_config.pad_token_id = V - 1
    return GPT.from_hf(hf).to(device), hf.to(device)


def bench_sample_hf(hf, device, batch, prompt_len, new_tokens, use_cache, repeat, autocast):
    """bench_sample through Hugging Face `generate`: pure sampling from softmax(logits) (no top-k, top-p or early
    stop), the same batch, prompt length and new tokens."""
    V = hf.config.vocab_size
    prompts = torch.randint(0, V - 2, (batch, prompt_len), device=device)
    torch.manual_seed(0)

    def run():
        with autocast, torch.no_grad():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0, top_p=1.0,
                        temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=use_cache)

    return batch * new_tokens / timed(run, device, repeat)


def bench_sample(model, device, batch, prompt_len, new_tokens, use_cache, repeat, autocast):
    model.eval()
    prompts = torch.randint(0, model.config.vocab_size - 2, (batch, prompt_len), device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def run():
        with autocast:
            model.generate(prompts, new_tokens, pad_id=model.config.vocab_size - 1, eos_id=None, generator=g,
                           use_cache=use_cache)

    return batch * new_tokens / timed(run, device, repeat)


# model FLOPs of one PPO iteration (forward = 2 FLOPs per weight per token; backward = 2 × forward; attention
# 4·L·C per token and per position it reads), at the fixed setting: what a perfect implementation must compute
def ppo_iteration_flops(cfg, B=64, Tp=16, Tn=48, epochs=4):
    L, C, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
    trunk = 2 * 12 * L * C * C                    # per token: attention and MLP projections
    head = 2 * V * C                              # per token that needs the vocabulary
    S = Tp + Tn
    gen = B * (Tp * (trunk + 2 * L * C * Tp) + sum(trunk + 4 * L * C * (Tp + t) + head for t in range(Tn)))
    seq = B * (S * trunk + 2 * L * C * S * S)     # one full forward of the batch's sequences (causal attention)
    score = 2 * (seq + B * Tn * head) + 2 * seq   # policy and reference (with the head), critic and reward model
    update = epochs * 3 * (2 * seq + B * Tn * head)  # policy (with the head) and critic, forward + backward
    return {"rollout": gen + score, "update": update}


def cpu_peak_gflops(threads, sizes=(1024, 2048), seconds=1.0):
    """The machine's attainable fp32 matmul rate (GFLOP/s), measured as ../shared/bench-trl/cpu_peak.py does: the
    best over square sizes of samples of at least 50 ms of n×n @ n×n products into a preallocated output."""
    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        for _ in range(3):  # warm-up
            torch.mm(a, b, out=c)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        reps = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-6)))  # products per sample: one sample >= ~50 ms
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def bench_ppo(device, iters, attn_impl="sdpa", vocab=512):
    """PPO iterations at the PPO issue's fixed setting, through the same rollout() and update() as train_ppo.py:
    GPT-2 architecture 4 layers / 4 heads / n_embd 128 / vocab 512 / block 256; 64 prompts of 16 tokens; exactly
    48 new tokens; 4 epochs x 4 minibatches; a separate critic; fp32. Random weights: the work is the same.
    vocab: 512 (the PPO issue's setting) or GPT-2's 50,257 (where the LM head dominates)."""
    from types import SimpleNamespace
    import train_ppo
    from model import GPTScalar
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=vocab, block_size=256, attn_impl=attn_impl)
    policy, ref, critic, rm = GPT(cfg).to(device), GPT(cfg).to(device), GPTScalar(cfg).to(device), GPTScalar(cfg).to(device)
    ref.eval().requires_grad_(False)
    rm.eval().requires_grad_(False)
    # pad and EOS outside the vocabulary, as in the reference harness: no sampled token ends a response, so every
    # response is exactly 48 real tokens on both sides (with EOS at id V−2, the random network sampled it: at vocab
    # 512 only 2,985 of the 3,072 response tokens were real, and the attention took the padded-mask path)
    tok = SimpleNamespace(pad_id=vocab, eos_id=vocab + 1)
    args = SimpleNamespace(response_length=48, temperature=1.0, ppo_epochs=4, num_minibatches=4, cliprange=0.2,
                           cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=0, grad_clip=1.0,
                           policy_loss="clip", ptx_coef=0.0, missing_eos_penalty=-1.0, algo="ppo", group_size=1)
    opt_p = policy.configure_optimizers(0.0, 1e-5, (0.9, 0.999), 1e-5, device)
    opt_c = GPT.configure_optimizers(critic, 0.0, 1e-5, (0.9, 0.999), 1e-5, device)
    gen = torch.Generator(device=device).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, vocab - 2, (64, 16), generator=cpu_gen).tolist()
    dtype = "bfloat16" if device == "cuda" else "float32"
    rollout_s, update_s = [], []
    import gc
    gc.collect()
    gc.freeze()
    for i in range(iters + 1):
        sync(device)
        t0 = time.perf_counter()
        batch = train_ppo.rollout(policy, ref, critic, rm, 0.0, 1.0, tok, prompts, args, 0.05, gen, device, dtype,
                                  stop_at_eos=False)
        sync(device)
        t1 = time.perf_counter()
        train_ppo.update(policy, critic, opt_p, opt_c, batch, args, device, dtype, cpu_gen, 0.1)
        sync(device)
        t2 = time.perf_counter()
        if i > 0:  # the first iteration warms up allocators and kernels
            rollout_s.append(t1 - t0)
            update_s.append(t2 - t1)
    total = [a + b for a, b in zip(rollout_s, update_s)]
    flops = ppo_iteration_flops(cfg)
    return {"ppo_vocab": vocab, "ppo_iter_seconds": round(statistics.median(total), 3),
            "ppo_model_gflop": round((flops["rollout"] + flops["update"]) / 1e9, 1),
            "ppo_rollout_seconds": round(statistics.median(rollout_s), 3),
            "ppo_update_seconds": round(statistics.median(update_s), 3),
            "ppo_response_tokens": batch["n_tokens"]}  # real response tokens of the last rollout (64 × 48)


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main():
    p = C.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=sorted(CONFIGS), help="named model size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=C.count(), default=2, help="torch CPU threads (the target machine has 2 cores)")
    p.add_argument("--repeat", type=C.count(), default=3, help="timed repetitions (median reported)")
    p.add_argument("--train_batch", type=C.count(), default=16, help="sequences per timed training step")
    p.add_argument("--train_seq", type=C.count(), default=256, help="tokens per training sequence")
    p.add_argument("--model", type=C.flag01, default=1, help="1: time training and sampling")
    p.add_argument("--hf", type=C.flag01, default=0, help="1: also time Hugging Face generate on the same weights "
                   "(needs transformers)")
    p.add_argument("--ppo", type=C.flag01, default=1, help="1: time PPO iterations at the PPO issue's fixed setting")
    p.add_argument("--attn_impl", default="sdpa", choices=["sdpa", "explicit"], help="attention path of the PPO run")
    p.add_argument("--vocab", type=C.count(3), default=512, help="vocabulary of the PPO run: 512 (the PPO issue's "
                                                                 "setting) or 50257 (GPT-2's tokenizer)")
    p.add_argument("--ppo_iters", type=C.count(), default=5, help="timed PPO iterations (after one warm-up)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        C.fail("--device=cuda but no CUDA device is available (use --device=cpu)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                else torch.autocast("cpu", enabled=False))

    result = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({args.threads} threads)",
              "config": args.config, "torch": torch.__version__}
    if args.model:
        cfg = {**CONFIGS[args.config], **({"vocab_size": args.vocab} if args.config == "small" else {})}
        model, hf = hf_twin(GPTConfig(**cfg), device) if args.hf else (GPT(GPTConfig(**cfg)).to(device), None)
        result["params"] = model.get_num_params()
        seq = min(args.train_seq, model.config.block_size)
        result["train_tokens_per_s"] = round(bench_train(model, device, args.train_batch, seq, args.repeat, autocast))
        print(f"train: {result['train_tokens_per_s']} tokens/s", file=sys.stderr)
        if device == "cuda":  # model-FLOPs utilisation of the training step against the GPU's bf16 peak
            peak = next((v for k, v in BF16_PEAK.items() if k in torch.cuda.get_device_name()), None)
            flops = model_flops_per_token(model.config, seq) * result["train_tokens_per_s"]
            result["train_mfu"] = round(flops / peak, 3) if peak else None
        for use_cache in (True, False):
            key = "sample_tokens_per_s_cache" if use_cache else "sample_tokens_per_s_nocache"
            result[key] = round(bench_sample(model, device, 64, 64, 128, use_cache, args.repeat, autocast))
            print(f"{key}: {result[key]}", file=sys.stderr)
        result["kv_cache_speedup"] = round(result["sample_tokens_per_s_cache"] / result["sample_tokens_per_s_nocache"], 2)
        if hf is not None:  # Hugging Face generate on the same weights, in the same run
            for use_cache in (True, False):
                key = "hf_sample_tokens_per_s_cache" if use_cache else "hf_sample_tokens_per_s_nocache"
                result[key] = round(bench_sample_hf(hf, device, 64, 64, 128, use_cache, args.repeat, autocast))
                print(f"{key}: {result[key]}", file=sys.stderr)
            result["sample_speedup_vs_hf_cache"] = round(result["sample_tokens_per_s_cache"]
                                                         / result["hf_sample_tokens_per_s_cache"], 2)
    if args.ppo:
        result.update(bench_ppo(device, args.ppo_iters, args.attn_impl, args.vocab))
        if device == "cpu":  # the FLOP floor: the iteration's model FLOPs at the machine's measured fp32 matmul rate
            peak = cpu_peak_gflops(args.threads)
            floor = result["ppo_model_gflop"] / peak
            result.update(cpu_peak_gflops=round(peak, 1), ppo_floor_seconds=round(floor, 3),
                          ppo_floor_fraction=round(floor / result["ppo_iter_seconds"], 3))
            print(f"ppo: FLOP floor {floor:.2f} s at {peak:.0f} GFLOP/s: {floor / result['ppo_iter_seconds']:.0%} of it "
                  f"achieved", file=sys.stderr)
        print(f"ppo: {result['ppo_iter_seconds']:.2f} s/iter (rollout {result['ppo_rollout_seconds']:.2f} s, "
              f"update {result['ppo_update_seconds']:.2f} s)", file=sys.stderr)
    result["peak_memory_mb"] = round(peak_memory_mb(device))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
