"""
Plumbing shared by the three training scripts (train_sft.py, train_rm.py, train_ppo.py): device and precision,
atomic checkpoints, the learning-rate schedule, run logs, the NaN guard, and the built-in task's data on first use.
No model code and no RL math lives here.
"""

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILTIN_DIR = os.path.join(ROOT, "data", "minichat")  # where the built-in task's files are generated
BUILTIN_VOCAB = 1024                                  # its trained BPE: 1022 byte-level tokens + EOS + PAD


def fail(msg):
    """Stop with a clear message and exit status 2, never a stack trace: for bad flags and bad inputs."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# device and precision


def get_device(requested="auto"):
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            fail(f"--device={requested} but no CUDA device is available (use --device=cpu)")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast(device, dtype):
    """bf16/fp16 autocast on CUDA when asked, plain fp32 elsewhere."""
    if device.startswith("cuda") and dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return nullcontext()


def init_distributed(args):
    """Under torchrun (RANK and WORLD_SIZE set), join PyTorch's process group: NCCL on CUDA (one GPU per process,
    LOCAL_RANK picks it), gloo on CPU. Returns (rank, world_size): (0, 1) for a plain run."""
    if "RANK" not in os.environ:
        return 0, 1
    import torch.distributed as dist
    use_cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if use_cuda:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def ddp(module, world, device):
    """DistributedDataParallel under torchrun (it averages the gradients during backward); the module otherwise."""
    if world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[device] if device.startswith("cuda") else None)


def all_reduce_mean(x, world):
    """Mean of a tensor over the processes (identity for a single process)."""
    if world == 1:
        return x
    import torch.distributed as dist
    x = x.clone()
    dist.all_reduce(x)
    return x / world


def barrier(world):
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def finish_distributed(world):
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


def start_run(args):
    """Device, precision, seeds and the run folder for a training script's parsed flags.
    Returns (device, dtype, path of the run's checkpoint)."""
    device = get_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    setup_torch(device, args.seed, args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    return device, dtype, os.path.join(args.out_dir, "ckpt.pt")


def setup_torch(device, seed, threads=0):
    torch.manual_seed(seed)
    random.seed(seed)
    if threads > 0:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and later
        torch.backends.cudnn.allow_tf32 = True


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, obj):
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, what="checkpoint"):
    if not os.path.isfile(path):
        fail(f"{what} {path} does not exist (run the previous stage first, or pass the right path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        fail(f"could not read {what} {path}: {e}")


def rng_state(*generators):
    """Every random-number state a run depends on, so a resumed run continues the same random streams."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, *generators):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_args(model):
    return asdict(model.config)


# ----------------------------------------------------------------------------------------------------------------
# schedule, logging, guards


def lr_at(it, max_iters, lr, min_lr, warmup_iters, decay="cosine"):
    """Linear warmup for `warmup_iters`, then cosine (or linear) decay from lr to min_lr at max_iters."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    if decay == "constant" or max_iters <= warmup_iters:
        return lr
    frac = min(1.0, (it - warmup_iters) / (max_iters - warmup_iters))
    if decay == "linear":
        return lr + frac * (min_lr - lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (lr - min_lr)


def check_finite(value, what, step, ckpt_path):
    """NaN or inf stops the run loudly; the last good checkpoint is left untouched."""
    if not math.isfinite(value):
        kept = f"the last good checkpoint is kept at {ckpt_path}" if os.path.exists(ckpt_path) else \
            "no checkpoint was written yet"
        fail(f"{what} is {value} at step {step}: stopping ({kept}). Try a lower learning rate or --grad_clip.")


class RunLog:
    """One printed line per step with stable keys, the same numbers as JSON lines in <out_dir>/log.jsonl."""

    def __init__(self, out_dir, resume_step=None, name="log.jsonl"):
        self.path = os.path.join(out_dir, name)
        os.makedirs(out_dir, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        else:  # keep the lines up to the checkpoint; what came after it is redone
            rows = []
            if os.path.exists(self.path):
                with open(self.path) as f:
                    rows = [line for line in f if json.loads(line).get("step", 0) < resume_step]
            with open(self.path, "w") as f:
                f.writelines(rows)
        self.t0 = time.time()

    def log(self, row, fmt=None):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if fmt is not None:
            print(fmt, flush=True)


def eta(start_time, done, total):
    if done <= 0:
        return "?"
    s = (time.time() - start_time) / done * (total - done)
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# the built-in task


def prepare_builtin(out_dir=None, seed=0, quiet=False):
    """Generate the built-in task's files and train its BPE on first use; later calls just return the paths."""
    out_dir = out_dir or BUILTIN_DIR
    from data import minichat
    from tokenizer import Tokenizer
    paths = {k: os.path.join(out_dir, f) for k, f in [
        ("sft_train", "sft_train.jsonl"), ("sft_val", "sft_val.jsonl"), ("prompts_train", "prompts_train.jsonl"),
        ("prompts_val", "prompts_val.jsonl"), ("corpus", "corpus.txt"), ("tokenizer", "tokenizer.json")]}
    meta_path, want = os.path.join(out_dir, "meta.json"), minichat.generation_settings(seed=seed)
    have = None
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            have = json.load(f)
    if have != want or not all(os.path.exists(p) for k, p in paths.items() if k != "tokenizer"):
        if not quiet:  # missing, incomplete, or made with other settings (an older version of the task)
            print(f"generating the built-in task's data in {out_dir} ...", flush=True)
        if os.path.exists(paths["tokenizer"]):
            os.remove(paths["tokenizer"])  # trained on the old corpus
        minichat.generate_all(out_dir, seed=seed)
    if not os.path.exists(paths["tokenizer"]):
        with open(paths["corpus"], encoding="utf-8") as f:
            text = f.read()
        t0 = time.time()
        tok = Tokenizer.train(text, BUILTIN_VOCAB, name="minichat")
        tok.save(paths["tokenizer"])
        if not quiet:
            print(f"trained a {BUILTIN_VOCAB}-token BPE on {len(text):,} characters in {time.time() - t0:.1f}s", flush=True)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# sampling text from a policy (evaluation, comparison collection, reports)


def decode_response(tok, tokens, mask):
    """One sampled response (1-D tokens and mask) -> (text, ended_with_eos). The chat template puts a space
    before the assistant's words, so one leading space is dropped."""
    ids = [int(t) for t, m in zip(tokens.tolist(), mask.tolist()) if m]
    eos = len(ids) > 0 and ids[-1] == tok.eos_id
    text = tok.decode(ids[:-1] if eos else ids)
    return (text[1:] if text.startswith(" ") else text), eos


@torch.no_grad()
def sample_texts(model, tok, prompts, max_new_tokens, generator, temperature=1.0, batch_size=64, top_k=None,
                 top_p=None, device="cpu", dtype="float32"):
    """Prompts (lists of token ids) -> list of (text, ended_with_eos), sampled in batches with the KV cache."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        with autocast(device, dtype):
            s = model.generate(prompts[i:i + batch_size], max_new_tokens, pad_id=tok.pad_id, eos_id=tok.eos_id,
                               temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        out += [decode_response(tok, r, m) for r, m in zip(s.responses.cpu(), s.response_mask.cpu())]
    model.train(was_training)
    return out


def show_samples(requests, samples, n):
    """Print the first n (request, (text, eos)) pairs, as every stage does at its evaluations."""
    for request, (text, eos) in list(zip(requests, samples))[:n]:
        print(f"  > {request}\n  < {text}{' <EOS>' if eos else ' <no EOS>'}")


def gold_report(requests, samples):
    """The built-in task's headline figures for a list of sampled (text, eos): gold mean/std, share well formed."""
    from data import minichat
    golds = [minichat.gold(r, text, eos) for r, (text, eos) in zip(requests, samples)]
    mean = sum(golds) / len(golds)
    std = (sum((g - mean) ** 2 for g in golds) / len(golds)) ** 0.5
    wf = sum(minichat.well_formed(text, eos) for text, eos in samples) / len(samples)
    return {"gold_mean": mean, "gold_std": std, "well_formed": wf, "golds": golds}
