"""Bad input and faults, as a hostile but ordinary user meets them: every script, run as a subprocess with tiny
flags, must stop with exit status 2 and exactly one line on stderr, "error: ...", that names the flag or the file
and what was wrong; never a traceback. Also: a crafted checkpoint whose pickle runs code is refused and its code
never runs; SIGKILL at random moments (mid-save included) always leaves a loadable checkpoint and a bit-exact
resume; a full disk and a read-only --out_dir are one line each, with the previous checkpoint intact.

The cases share the session's tiny SFT -> RM -> PPO chain (conftest.py) and run two at a time.

    python -m pytest -q tests/test_bad_input.py
"""
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from runs import ROOT, SFT_TINY, load, read_jsonl, run_script, step_rows


class Payload:
    """A pickle that runs a shell command when it is loaded (weights_only=False would run it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(chain, tmp_path_factory):
    """The bad files of the matrix, next to the chain's good checkpoints."""
    d = tmp_path_factory.mktemp("bad_input")
    f = {"sft": chain["sft_ckpt"], "rm": chain["rm_ckpt"], "ppo": chain["ppo_ckpt"], "dir": str(d),
         "sft_dir": chain["sft"], "rm_dir": chain["rm"],
         "marker": str(d / "PAYLOAD_RAN")}
    torch.save({"stage": "sft", "model": Payload(f["marker"])}, d / "evil.pt")
    data = open(chain["sft_ckpt"], "rb").read()
    (d / "truncated.pt").write_bytes(data[:len(data) // 2])
    rm = load(chain["rm_ckpt"])  # the same reward model as an eval-time checkpoint: no normalisation yet
    rm.pop("mu"), rm.pop("sigma")
    rm["complete"] = False
    torch.save(rm, d / "rm_unfinished.pt")
    good_sft = json.dumps({"prompt": "Tell me about cats.", "response": "Cats are soft."})
    good_pref = json.dumps({"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."})
    (d / "latin1.jsonl").write_bytes(good_sft.encode() + b"\n" + '{"prompt": "caf\xe9", "response": "ok"}\n'
                                     .encode("latin-1"))
    (d / "latin1.txt").write_bytes("Les caf\xe9s de Paris.\n".encode("latin-1") * 50)
    gz = gzip.compress((good_sft + "\n").encode() * 200)
    (d / "corrupt.jsonl.gz").write_bytes(gz[:len(gz) // 2])
    (d / "binary.jsonl").write_bytes((bytes(range(128, 256)) + bytes(range(128))) * 8)
    (d / "nul.jsonl").write_bytes(b'{"prompt": "a\x00b"}\n')
    (d / "empty.jsonl").write_text("\n\n")
    (d / "one_sft.jsonl").write_text(good_sft + "\n")
    (d / "one_pref.jsonl").write_text(good_pref + "\n")
    (d / "ties.jsonl").write_text(json.dumps({"prompt": "Hi.", "chosen": "Hello.", "rejected": "Hello."}) + "\n" * 2
                                  + json.dumps({"prompt": "Yo.", "chosen": "Hey.", "rejected": "Hey."}) + "\n")
    (d / "prompts.bin").write_bytes(b"\xff\xfe\x00\x01" * 64)
    os.makedirs(d / "old_run")
    (d / "old_run" / "log.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    os.makedirs(d / "report_bad")
    (d / "report_bad" / "summary.json").write_text('{"val_loss": 0.5,')
    os.makedirs(d / "hh" / "helpful-base")
    (d / "hh" / "helpful-base" / "test.jsonl.gz").write_bytes(gz[:len(gz) // 3])
    return {**f, **{p.name.replace(".", "_"): str(p) for p in d.iterdir()}}


OUT = "--out_dir={dir}/out_{id}"
CASES = [
    # (id, script, flags, substrings the one error line must contain); {name} is a file of the fixture above
    # checkpoints: what they are, and what they may hold
    ("sft_evil_ckpt", "train_sft.py", ["--init_from={evil_pt}", OUT], ["--init_from", "{evil_pt}", "refused to load"]),
    ("ppo_evil_rm", "train_ppo.py", ["--reward_model={evil_pt}", "--init_from={sft}", OUT], ["--reward_model", "refused"]),
    ("sample_evil", "sample.py", ["--ckpt={evil_pt}", "--prompt=hi"], ["--ckpt", "{evil_pt}", "refused to load"]),
    ("sft_truncated_ckpt", "train_sft.py", ["--init_from={truncated_pt}", OUT], ["--init_from", "{truncated_pt}", "could not read"]),
    ("sft_from_rm", "train_sft.py", ["--init_from={rm}", OUT], ["--init_from", "{rm}", "is a reward model", "expected an SFT model"]),
    ("sft_from_ppo", "train_sft.py", ["--init_from={ppo}", OUT], ["--init_from", "{ppo}", "is a PPO policy", "expected an SFT"]),
    ("rm_from_rm", "train_rm.py", ["--init_from={rm}", OUT], ["--init_from", "{rm}", "is a reward model", "expected an SFT"]),
    ("ppo_policy_as_rm", "train_ppo.py", ["--init_from={sft}", "--reward_model={sft}", OUT],
     ["--reward_model", "{sft}", "is an SFT model", "expected a reward model"]),
    ("ppo_rm_as_policy", "train_ppo.py", ["--init_from={rm}", "--reward_model={rm}", OUT], ["--init_from", "is a reward model"]),
    ("ppo_ensemble_empty_member", "train_ppo.py", ["--init_from={sft}", "--reward_model={rm},", OUT],
     ["--reward_model", "empty path"]),
    ("ppo_ensemble_policy_member", "train_ppo.py", ["--init_from={sft}", "--reward_model={rm},{sft}", OUT],
     ["--reward_model", "{sft}", "is an SFT model"]),
    ("ppo_bad_aggregate", "train_ppo.py", ["--init_from={sft}", "--reward_model={rm},{rm}", "--rm_aggregate=median", OUT],
     ["--rm_aggregate", "median"]),
    ("ppo_unfinished_rm", "train_ppo.py", ["--init_from={sft}", "--reward_model={rm_unfinished_pt}", OUT],
     ["--reward_model", "{rm_unfinished_pt}", "unfinished", "normalisation"]),
    ("sample_unfinished_rm", "sample.py", ["--ckpt={rm_unfinished_pt}", "--prompt=hi", "--response=yo"], ["--ckpt", "unfinished"]),
    ("study_unfinished_rm", "study.py", ["--sft={sft}", "--rm={rm_unfinished_pt}", "--big_rm=0", OUT], ["reward model", "unfinished"]),
    ("sample_missing_ckpt", "sample.py", ["--ckpt=/nonexistent/ckpt.pt", "--prompt=hi"], ["/nonexistent/ckpt.pt", "does not exist"]),
    ("sft_tokenizer_mismatch", "train_sft.py", ["--init_from={sft}", "--tokenizer=gpt2", OUT],
     ["--tokenizer=gpt2", "{sft}", "not the tokenizer"]),
    ("ppo_resume_nothing", "train_ppo.py", ["--init_from={sft}", "--reward_model={rm}", "--resume=1", OUT], ["--resume", "does not exist"]),
    # the run folder
    ("sft_over_old_run", "train_sft.py", ["--out_dir={dir}/old_run"], ["--out_dir={dir}/old_run", "already holds a run",
                                                                       "--resume=1", "--overwrite=1"]),
    ("rm_collect_from_rm", "train_rm.py", ["--init_from={sft}", "--collect_from={rm}", OUT],
     ["--collect_from", "{rm}", "is a reward model"]),
    ("rm_collect_from_with_data", "train_rm.py", ["--init_from={sft}", "--collect_from={sft}", "--data={sft}", OUT],
     ["--collect_from", "--data"]),
    ("rm_no_prior_data", "train_rm.py", ["--init_from={sft}", "--prior_data={dir}/nope.jsonl", OUT],
     ["--prior_data", "nope.jsonl", "no such file"]),
    ("rm_zero_members", "train_rm.py", ["--init_from={sft}", "--members=0", OUT], ["argument --members"]),
    ("rm_over_old_run", "train_rm.py", ["--init_from={sft}", "--out_dir={dir}/old_run"], ["--out_dir", "already holds a run"]),
    ("ppo_over_old_run", "train_ppo.py", ["--init_from={sft}", "--reward_model={rm}", "--out_dir={dir}/old_run"],
     ["--out_dir", "already holds a run"]),
    # impossible flag values
    ("sft_negative_lr", "train_sft.py", ["--learning_rate=-1", OUT], ["argument --learning_rate", "> 0", "-1"]),
    ("sft_zero_batch", "train_sft.py", ["--batch_size=0", OUT], ["argument --batch_size", "≥ 1"]),
    ("sft_zero_eval_interval", "train_sft.py", ["--eval_interval=0", OUT], ["argument --eval_interval", "≥ 1"]),
    ("sft_not_a_number", "train_sft.py", ["--max_iters=ten", OUT], ["argument --max_iters", "integer", "'ten'"]),
    ("sft_nan_lr", "train_sft.py", ["--learning_rate=nan", OUT], ["argument --learning_rate", "finite"]),
    ("sft_heads", "train_sft.py", ["--n_embd=30", "--n_head=4", OUT], ["--n_embd=30", "--n_head=4", "divisible"]),
    ("sft_fp16", "train_sft.py", ["--dtype=float16", OUT], ["--dtype=float16", "not supported"]),
    ("sft_dropout_1", "train_sft.py", ["--dropout=1", OUT], ["argument --dropout", "< 1"]),
    ("rm_negative_epochs", "train_rm.py", ["--init_from={sft}", "--epochs=-1", OUT], ["argument --epochs", "> 0"]),
    ("rm_zero_lr", "train_rm.py", ["--init_from={sft}", "--learning_rate=0", OUT], ["argument --learning_rate", "> 0"]),
    ("rm_negative_n_norm", "train_rm.py", ["--init_from={sft}", "--n_norm=-5", OUT], ["argument --n_norm", "≥ 0"]),
    ("ppo_negative_target_kl", "train_ppo.py", ["--target_kl=-1", OUT], ["argument --target_kl", "≥ 0"]),
    ("ppo_negative_kl_coef", "train_ppo.py", ["--kl_coef=-0.1", OUT], ["argument --kl_coef", "≥ 0"]),
    ("ppo_zero_temperature", "train_ppo.py", ["--temperature=0", OUT], ["argument --temperature", "> 0"]),
    ("ppo_no_eval_prompts", "train_ppo.py", ["--n_eval_prompts=0", OUT], ["argument --n_eval_prompts", "≥ 1"]),
    ("ppo_gamma", "train_ppo.py", ["--gamma=2", OUT], ["argument --gamma", "≤ 1"]),
    ("ppo_zero_minibatches", "train_ppo.py", ["--num_minibatches=0", OUT], ["argument --num_minibatches", "≥ 1"]),
    ("sample_negative_temperature", "sample.py", ["--ckpt={sft}", "--prompt=hi", "--temperature=-1"], ["argument --temperature", "≥ 0"]),
    ("sample_top_p", "sample.py", ["--ckpt={sft}", "--prompt=hi", "--top_p=2"], ["argument --top_p", "≤ 1"]),
    ("study_bad_bon_n", "study.py", ["--sft={sft}", "--bon_n=1,x", OUT], ["argument --bon_n", "'x'"]),
    ("study_zero_iters", "study.py", ["--iters=0", OUT], ["argument --iters", "≥ 1"]),
    ("bench_zero_iters", "bench.py", ["--ppo_iters=0"], ["argument --ppo_iters", "≥ 1"]),
    ("bench_no_cuda", "bench.py", ["--device=cuda"], ["--device=cuda", "no CUDA"]),
    ("hh_val_fraction", "data/hh_rlhf/prepare.py", ["--val_fraction=1.5", "--src={dir}"], ["argument --val_fraction", "< 1"]),
    ("shakespeare_val_fraction", "data/shakespeare/prepare.py", ["--val_fraction=0"], ["argument --val_fraction", "> 0"]),
    # data files
    ("sft_not_utf8", "train_sft.py", ["--data={latin1_jsonl}", "--tokenizer=gpt2", OUT], ["{latin1_jsonl}:2:", "not UTF-8"]),
    ("sft_txt_not_utf8", "train_sft.py", ["--data={latin1_txt}", "--tokenizer=gpt2", OUT], ["{latin1_txt}:1:", "not UTF-8"]),
    ("sft_corrupt_gz", "train_sft.py", ["--data={corrupt_jsonl_gz}", "--tokenizer=gpt2", OUT],
     ["{corrupt_jsonl_gz}:", "truncated or corrupt gzip"]),
    ("sft_binary", "train_sft.py", ["--data={binary_jsonl}", "--tokenizer=gpt2", OUT], ["{binary_jsonl}:1:", "not UTF-8"]),
    ("sft_nul", "train_sft.py", ["--data={nul_jsonl}", "--tokenizer=gpt2", OUT], ["{nul_jsonl}:1:", "NUL"]),
    ("sft_empty", "train_sft.py", ["--data={empty_jsonl}", "--tokenizer=gpt2", OUT], ["{empty_jsonl}", "no records"]),
    ("sft_one_record", "train_sft.py", ["--data={one_sft_jsonl}", "--tokenizer=gpt2", OUT], ["{one_sft_jsonl}", "only record", "held-out"]),
    ("rm_one_record", "train_rm.py", ["--init_from={sft}", "--data={one_pref_jsonl}", OUT], ["{one_pref_jsonl}", "only record"]),
    ("rm_corrupt_gz", "train_rm.py", ["--init_from={sft}", "--data={corrupt_jsonl_gz}", OUT], ["{corrupt_jsonl_gz}:", "gzip"]),
    ("rm_only_ties", "train_rm.py", ["--init_from={sft}", "--data={ties_jsonl}", "--val_data={ties_jsonl}", OUT],
     ["{ties_jsonl}", "no comparison left with two different responses"]),
    ("ppo_empty_prompts", "train_ppo.py", ["--init_from={sft}", "--reward_model={rm}", "--prompts={empty_jsonl}", OUT],
     ["{empty_jsonl}", "no records"]),
    ("sample_binary_prompts", "sample.py", ["--ckpt={sft}", "--prompts_file={prompts_bin}"], ["--prompts_file", "not UTF-8"]),
    ("report_missing", "report.py", ["--sft_dir={sft_dir}", "--rm_dir={rm_dir}", "--ppo_dir=/nonexistent/ppo"], ["--ppo_dir=/nonexistent/ppo", "summary.json is missing"]),
    ("report_bad_json", "report.py", ["--sft_dir={dir}/report_bad", "--rm_dir={dir}/report_bad", "--ppo_dir={dir}/report_bad",
                                      "--out={dir}/report_out"], ["{dir}/report_bad/summary.json", "JSON"]),
    ("hh_corrupt_src", "data/hh_rlhf/prepare.py", ["--src={dir}/hh", "--out_dir={dir}/hh_out"], ["test.jsonl.gz", "gzip"]),
    ("shakespeare_binary_src", "data/shakespeare/prepare.py", ["--src={prompts_bin}", "--out_dir={dir}/sh_out"],
     ["{prompts_bin}", "not UTF-8"]),
]


@pytest.fixture(scope="module")
def results(files):
    """Every case's finished process, run two at a time (each is mostly Python start-up and torch's import)."""
    def one(case):
        name, script, flags, _ = case
        argv = [f.format(id=name, **files) for f in flags] + (["--threads=1"] if script.startswith("train_") else [])
        return name, run_script(script, *argv, timeout=120)
    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("name,script,flags,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(results, files, name, script, flags, expect):
    p = results[name]
    err = p.stderr.strip()
    assert p.returncode == 2, f"{script}: exit {p.returncode}, expected 2\nstdout: {p.stdout[-1500:]}\nstderr: {err[-3000:]}"
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), f"expected one 'error: ...' line, got {err!r}"
    for e in expect:
        assert e.format(id=name, **files) in err, f"{e.format(id=name, **files)!r} not in {err!r}"


def test_crafted_checkpoint_payload_never_runs(results, files):
    """The three cases that pass evil.pt were refused (above); its `touch` never ran in any of them, while the
    same file loaded the unsafe way does run it: so the check would see a payload that ran."""
    assert {"sft_evil_ckpt", "ppo_evil_rm", "sample_evil"} <= set(results)
    assert not os.path.exists(files["marker"]), "the crafted checkpoint's code ran"
    torch.load(files["evil_pt"], weights_only=False)  # what the project did before: the payload runs
    assert os.path.exists(files["marker"])
    os.remove(files["marker"])


# ----------------------------------------------------------------------------------------------------------------
# kills at random moments: the checkpoint always loads, and the resumed run is the uninterrupted one, bit for bit


KILL_FLAGS = SFT_TINY + ["--n_layer=2", "--n_embd=64", "--batch_size=16", "--max_iters=300", "--eval_interval=10",
                         "--eval_iters=1", "--n_eval_prompts=2", "--max_new_tokens=8", "--log_interval=50"]


def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    p = run_script("train_sft.py", *KILL_FLAGS, f"--out_dir={ref}")
    assert p.returncode == 0, p.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rng = random.Random(0)
    kills = loadable = 0
    for attempt in range(12):
        resume = os.path.exists(os.path.join(run, "ckpt.pt"))
        cmd = [sys.executable, os.path.join(ROOT, "train_sft.py"), *KILL_FLAGS, f"--out_dir={run}",
               "--resume=1" if resume else "--overwrite=1"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt < 5:  # five kills at random moments; then let it finish
            # a random moment after this attempt has written a checkpoint of its own (on a loaded machine the
            # start-up alone can outlast a fixed delay), so each kill lands among steps and saves
            t0, ck = time.time(), os.path.join(run, "ckpt.pt")
            while proc.poll() is None and time.time() - t0 < 120 and \
                    not (os.path.exists(ck) and os.path.getmtime(ck) >= t0):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait(timeout=300)
        if proc.returncode == 0:
            break
        ck = os.path.join(run, "ckpt.pt")
        if os.path.exists(ck):
            assert load(ck)["stage"] == "sft"  # never a torn checkpoint, whatever moment the kill hit
            loadable += 1
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    assert kills >= 3 and loadable >= 2, (kills, loadable)
    rows_ref, rows_run = step_rows(os.path.join(ref, "log.jsonl")), step_rows(os.path.join(run, "log.jsonl"))
    assert [r["step"] for r in rows_run] == list(range(300)), "the resumed log lost or repeated steps"
    assert rows_run == rows_ref
    a, b = load(os.path.join(ref, "ckpt.pt"))["model"], load(os.path.join(run, "ckpt.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ after the kills and resumes"
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


def test_torn_last_log_line_does_not_block_resume(tmp_path):
    out = str(tmp_path / "torn")
    flags = SFT_TINY + ["--max_iters=8", "--eval_interval=4", "--n_eval_prompts=2", "--max_new_tokens=8"]
    assert run_script("train_sft.py", *flags, f"--out_dir={out}", "--stop_after=4").returncode == 0
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"step": 4, "loss": 1.23')  # a kill between write and flush
    p = run_script("train_sft.py", *flags, f"--out_dir={out}", "--resume=1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "dropped a torn last line" in p.stdout
    assert [r["step"] for r in step_rows(os.path.join(out, "log.jsonl"))] == list(range(8))


# ----------------------------------------------------------------------------------------------------------------
# a full disk and a read-only folder (a small tmpfs where this runs as root, as CI does; chmod elsewhere)


def mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_disk_full_keeps_the_previous_checkpoint(tmp_path):
    mnt = tmp_path / "small"
    if not mount_tmpfs(mnt, "size=1000k"):
        pytest.skip("needs root to mount a small tmpfs (a full disk cannot be made otherwise)")
    try:
        out = str(mnt / "run")
        # the checkpoint is ~0.7 MB: the first save fits, the second (its .tmp beside the first) does not
        p = run_script("train_sft.py", *SFT_TINY, "--max_iters=12", "--eval_interval=4", "--n_eval_prompts=2",
                       "--max_new_tokens=8", f"--out_dir={out}")
        err = p.stderr.strip()
        assert p.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert f"could not write checkpoint {out}/ckpt.pt" in err and "previous checkpoint is intact" in err, err
        assert load(os.path.join(out, "ckpt.pt"))["iter"] == 4
        assert not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)])


def test_read_only_out_dir_is_refused_before_training(tmp_path):
    ro = tmp_path / "ro"
    mounted = mount_tmpfs(ro, "ro,size=64k")
    if not mounted:
        os.chmod(ro, 0o555)
    try:
        t0 = time.time()
        p = run_script("train_sft.py", *SFT_TINY, "--max_iters=100000", f"--out_dir={ro}/run")
        err = p.stderr.strip()
        assert p.returncode == 2 and len(err.splitlines()) == 1, err
        assert f"--out_dir={ro}/run is not writable" in err, err
        assert time.time() - t0 < 60, "it trained before finding the folder read-only"
        assert "sft step" not in p.stdout
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)])
        else:
            os.chmod(ro, 0o755)


def test_over_long_line_is_refused(tmp_path, monkeypatch):
    from data import formats
    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "x" * 5000}) + "\n")
    with pytest.raises(formats.DataError, match=r"long.jsonl:2: a line of over"):
        formats.load_prompts(str(path))


def test_reward_model_sigma_zero_keeps_the_trained_weights(chain, tmp_path, monkeypatch):
    """A degenerate normalisation sample (every score equal) is an error with its cause, after the trained weights
    were saved: nothing of the run is lost."""
    import train_rm
    from runs import run_main
    monkeypatch.setattr(train_rm, "measure_normalisation", lambda *a, **k: (0.25, 0.0))
    out = str(tmp_path / "rm")
    code, _, err = run_main(train_rm, [f"--init_from={chain['sft_ckpt']}", f"--data={chain['rm']}/comparisons_train.jsonl",
                                       f"--val_data={chain['rm']}/comparisons_val.jsonl", "--batch_size=4",
                                       "--n_norm=8", "--threads=1", f"--out_dir={out}"])
    assert code == 2 and "σ = 0" in err and "kept in" in err, err
    ck = load(os.path.join(out, "ckpt.pt"))
    assert ck["stage"] == "rm" and ck["iter"] == 6 and not ck["complete"] and "mu" not in ck


def test_every_checkpoint_says_what_it_is(chain):
    for path, stage in ((chain["sft_ckpt"], "sft"), (chain["rm_ckpt"], "rm"), (chain["ppo_ckpt"], "ppo")):
        ck = load(path)
        assert ck["stage"] == stage and ck["complete"] is True and "tokenizer" in ck, (path, sorted(ck))
    assert load(chain["rm_ckpt"])["normalised"] is True
    rows = read_jsonl(os.path.join(chain["rm"], "log.jsonl"))
    assert rows, "the chain's reward model wrote no log"
