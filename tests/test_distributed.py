"""DDP through torchrun on CPU (gloo): a 2-process SFT run equals a 1-process run with the same global batch."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--max_iters=6", "--learning_rate=1e-2", "--warmup_iters=1", "--eval_interval=100", "--eval_iters=1", "--n_eval_prompts=4", "--max_new_tokens=8",
         "--n_layer=1", "--n_head=2", "--n_embd=32", "--threads=1", "--n_show=0", "--device=cpu"]


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def step_losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if "loss" in r], [r["step"] for r in rows if "loss" in r]


def test_two_process_sft_matches_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run([sys.executable, "train_sft.py", *FLAGS, "--batch_size=8", f"--out_dir={one}"])
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_sft.py",
               *FLAGS, "--batch_size=4", f"--out_dir={two}"])
    a, steps_a = step_losses(one)
    b, steps_b = step_losses(two)
    assert steps_a == steps_b == list(range(6)), "rank 0 alone writes the log: one row per step"
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert "2 processes, 4 sequences each" in out.stdout
    assert os.path.exists(os.path.join(two, "summary.json")) and os.path.exists(os.path.join(two, "ckpt.pt"))


def write_comparisons(tmp_path):
    """train.jsonl (32 prompts) and val.jsonl (8): K = 3 crowd answers per prompt, ranked by the noisy labeler."""
    import random

    from data import minichat
    from data.formats import write_jsonl
    rng = random.Random(0)
    rows = []
    for request in minichat.sample_prompts(40, 0):
        responses = [minichat.write_demo(request, rng) for _ in range(3)]
        rows.append({"prompt": request, "responses": responses, "ranking": minichat.rank(request, responses, rng)})
    write_jsonl(str(tmp_path / "train.jsonl"), rows[:32])
    write_jsonl(str(tmp_path / "val.jsonl"), rows[32:])


def test_two_process_reward_model_matches_one_process(tmp_path):
    sft = str(tmp_path / "sft")
    run([sys.executable, "train_sft.py", *FLAGS, "--batch_size=8", f"--out_dir={sft}"])
    write_comparisons(tmp_path)
    flags = [f"--init_from={sft}/ckpt.pt", f"--data={tmp_path}/train.jsonl", f"--val_data={tmp_path}/val.jsonl",
             "--epochs=2", "--n_norm=0", "--eval_interval=100", "--threads=1", "--device=cpu", "--learning_rate=1e-2",
             "--warmup_iters=1"]
    one, two = str(tmp_path / "rm1"), str(tmp_path / "rm2")
    run([sys.executable, "train_rm.py", *flags, "--batch_size=8", f"--out_dir={one}"])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_rm.py", *flags,
         "--batch_size=4", f"--out_dir={two}"])
    a, steps_a = step_losses(one)
    b, steps_b = step_losses(two)
    assert steps_a == steps_b == list(range(8)), (steps_a, steps_b)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    with open(os.path.join(one, "log.jsonl")) as f1, open(os.path.join(two, "log.jsonl")) as f2:
        acc1 = [json.loads(line)["accuracy"] for line in f1 if '"accuracy"' in line]
        acc2 = [json.loads(line)["accuracy"] for line in f2 if '"accuracy"' in line]
    assert acc1 == acc2, "the logged accuracy is the all-reduced one"


def test_two_process_ppo_resume_and_its_kl_controller(tmp_path):
    """2-process PPO: a run stopped and resumed equals the uninterrupted one bit for bit (each process saves and
    restores its own random streams: with rank 0's streams restored everywhere, both processes would sample the same
    prompts and responses after the resume), and the adaptive controller counts the global batch's episodes.

    A 2-process run cannot equal a 1-process run with the same global batch here: each process samples its
    responses from its own generator (seed + rank), so the two runs draw different tokens from the first iteration
    on (the rollouts' mean length and entropy differ); the optimisation of a fixed batch is what DDP shares, and the
    SFT and RM tests above pin that."""
    sft, rm = str(tmp_path / "sft"), str(tmp_path / "rm")
    run([sys.executable, "train_sft.py", *FLAGS, "--batch_size=8", f"--out_dir={sft}"])
    write_comparisons(tmp_path)
    run([sys.executable, "train_rm.py", f"--init_from={sft}/ckpt.pt", f"--data={tmp_path}/train.jsonl",
         f"--val_data={tmp_path}/val.jsonl", "--batch_size=8", "--n_norm=0", "--threads=1", "--device=cpu",
         f"--out_dir={rm}"])
    flags = [f"--init_from={sft}/ckpt.pt", f"--reward_model={rm}/ckpt.pt", "--iters=4", "--batch_size=4",
             "--num_minibatches=2", "--ppo_epochs=1", "--response_length=12", "--n_eval_prompts=4",
             "--eval_interval=2", "--threads=1", "--device=cpu", "--kl_horizon=20", "--target_kl=0.5"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ppo.py"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(torchrun + flags + [f"--out_dir={a}"])
    run(torchrun + flags + [f"--out_dir={b}", "--stop_after=2"])
    run(torchrun + flags + [f"--out_dir={b}", "--resume=1"])

    def rows(d, name="log.jsonl"):
        with open(os.path.join(d, name)) as f:
            return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "tokens_per_s"))}
                    for line in f]
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [0, 1, 2, 3]
    assert ra == rb, "the resumed 2-process run differs from the uninterrupted one"
    r1 = rows(b, "log_rank1.jsonl")
    assert [r["step"] for r in r1] == [2, 3] and r1 == rows(a, "log_rank1.jsonl")[2:], "rank 1 lost its own streams"
    # the controller: β_{t+1} = β_t (1 + clip(KL_t / target − 1, ±0.2) · n / horizon), n = 2 processes × 4 prompts
    for prev, nxt in zip(ra, ra[1:]):
        e = min(max(prev["objective/kl"] / 0.5 - 1, -0.2), 0.2)
        want = prev["objective/kl_coef"] * (1 + e * 8 / 20)
        assert abs(nxt["objective/kl_coef"] - want) < 1e-12, (prev["step"], nxt["objective/kl_coef"], want)
    assert any(abs(r["objective/kl"] / 0.5 - 1) > 1e-3 for r in ra)  # β really moved
    assert os.path.exists(os.path.join(b, "summary.json"))


def test_two_process_dpo_matches_one_process(tmp_path):
    """DPO under torchrun: each process scores its share of the global batch of prompts (all K answers of a prompt
    together), DDP averages the gradients; the per-step losses and the logged pair accuracy equal a 1-process run
    with the same global batch."""
    sft = str(tmp_path / "sft")
    run([sys.executable, "train_sft.py", *FLAGS, "--batch_size=8", f"--out_dir={sft}"])
    write_comparisons(tmp_path)
    flags = [f"--init_from={sft}/ckpt.pt", f"--data={tmp_path}/train.jsonl", f"--val_data={tmp_path}/val.jsonl",
             "--reward_model=", "--epochs=2", "--eval_interval=100", "--threads=1", "--device=cpu",
             "--learning_rate=1e-2", "--warmup_iters=1", "--beta=0.5"]
    one, two = str(tmp_path / "dpo1"), str(tmp_path / "dpo2")
    run([sys.executable, "train_dpo.py", *flags, "--batch_size=8", f"--out_dir={one}"])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_dpo.py", *flags,
         "--batch_size=4", f"--out_dir={two}"])
    a, steps_a = step_losses(one)
    b, steps_b = step_losses(two)
    assert steps_a == steps_b == list(range(8)), (steps_a, steps_b)
    assert abs(a[0] - 0.6931472) < 1e-5 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert len(set(a)) > 4, "the loss never moved: the comparison would be empty"
    with open(os.path.join(one, "log.jsonl")) as f1, open(os.path.join(two, "log.jsonl")) as f2:
        acc1 = [json.loads(line)["accuracy"] for line in f1 if '"accuracy"' in line]
        acc2 = [json.loads(line)["accuracy"] for line in f2 if '"accuracy"' in line]
    assert acc1 == acc2, "the logged accuracy is the all-reduced one"
