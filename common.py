"""
Plumbing shared by the three training scripts (train_sft.py, train_rm.py, train_ppo.py): device and precision,
atomic checkpoints, the learning-rate schedule, run logs, the NaN guard, and the built-in task's data on first use.
No model code and no RL math lives here.
"""

import argparse
import json
import math
import os
import pickle
import random
import sys
import time
import warnings
from contextlib import nullcontext, suppress
from dataclasses import asdict

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILTIN_DIR = os.path.join(ROOT, "data", "minichat")  # where the built-in task's files are generated
BUILTIN_VOCAB = 1024                                  # its trained BPE: 1022 byte-level tokens + EOS + PAD


def fail(msg):
    """Stop with a clear message and exit status 2, never a stack trace: for bad flags and bad inputs."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: one line "error: ..." and exit status 2, no usage dump."""

    def error(self, message):
        fail(message)


def number(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: `kind` (int or float) within [lo, hi] (open ends with lo_open / hi_open); a value out of
    range is refused as "argument --flag: must be ...". Every numeric flag of every script says its range here."""
    lo_s, hi_s = (">" if lo_open else "≥"), ("<" if hi_open else "≤")
    want = " and ".join([f"{lo_s} {lo}"] * (lo is not None) + [f"{hi_s} {hi}"] * (hi is not None))
    noun = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}{' ' + want if want else ''}, got {text!r}")
        if kind is float and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (lo is not None and (x <= lo if lo_open else x < lo)) or (hi is not None and (x >= hi if hi_open else x > hi)):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return x
    parse.__name__ = kind.__name__
    return parse


def count(lo=1):
    """An integer ≥ lo (sizes, counts, intervals: ≥ 1 unless 0 has a meaning the help text gives)."""
    return number(int, lo)


positive = number(float, 0, lo_open=True)  # learning rates, temperatures, ε's: > 0
nonneg = number(float, 0)                  # coefficients whose 0 means "off": ≥ 0
unit = number(float, 0, 1)                 # γ, λ, fractions: in [0, 1]
flag01 = number(int, 0, 1)                 # booleans as 0/1


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
    """bf16 autocast when asked (on CUDA, and on CPU whose autocast supports bf16 too), plain fp32 otherwise.
    Weights stay fp32 under autocast; every network that is compared with another (policy and reference) runs
    under the same autocast with the same weight dtype, so their log-probs agree bit for bit at equal weights."""
    if dtype == "bfloat16" and (device.startswith("cuda") or device == "cpu"):
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
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
    Returns (device, dtype, path of the run's checkpoint). The folder must be writable (checked now, before any
    training), and a folder that already holds a run is only reused with --resume=1 or --overwrite=1."""
    device = get_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype == "float16":  # fp16 gradients underflow without a loss scaler, which these loops do not have
        fail("--dtype=float16 is not supported (no gradient scaler): use --dtype=bfloat16 or float32")
    setup_torch(device, args.seed, args.threads)
    check_out_dir(args)
    return device, dtype, os.path.join(args.out_dir, "ckpt.pt")


def check_out_dir(args):
    """--out_dir: creatable and writable, and not an earlier run's folder unless --resume=1 or --overwrite=1."""
    out = args.out_dir
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        fail(f"--out_dir={out} is not writable: {e.strerror or first_line(e)}")
    if "RANK" in os.environ and os.environ["RANK"] != "0":
        return  # under torchrun rank 0 decides; the other ranks may find the log it has just started
    found = [f for f in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(out, f))]
    if found and not args.resume and not args.overwrite:
        fail(f"--out_dir={out} already holds a run ({', '.join(found)}): pass --resume=1 to continue it, "
             "--overwrite=1 to start over in it, or another --out_dir")


def add_run_flags(a):
    """The flags every training script shares for its run folder and its continuation."""
    a("--resume", type=flag01, default=0, help="1: continue the run in --out_dir from its checkpoint")
    a("--overwrite", type=flag01, default=0, help="1: start over in an --out_dir that already holds a run (its "
                                                  "log starts afresh, its checkpoint is replaced at the first save)")
    a("--stop_after", type=count(0), default=0, help="stop after this many steps of this session (simulates a "
                                                    "kill; 0 = never)")


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
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint. A failed write
    (disk full, read-only folder) is one line naming the path; the previous checkpoint is left as it was and no
    temporary file is left behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError from its writer
        with suppress(OSError):
            os.remove(tmp)
        kept = "the previous checkpoint is intact" if os.path.exists(path) else "no checkpoint was written"
        fail(f"could not write checkpoint {path}: {first_line(e)} ({kept})")


# What a checkpoint may hold: tensors, numbers, strings, None and lists/tuples/dicts of them. torch.load with
# weights_only=True refuses anything else (a pickled object would run its code while loading).
KINDS = {"sft": "an SFT model (train_sft.py)", "rm": "a reward model (train_rm.py)", "ppo": "a PPO policy (train_ppo.py)",
         "dpo": "a DPO policy (train_dpo.py)"}


def load_checkpoint(path, what="checkpoint", kinds=None, complete=False):
    """A checkpoint dict from `path`, loaded with weights_only=True: no code in the file can run.
    what: the flag it came from, for the messages. kinds: the stages ("sft", "rm", "ppo") it may be.
    complete: it must be a finished run's (a reward model: trained and normalised), not an eval-time or
    --stop_after one. Every failure is one line naming the flag, the path, what was found and what was expected."""
    if not os.path.isfile(path):
        fail(f"{what} {path} does not exist (run the previous stage first, or pass the right path)")
    try:
        with warnings.catch_warnings():  # an unusual pickle protocol warns; the verdict below is what counts
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a foreign object in the pickle: refused before it is built
        why = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        fail(f"{what} {path}: refused to load: it holds objects other than tensors, numbers, strings, lists and "
             f"dicts, which could run code when loaded" + (f" ({why[0][:200]})" if why else ""))
    except Exception as e:  # a truncated or foreign file
        fail(f"could not read {what} {path}: {first_line(e)[:300]}")
    if not isinstance(ck, dict) or "stage" not in ck:
        fail(f"{what} {path}: not a checkpoint of train_sft.py, train_rm.py, train_ppo.py or train_dpo.py")
    stage = ck["stage"]
    if kinds is not None and stage not in kinds:
        fail(f"{what} {path} is {KINDS.get(stage, repr(stage))}, expected " + " or ".join(KINDS[k] for k in kinds))
    if complete and not is_complete(ck):
        fail(f"{what} {path} is an unfinished {stage} run's checkpoint (step {ck.get('iter')}"
             + (", written before its normalisation μ, σ was measured" if stage == "rm" else "")
             + "): finish it with --resume=1, or pass the final checkpoint")
    return ck


def load_reward_models(spec, what="--reward_model", device="cpu", how="mean", lam=1.0, tokenizer=None):
    """The frozen reward model(s) a policy is trained or judged against. spec: one checkpoint path, or several
    separated by commas: an ensemble (reward.Ensemble, each member normalised on its own SFT samples, then
    aggregated by `how`), whose μ, σ are 0, 1. tokenizer: the policy's, which every member must share.
    Returns (rm, μ, σ, the first member's checkpoint dict, which initialises PPO's critic)."""
    import reward
    paths = [p.strip() for p in spec.split(",")]
    if not all(paths):
        fail(f"{what}={spec}: an empty path in the comma-separated list")
    members, mus, sigmas, first = [], [], [], None
    for path in paths:
        ck = load_checkpoint(path, what, kinds=("rm",), complete=True)
        if not ck.get("normalised", True):
            print(f"note: {what} {path} was trained with --n_norm=0: its scores are used raw (μ = 0, σ = 1), so β "
                  "does not have its usual scale" + (" and the ensemble's members need not share one" if
                                                     len(paths) > 1 else ""))
        if tokenizer is not None and ck.get("tokenizer") != tokenizer:
            fail(f"{what} {path} was trained with another tokenizer than the policy's")
        rm, mu, sigma = reward.load_reward_model(ck, device)
        members.append(rm), mus.append(mu), sigmas.append(sigma)
        first = first or ck
    if len(members) == 1:
        return members[0], mus[0], sigmas[0], first
    return reward.Ensemble(members, mus, sigmas, how, lam).to(device), 0.0, 1.0, first


def is_complete(ck):
    """Whether a checkpoint is a finished run's. Checkpoints from before this flag existed: a reward model is
    finished when it holds its normalisation."""
    return ck.get("complete", "mu" in ck if ck.get("stage") == "rm" else True)


def first_line(e):
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def rng_states_of_all_ranks(world, *generators):
    """Every process's rng_state, gathered (one list, rank order) so that rank 0 can save them all: under torchrun
    each process samples its own prompts and responses, and a resumed run must continue each stream."""
    state = rng_state(*generators)
    if world == 1:
        return [state]
    import torch.distributed as dist
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


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
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    lines = f.readlines()
                for n, line in enumerate(lines, start=1):
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        if n == len(lines):  # a kill between write and flush tears the last line: drop it
                            print(f"note: {self.path}:{n}: dropped a torn last line")
                            break
                        fail(f"{self.path}:{n}: not a JSON line; the log is damaged (move it away to resume)")
                    if row.get("step", 0) < resume_step:
                        rows.append(line if line.endswith("\n") else line + "\n")
            with open(self.path, "w") as f:
                f.writelines(rows)
        self.t0 = time.time()

    def log(self, row, fmt=None):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            fail(f"could not write {self.path}: {e.strerror or first_line(e)}")
        if fmt is not None:
            print(fmt, flush=True)


def peak_memory_mb(device):
    """The process's peak memory: the CUDA allocator's on a GPU, the resident set elsewhere (Linux reports KiB)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def eta(start_time, done, total):
    if done <= 0:
        return "?"
    s = (time.time() - start_time) / done * (total - done)
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def write_json(path, obj):
    """Atomically, like the checkpoints; a failed write is one line naming the path."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            os.remove(tmp)
        fail(f"could not write {path}: {e.strerror or first_line(e)}")


# ----------------------------------------------------------------------------------------------------------------
# SFT conversations as batches (train_sft.py, and the PPO-ptx text of train_ppo.py)


class ChatData:
    """Rendered conversations: token ids and the mask of the assistant tokens to learn from (EOS included).
    Batches are right-padded; the padding comes after every real token, so the causal mask already keeps it out
    of sight, and its targets are −1 (ignored). To waste little compute on padding, each group of `bucket`
    batches is drawn at random and then split by length (a bucketing sampler)."""

    bucket = 8

    def __init__(self, conversations, tok, block_size, where):
        from collections import Counter

        from tokenizer import render_chat
        self.examples = []
        cuts = Counter()
        for messages in conversations:
            ids, mask = render_chat(tok, messages, max_tokens=block_size + 1, cuts=cuts)
            if sum(mask[1:]) > 0:
                self.examples.append((ids, mask))
        report_cuts(where, cuts, len(conversations), block_size + 1)
        if len(self.examples) < len(conversations):
            print(f"note: {where}: {len(conversations) - len(self.examples)} conversations dropped: nothing of an "
                  f"assistant turn is left to learn from within {block_size + 1} tokens")
        if not self.examples:
            fail(f"{where}: no conversation with an assistant turn to learn from")
        self.n_tokens = sum(len(ids) for ids, _ in self.examples)

    def batch(self, batch_size, step, seed, device):
        """The batch of training step `step`: a pure function of (seed, step), so a resumed run sees the same data."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step // self.bucket)
        pool = torch.randint(len(self.examples), (batch_size * self.bucket,), generator=g).tolist()
        pool.sort(key=lambda i: len(self.examples[i][0]))
        k = torch.randperm(self.bucket, generator=g)[step % self.bucket].item()  # the group's batches in random order
        return self.collate([self.examples[i] for i in pool[k * batch_size:(k + 1) * batch_size]], device)

    @staticmethod
    def collate(rows, device):
        T = max(len(ids) for ids, _ in rows) - 1
        x = torch.zeros(len(rows), T, dtype=torch.long)                                    # (B, T)
        y = torch.full((len(rows), T), -1, dtype=torch.long)                               # (B, T)
        for i, (ids, mask) in enumerate(rows):
            ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
            n = len(ids) - 1
            x[i, :n] = ids_t[:-1]
            y[i, :n] = torch.where(mask_t[1:], ids_t[1:], -1)  # learn token t+1 only where it is the assistant's
        return x.to(device), y.to(device)


# ----------------------------------------------------------------------------------------------------------------
# ranked comparisons as batches (train_rm.py, and DPO's pairs in train_dpo.py), and their held-out accuracy


def drop_ties(items, where):
    """A response that is the same text as a better-ranked one carries no preference (its pairs only add ln 2 to
    the loss and count as errors in the accuracy): it is dropped, and so is a prompt left with fewer than 2."""
    out, dup = [], 0
    for it in items:
        seen = []
        for r in it["responses"]:  # best first: the first copy keeps its rank
            if r in seen:
                dup += 1
            else:
                seen.append(r)
        if len(seen) >= 2:
            out.append({**it, "responses": seen})
    if dup:
        print(f"note: {where}: {dup} responses were the same text as a better-ranked one and were dropped "
              f"({len(items) - len(out)} prompts left without a pair)")
    if not out:
        fail(f"{where}: no comparison left with two different responses")
    return out


class Comparisons:
    """Each item: K token sequences (prompt + response + EOS), best first. A batch flattens the items' responses
    into one right-padded (ΣK, T) tensor, so the whole batch goes through the model in one forward pass."""

    def __init__(self, items, tok, max_tokens, where):
        from collections import Counter

        from tokenizer import render_chat
        self.items, self.learn = [], []  # token ids, and 1 on each response's own tokens (its EOS included)
        cuts = Counter()
        for it in items:
            rendered = [render_chat(tok, it["prompt"] + [{"role": "assistant", "content": r}], max_tokens, cuts)
                        for r in it["responses"]]
            self.items.append([ids for ids, _ in rendered])
            self.learn.append([m for _, m in rendered])
        report_cuts(where, cuts, sum(len(s) for s in self.items), max_tokens)
        if not self.items:
            fail(f"{where}: no comparisons")
        self.n_pairs = sum(math.comb(len(s), 2) for s in self.items)
        self.lengths = torch.tensor([max(len(seq) for seq in seqs) for seqs in self.items])  # padded length per item

    def epoch_order(self, batch, generator, group=32):
        """A random order of the items in which each batch holds items of similar length, so that little of the
        batch is padding (on the built-in task, random batches are ~45% padding). A random permutation is cut into
        chunks of `group` batches; each chunk is sorted by length, cut into batches, and those batches shuffled.
        Which items share a chunk, and the order of the batches, stay random."""
        perm = torch.randperm(len(self.items), generator=generator)                    # (N,)
        chunks = []
        for c in range(0, len(perm), group * batch):
            chunk = perm[c:c + group * batch]
            chunk = chunk[torch.sort(self.lengths[chunk], stable=True).indices]        # short to long
            batches = list(chunk.split(batch))
            full = [b for b in batches if len(b) == batch]  # a short last batch stays last, so batches stay aligned
            chunks += [full[i] for i in torch.randperm(len(full), generator=generator).tolist()] + batches[len(full):]
        return torch.cat(chunks)                                                       # (N,)

    def batch(self, idx, device):
        """(x, mask, k, where, learn): the items' responses flattened into (ΣK, T) right-padded ids and mask, each
        item's K, the (N, K) row of each response (−1 for padding), and the (ΣK, T) mask of response tokens."""
        from model import right_pad
        rows = [self.items[int(i)] for i in idx]
        K = max(len(r) for r in rows)
        seqs = [s for r in rows for s in r]
        x, mask = right_pad(seqs)                                                       # (ΣK, T) each
        learn, _ = right_pad([m for i in idx for m in self.learn[int(i)]], pad_id=0)    # (ΣK, T)
        k = torch.tensor([len(r) for r in rows])                                        # (N,)
        where = torch.full((len(rows), K), -1, dtype=torch.long)                        # (N, K) row of each response
        n = 0
        for i, r in enumerate(rows):
            where[i, :len(r)] = torch.arange(n, n + len(r))
            n += len(r)
        return x.to(device), mask.to(device), k.to(device), where.to(device), learn.bool().to(device)


@torch.no_grad()
def ranking_accuracy(scores_fn, val, batch_size, device, raw_val=None, by_term=False):
    """scores_fn(batch) -> ((N, K) scores, (N,) K): any scorer of Comparisons batches (a reward model, or DPO's
    implicit reward). Held-out pairwise accuracy against the labels; on the built-in task also against gold, on pairs whose
    gold scores differ, and the noisy labeler's own agreement with gold on those pairs (the ceiling).
    by_term: also the gold accuracy on the pairs where each term of the gold formula differs (what the reward
    model has learned: {term: {"accuracy", "pairs"}})."""
    import reward
    right = total = 0
    gold_right = gold_total = label_agree = 0
    term_right, term_total = {}, {}
    for s in range(0, len(val.items), batch_size):
        idx = list(range(s, min(s + batch_size, len(val.items))))
        r, k = scores_fn(val.batch(idx, device))
        a, b = reward.pair_accuracy(r, k)
        right, total = right + a, total + b
        if raw_val is not None:
            from data import minichat
            for row, i in enumerate(idx):
                item = raw_val[i]
                golds = [minichat.gold(item["request"], resp) for resp in item["responses"]]
                terms = [minichat.gold_terms(item["request"], resp) for resp in item["responses"]]
                for p, q in reward.all_pairs(len(golds)):  # p ranked above q by the noisy labeler
                    if golds[p] == golds[q]:
                        continue
                    ok = (r[row, p] > r[row, q]).item() == (golds[p] > golds[q])
                    gold_total += 1
                    label_agree += golds[p] > golds[q]
                    gold_right += ok
                    for t in set(terms[p]) | set(terms[q]):
                        if terms[p].get(t, 0) != terms[q].get(t, 0):
                            term_right[t] = term_right.get(t, 0) + ok
                            term_total[t] = term_total.get(t, 0) + 1
    out = {"val_accuracy": right / max(total, 1)}
    if raw_val is not None:
        out["val_accuracy_gold"] = gold_right / max(gold_total, 1)
        out["labeler_agreement"] = label_agree / max(gold_total, 1)
        if by_term:
            out["val_accuracy_gold_by_term"] = {t: {"accuracy": term_right[t] / n, "pairs": n}
                                                for t, n in sorted(term_total.items(), key=lambda kv: -kv[1])}
    return out


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


def report_cuts(where, cuts, n, max_tokens):
    """Say once what render_chat shortened (its `cuts` Counter) out of n conversations of `where`."""
    if cuts["turns_dropped"] or cuts["cut"]:
        print(f"note: {where}: conversations longer than {max_tokens} tokens: {cuts['turns_dropped']} oldest turns "
              f"dropped, {cuts['cut']} of {n} cut to their last {max_tokens} tokens (the start of the prompt lost)")


@torch.no_grad()
def sample_responses(policy, tok, prompts, max_new_tokens, temperature, generator, device, dtype, stop_at_eos=True):
    """Sample a batch of responses exactly as PPO's rollout does: left-padded prompts (lists of ids), KV-cached
    pure sampling from softmax(logits / T), each response cut after its first EOS. Returns a dict: tokens
    (B, Tp+Tn) and attn_mask (prompt + response), responses and response_mask (B, Tn), has_eos (B,), Tp, and the
    sampler's own log-probs (B, Tn). Normalisation, evaluation and the rollout all score these very ids."""
    import ppo
    with autocast(device, dtype):
        s = policy.generate(prompts, max_new_tokens, pad_id=tok.pad_id, eos_id=tok.eos_id if stop_at_eos else None,
                            temperature=temperature, generator=generator)
    Tp = s.prompt_mask.size(1)
    responses, response_mask, has_eos = ppo.truncate_at_eos(s.responses, tok.eos_id, tok.pad_id)  # (B, Tn)
    return {"tokens": torch.cat([s.tokens[:, :Tp], responses], 1),                      # (B, Tp+Tn)
            "attn_mask": torch.cat([s.prompt_mask.bool(), response_mask], 1),           # (B, Tp+Tn)
            "responses": responses, "response_mask": response_mask, "has_eos": has_eos, "Tp": Tp,
            "sampler_logprobs": s.logprobs * response_mask}                             # (B, Tn)


def response_logprobs(model, tokens, attn_mask, responses, response_mask, Tp, temperature, with_entropy=False):
    """log π(y_t | s_t) of each response token, from logits / T at positions Tp−1 … Tp+Tn−2 (the off-by-one of
    RLHF_DETAILS #5), 0 after the response's end. Only real response positions go through the vocabulary
    projection, a chunk at a time (model.head_logprobs): no (B, Tn, V) tensor is ever made."""
    h = model.hidden(tokens, attn_mask)[:, Tp - 1:-1]                                  # (B, Tn, C)
    from model import head_logprobs
    return head_logprobs(h, model.lm_head.weight, responses, temperature, with_entropy, mask=response_mask)


@torch.no_grad()
def evaluate_policy(policy, ref, rm, mu, sigma, tok, prompts, args, device, dtype, seed, builtin, n_show=0):
    """Proxy score (normalised RM, missing-EOS penalty; None without a reward model), KL to the SFT model (Σ k1 per response), length, EOS share,
    and on the built-in task the gold score, on a fixed set of held-out prompts with a fixed sampling seed."""
    import ppo
    import reward
    from tokenizer import render_prompt
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = {"score": [], "kl": [], "length": [], "eos": [], "texts": []}
    for s in range(0, len(prompts), 128):
        chunk = [render_prompt(tok, m, max_tokens=policy.config.block_size - args.response_length)
                 for m in prompts[s:s + 128]]
        b = sample_responses(policy, tok, chunk, args.response_length, args.temperature, gen, device, dtype)
        tokens, attn, responses, mask, has_eos, Tp = (
            b[k] for k in ("tokens", "attn_mask", "responses", "response_mask", "has_eos", "Tp"))
        with autocast(device, dtype):
            lp = response_logprobs(policy, tokens, attn, responses, mask, Tp, args.temperature)
            ref_lp = response_logprobs(ref, tokens, attn, responses, mask, Tp, args.temperature)
            raw = reward.score(rm, tokens, attn).float() if rm is not None else torch.zeros(len(chunk))
        rows["score"] += ppo.apply_missing_eos_penalty(reward.normalize(raw, mu or 0.0, sigma or 1.0), has_eos,
                                                       args.missing_eos_penalty).tolist()
        rows["kl"] += (ppo.kl_k1(lp, ref_lp) * mask).sum(1).tolist()
        rows["length"] += mask.sum(1).tolist()
        rows["eos"] += has_eos.tolist()
        rows["texts"] += [decode_response(tok, r, m) for r, m in zip(responses.cpu(), mask.cpu())]
    n = len(rows["score"])
    out = {"score": sum(rows["score"]) / n if rm is not None else None, "kl": sum(rows["kl"]) / n,
           "length": sum(rows["length"]) / n, "eos_share": sum(rows["eos"]) / n}
    if builtin:
        rep = gold_report([m[-1]["content"] for m in prompts], rows["texts"])
        out.update(gold=rep["gold_mean"], gold_std=rep["gold_std"], well_formed=rep["well_formed"])
    show_samples([m[-1]["content"] for m in prompts], rows["texts"], n_show)
    out["samples"] = [{"prompt": m[-1]["content"], "response": t, "eos": e} for m, (t, e) in zip(prompts, rows["texts"])]
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
