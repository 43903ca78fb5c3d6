"""The real-data prepare scripts, run as subprocesses on the offline copies in ../shared/data (skipped without them).

tinyshakespeare: train.txt + val.txt is the input byte for byte, cut at a line boundary about 90% in.
HH-RLHF: the malformed records are skipped and counted, every written line loads with data.formats and means what
the raw record meant, SFT and prompts come from the chosen side, and no question is in both train and val.
"""
import gzip
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from data.formats import load_preferences, load_prompts, load_sft, parse_preference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
SHAKESPEARE = os.path.join(DATA, "tinyshakespeare", "input.txt")
HH = os.path.join(DATA, "hh-rlhf")

pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"no offline data in {DATA}")


def run(script, *flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data", script, "prepare.py"), *flags],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def read_raw(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def first_question(messages):
    return messages[0]["content"].strip()


# ------------------------------------------------------------------------------------------------------------
# tinyshakespeare

def test_shakespeare_split_is_the_input(tmp_path):
    r = run("shakespeare", f"--src={SHAKESPEARE}", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    with open(SHAKESPEARE, "rb") as f:
        raw = f.read()
    train, val = ((tmp_path / f"{name}.txt").read_bytes() for name in ("train", "val"))
    assert train + val == raw, f"train ({len(train)}) + val ({len(val)}) bytes differ from the input ({len(raw)})"
    assert train.endswith(b"\n"), f"the cut is not at a line boundary: train ends with {train[-20:]!r}"
    assert 0.09 < len(val) / len(raw) < 0.11, f"val holds {len(val) / len(raw):.3f} of the text, expected about 0.1"
    # the printed counts are the files' own: characters and GPT-2 tokens (338,025 in all, per SOURCE.md)
    assert f"{len(train):,} characters" in r.stdout and f"{len(val):,} characters" in r.stdout, r.stdout
    tokens = [int(line.split(" lines, ")[1].split(" GPT-2")[0].replace(",", "")) for line in r.stdout.splitlines()
              if "GPT-2 tokens" in line]
    assert len(tokens) == 2 and abs(sum(tokens) - 338_025) < 50, f"GPT-2 token counts {tokens}"


def test_shakespeare_download_failure_is_a_clear_error(tmp_path):
    # Port 9 on localhost refuses at once: a failed download without touching the network.
    r = run("shakespeare", "--url=http://127.0.0.1:9/input.txt", "--timeout=5", f"--out_dir={tmp_path}")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "--src" in r.stderr, r.stderr
    assert not list(tmp_path.iterdir()), "a failed download must write nothing"


# ------------------------------------------------------------------------------------------------------------
# HH-RLHF

@pytest.fixture(scope="module")
def helpful(tmp_path_factory):
    out = tmp_path_factory.mktemp("hh")
    r = run("hh_rlhf", f"--src={HH}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_hh_skips_and_counts_bad_records(helpful):
    out, stdout = helpful
    raw = read_raw(os.path.join(HH, "helpful-base", "test.jsonl.gz"))
    malformed, ties = 0, 0
    for obj in raw:
        try:
            pref = parse_preference(obj)
        except ValueError:
            malformed += 1
            continue
        ties += pref["responses"][0] == pref["responses"][1]
    assert (len(raw), malformed, ties) == (2354, 11, 2), (len(raw), malformed, ties)  # as measured upstream
    assert "2,354 records, 2,341 kept, 13 skipped (11 malformed, 2 with chosen == rejected)" in stdout, stdout
    n_pairs = sum(len(load_preferences(str(out / f"pairs_{s}.jsonl"))) for s in ("train", "val"))
    assert n_pairs == len(raw) - malformed - ties


def test_hh_files_load_and_mean_what_the_raw_records_meant(helpful):
    out, stdout = helpful
    raw = read_raw(os.path.join(HH, "helpful-base", "test.jsonl.gz"))
    expected = []
    for obj in raw:
        try:
            pref = parse_preference(obj)
        except ValueError:
            continue
        if pref["responses"][0] != pref["responses"][1]:
            expected.append(pref)
    key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
    got = {s: load_preferences(str(out / f"pairs_{s}.jsonl")) for s in ("train", "val")}
    assert Counter(map(key, got["train"] + got["val"])) == Counter(map(key, expected)), \
        "the written pairs are not the raw HH pairs (as load_preferences reads them)"
    for s in ("train", "val"):
        prefs = got[s]
        sft = load_sft(str(out / f"sft_{s}.jsonl"))
        prompts = load_prompts(str(out / f"prompts_{s}.jsonl"))
        # SFT: one conversation per pair, the prompt then the chosen reply; prompts: each distinct prompt once
        assert sft == [p["prompt"] + [{"role": "assistant", "content": p["responses"][0]}] for p in prefs]
        distinct = list({key(p["prompt"]): p["prompt"] for p in prefs}.values())
        assert prompts == distinct
        assert all(p[-1]["role"] == "user" for p in prompts)
        path = str(out / f"pairs_{s}.jsonl")
        assert f"{path}: {len(prefs):,} lines" in stdout, stdout
    # the lines use the explicit format, with the prompt rendered as an HH string
    with open(out / "pairs_train.jsonl", encoding="utf-8") as f:
        line = json.loads(f.readline())
    assert sorted(line) == ["chosen", "prompt", "rejected"] and line["prompt"].startswith("\n\nHuman:") \
        and line["prompt"].endswith("\n\nAssistant:"), line


def test_hh_heldout_split_is_by_question(helpful):
    out, stdout = helpful
    prefs = {s: load_preferences(str(out / f"pairs_{s}.jsonl")) for s in ("train", "val")}
    share = len(prefs["val"]) / (len(prefs["train"]) + len(prefs["val"]))
    assert 0.08 < share < 0.12, f"held out {share:.3f} of the pairs, expected about --val_fraction=0.1"
    for kind, load in (("sft", load_sft), ("prompts", load_prompts)):
        assert len(load(str(out / f"{kind}_val.jsonl"))) > 0
    questions = {s: {first_question(p["prompt"]) for p in prefs[s]} for s in prefs}
    prompts = {s: {json.dumps(p["prompt"]) for p in prefs[s]} for s in prefs}
    assert not prompts["train"] & prompts["val"], "a prompt is in both train and val"
    assert not questions["train"] & questions["val"], "an opening question is in both train and val"
    assert "no train split" in stdout and "holds out 10%" in stdout, stdout


def test_hh_official_splits_and_errors(tmp_path):
    """With both splits, test is the held-out set, except a group that train also opens with."""
    def conv(q, a):
        return f"\n\nHuman: {q}\n\nAssistant: {a}"
    src = tmp_path / "src" / "helpful-base"
    src.mkdir(parents=True)
    train = [{"chosen": conv(f"question {i}?", "Good."), "rejected": conv(f"question {i}?", "Bad.")} for i in range(20)]
    test = [{"chosen": conv(f"other {i}?", "Good."), "rejected": conv(f"other {i}?", "Bad.")} for i in range(5)]
    test.append({"chosen": conv("question 3?", "Fine."), "rejected": conv("question 3?", "Poor.")})  # a train question
    test.append({"chosen": conv("broken?", "Good."), "rejected": "\n\nAssistant: no Human turn"})  # malformed
    for name, rows in (("train", train), ("test", test)):
        with gzip.open(src / f"{name}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    out = tmp_path / "out"
    r = run("hh_rlhf", f"--src={tmp_path / 'src'}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "helpful-base/test: 7 records, 6 kept, 1 skipped (1 malformed" in r.stdout, r.stdout
    val = load_preferences(str(out / "pairs_val.jsonl"))
    train_pairs = load_preferences(str(out / "pairs_train.jsonl"))
    assert sorted(first_question(p["prompt"]) for p in val) == [f"other {i}?" for i in range(5)]
    assert len(train_pairs) == 21 and len(load_prompts(str(out / "prompts_train.jsonl"))) == 20

    # clear errors, no tracebacks, nothing written
    for flags in ([f"--src={tmp_path / 'nowhere'}"], [f"--src={tmp_path / 'src'}", "--subsets=helpful-bass"],
                  [f"--src={tmp_path / 'src'}", "--subsets=harmless-base"], [f"--src={HH}", "--val_fraction=1.5"]):
        r = run("hh_rlhf", *flags, f"--out_dir={tmp_path / 'bad'}")
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: "), (flags, r.stderr)
    assert not (tmp_path / "bad").exists()
