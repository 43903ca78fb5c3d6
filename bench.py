"""
Speed benchmark. Prints progress, then as its LAST line one JSON object that other tools read:

  device, config, train_tokens_per_s (forward + backward + AdamW step), sample_tokens_per_s_cache and
  sample_tokens_per_s_nocache (batch 64, 64-token prompts, 128 new tokens, pure sampling with no early stop),
  kv_cache_speedup and peak memory.

Numbers are medians of repeated timings; the machines are shared and noisy, so compare runs side by side.

  python bench.py                      # CPU, the built-in task's small config, 2 threads
  python bench.py --device=cuda --config=gpt2
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

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


def bench_sample(model, device, batch, prompt_len, new_tokens, use_cache, repeat, autocast):
    model.eval()
    prompts = torch.randint(0, model.config.vocab_size - 2, (batch, prompt_len), device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def run():
        with autocast:
            model.generate(prompts, new_tokens, pad_id=model.config.vocab_size - 1, eos_id=None, generator=g,
                           use_cache=use_cache)

    return batch * new_tokens / timed(run, device, repeat)


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=sorted(CONFIGS), help="named model size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target machine has 2 cores)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--train_batch", type=int, default=16)
    p.add_argument("--train_seq", type=int, default=256)
    p.add_argument("--model", type=int, default=1, help="1: time training and sampling")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py: --device=cuda but torch.cuda.is_available() is False")
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
        model = GPT(GPTConfig(**CONFIGS[args.config])).to(device)
        result["params"] = model.get_num_params()
        seq = min(args.train_seq, model.config.block_size)
        result["train_tokens_per_s"] = round(bench_train(model, device, args.train_batch, seq, args.repeat, autocast))
        print(f"train: {result['train_tokens_per_s']} tokens/s", file=sys.stderr)
        for use_cache in (True, False):
            key = "sample_tokens_per_s_cache" if use_cache else "sample_tokens_per_s_nocache"
            result[key] = round(bench_sample(model, device, 64, 64, 128, use_cache, args.repeat, autocast))
            print(f"{key}: {result[key]}", file=sys.stderr)
        result["kv_cache_speedup"] = round(result["sample_tokens_per_s_cache"] / result["sample_tokens_per_s_nocache"], 2)
    result["peak_memory_mb"] = round(peak_memory_mb(device))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
