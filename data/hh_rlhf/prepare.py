"""Anthropic HH-RLHF (Bai et al. 2022, arXiv:2204.05862) -> the pipeline's three JSONL datasets.

Each raw record is a pair of whole conversations, {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...},
that share a prompt and differ in the last assistant reply. From each kept record this script writes

  pairs_{train,val}.jsonl    {"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "chosen": reply, "rejected": reply}
                             for train_rm.py (the explicit preference format of data/formats.py)
  sft_{train,val}.jsonl      {"messages": prompt messages + the chosen reply}, for train_sft.py
  prompts_{train,val}.jsonl  {"messages": prompt messages (ending with the user)}, one per distinct prompt, for
                             train_ppo.py

Records that data.formats.parse_preference rejects (a few are malformed: an empty reply, two Human turns in a row)
are skipped and counted, and so are pairs whose two replies are the same text (no preference to learn).

The held-out split is by question: records are grouped by their first user message, and a group lies wholly in
train or wholly in val, so no prompt (nor the opening question of a longer conversation) is in both. When a subset
has a train split, its test split is the held-out set (minus any group that train also has); when it has only a
test split (our offline copy in ../shared/data/hh-rlhf), a seeded shuffle of the groups holds out --val_fraction.
GPT-2's tokenizer is used only to report sizes and the share of conversations longer than --max_tokens.

Reads https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/<subset>/<split>.jsonl.gz, or --src=DIR holding
<subset>/<split>.jsonl.gz. Writes the six files above under --out_dir (atomically) and prints their counts.

  python data/hh_rlhf/prepare.py                                             # download helpful-base
  python data/hh_rlhf/prepare.py --src=../shared/data/hh-rlhf --subsets=helpful-base,harmless-base
  python train_sft.py --init_from=gpt2 --data=data/hh_rlhf/sft_train.jsonl --val_data=data/hh_rlhf/sft_val.jsonl
"""
import argparse
import gzip
import io
import json
import os
import random
import re
import sys
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # run as a script from anywhere: the repo's data/ and tokenizer.py must be importable

import common as C  # noqa: E402
from data.formats import parse_preference, parse_prompt, parse_sft, write_jsonl  # noqa: E402
from tokenizer import ASSISTANT, HUMAN, get_tokenizer, render_chat, render_prompt  # noqa: E402

URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz"
TIE = "chosen and rejected are the same text"  # a pair with no preference in it: skipped, counted apart
SUBSETS = ["helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled"]


# ------------------------------------------------------------------------------------------------------------
# Reading the raw files

def read_raw(subset, split, src, timeout):
    """The raw records of one file as a list of dicts; None when --src has no such file (a missing split)."""
    if src:
        path = os.path.join(src, subset, f"{split}.jsonl.gz")
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            data, origin = f.read(), path
    else:
        url = URL.format(subset=subset, split=split)
        print(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                data, origin = r.read(), url
        except (urllib.error.URLError, OSError) as e:  # HTTPError is a URLError; timeouts and resets are OSErrors
            reason = getattr(e, "reason", None) or e
            C.fail(f"could not download {url} ({reason}). With no internet, pass a local copy: --src=DIR holding "
                 f"<subset>/<split>.jsonl.gz (e.g. --src=../shared/data/hh-rlhf)")
    records = []
    try:
        with gzip.open(io.BytesIO(data), "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    C.fail(f"{origin}:{lineno}: bad JSON ({e.msg}); is the file complete?")
    except (OSError, EOFError, UnicodeDecodeError) as e:  # not gzip, truncated, not UTF-8
        C.fail(f"{origin}: cannot read it as gzipped UTF-8 JSONL ({type(e).__name__}: {e})")
    return records


# ------------------------------------------------------------------------------------------------------------
# One record -> the three output lines

def to_hh(messages) -> str:
    """Messages ending with the user -> the HH generation prompt '\\n\\nHuman: ...\\n\\nAssistant:'.

    The inverse of tokenizer.parse_hh (which drops the one space after each marker and the trailing empty
    Assistant turn), so the prompt string parses back to exactly these messages.
    """
    return "".join((HUMAN if m["role"] == "user" else ASSISTANT) + " " + m["content"] for m in messages) + ASSISTANT


def convert(raw):
    """A raw HH record -> (pair, sft, prompt) lines; ValueError(reason) for a record to skip."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, found {type(raw).__name__}")
    pref = parse_preference(raw)  # the shared prompt as messages, [chosen reply, rejected reply]
    chosen, rejected = pref["responses"]
    if chosen == rejected:
        raise ValueError(TIE)
    pair = {"prompt": to_hh(pref["prompt"]), "chosen": chosen, "rejected": rejected}
    sft = {"messages": pref["prompt"] + [{"role": "assistant", "content": chosen}]}
    prompt = {"messages": pref["prompt"]}
    # Each line must load with the strict loaders train_*.py use (the SFT and prompt formats also refuse empty
    # earlier turns, which parse_preference lets through), and the pair must mean exactly what the raw record did.
    parse_sft(sft)
    parse_prompt(prompt)
    assert parse_preference(pair) == pref, f"the explicit pair does not round-trip: {pair!r:.200}"
    return pair, sft, prompt


def group_key(pair_prompt_messages) -> str:
    # The first question of the conversation: multi-turn records that open the same way are one group.
    return pair_prompt_messages[0]["content"].strip()


# ------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = C.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="", help="local folder with <subset>/<split>.jsonl.gz; empty = download")
    p.add_argument("--subsets", default="helpful-base",
                   help=f"comma-separated HH-RLHF subsets to use, of {', '.join(SUBSETS)}")
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)),
                   help="folder for the six .jsonl files (default: this script's folder)")
    p.add_argument("--val_fraction", type=C.number(float, 0, 1, lo_open=True, hi_open=True), default=0.1,
                   help="share of the question groups held out when a subset has no train split")
    p.add_argument("--seed", type=int, default=0, help="seed of that held-out shuffle")
    p.add_argument("--max_tokens", type=C.count(), default=512,
                   help="report the share of conversations longer than this many GPT-2 tokens (train_rm's "
                        "--max_tokens / the model's block_size truncate them)")
    p.add_argument("--timeout", type=C.positive, default=60.0, help="download timeout in seconds, per file")
    args = p.parse_args(argv)
    subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
    if not subsets:
        C.fail("--subsets is empty")
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        C.fail(f"--subsets: unknown {', '.join(unknown)}; expected some of {', '.join(SUBSETS)}")
    if args.src and not os.path.isdir(args.src):
        C.fail(f"--src={args.src}: no such folder")

    # 1. read and convert; remember where each kept record came from: "train", "test" or "split" (to divide)
    kept = []  # (origin, pair, sft, prompt)
    for subset in subsets:
        train = read_raw(subset, "train", args.src, args.timeout)
        test = read_raw(subset, "test", args.src, args.timeout)
        if train is None and test is None:
            C.fail(f"--src={args.src}: neither {subset}/train.jsonl.gz nor {subset}/test.jsonl.gz is there")
        if train is None:
            print(f"{subset}: no train split in {args.src}, so its test split is divided: a seeded shuffle "
                  f"(--seed={args.seed}) holds out {args.val_fraction:.0%} of its question groups")
        elif test is None:
            print(f"{subset}: no test split in {args.src}, so its train split is divided: a seeded shuffle "
                  f"(--seed={args.seed}) holds out {args.val_fraction:.0%} of its question groups")
        if train is not None and test is not None:
            files = [("train", "train", train), ("test", "test", test)]
        else:
            files = [("split", "train", train)] if train is not None else [("split", "test", test)]
        for origin, split, records in files:
            reasons = {}
            for raw in records:
                try:
                    kept.append((origin,) + convert(raw))
                except ValueError as e:
                    reason = re.sub(r"\bturn \d+", "turn N", str(e))[:120]  # one line for "HH turn 3/5/9 is ..."
                    reasons[reason] = reasons.get(reason, 0) + 1
            bad, ties = sum(reasons.values()), reasons.get(TIE, 0)
            print(f"{subset}/{split}: {len(records):,} records, {len(records) - bad:,} kept, {bad} skipped "
                  f"({bad - ties} malformed, {ties} with chosen == rejected)")
            for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
                print(f"    {n:4d} × {reason}")

    # 2. assign each question group to a side. Official train groups are train; official test groups are held
    # out unless train has them too; the groups of a file to divide are shuffled and --val_fraction held out.
    side = {}
    for origin, _, sft, _ in kept:
        if origin == "train":
            side[group_key(sft["messages"])] = "train"
    moved = 0
    for origin, _, sft, _ in kept:
        if origin == "test":
            key = group_key(sft["messages"])
            moved += side.get(key) == "train"
            side.setdefault(key, "val")
    if moved:
        print(f"{moved} test records open with a question that train also has: they go to train")
    rest = sorted({group_key(sft["messages"]) for origin, _, sft, _ in kept if origin == "split"} - set(side))
    random.Random(args.seed).shuffle(rest)
    n_val = round(len(rest) * args.val_fraction)
    side.update({key: "val" for key in rest[:n_val]})
    side.update({key: "train" for key in rest[n_val:]})

    # 3. the six files, and their sizes in GPT-2 tokens exactly as the pipeline renders them (chat template, EOS)
    tok = get_tokenizer("gpt2")
    out = {(kind, s): [] for kind in ("pairs", "sft", "prompts") for s in ("train", "val")}
    lengths = {key: [] for key in out}
    seen_prompts = set()
    for _, pair, sft, prompt in kept:
        s = side[group_key(sft["messages"])]
        replies = [{"role": "assistant", "content": pair[k]} for k in ("chosen", "rejected")]
        out["pairs", s].append(pair)  # the longer side is the one that gets truncated
        lengths["pairs", s].append(max(len(render_chat(tok, prompt["messages"] + [r])[0]) for r in replies))
        out["sft", s].append(sft)
        lengths["sft", s].append(len(render_chat(tok, sft["messages"])[0]))
        if pair["prompt"] not in seen_prompts:  # RL needs each prompt once
            seen_prompts.add(pair["prompt"])
            out["prompts", s].append(prompt)
            lengths["prompts", s].append(len(render_prompt(tok, prompt["messages"])))
    overlap = {p["prompt"] for p in out["pairs", "train"]} & {p["prompt"] for p in out["pairs", "val"]}
    assert not overlap, f"{len(overlap)} prompts are in both train and val, e.g. {next(iter(overlap))!r:.100}"
    if not out["pairs", "train"] or not out["pairs", "val"]:
        C.fail(f"only {len(kept)} usable records: too few for both a train and a held-out split")

    os.makedirs(args.out_dir, exist_ok=True)
    M = args.max_tokens
    for (kind, s), rows in out.items():
        path = os.path.join(args.out_dir, f"{kind}_{s}.jsonl")
        write_jsonl(path, rows)
        n, total, lens = len(rows), sum(lengths[kind, s]), lengths[kind, s]
        print(f"{path}: {n:,} lines, {total:,} GPT-2 tokens (mean {total / max(n, 1):.0f}, max {max(lens, default=0)}),"
              f" {sum(t > M for t in lens) / max(n, 1):.1%} longer than {M}")

if __name__ == "__main__":
    main()
