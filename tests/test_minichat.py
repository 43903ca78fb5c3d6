"""Tests for data/minichat.py: the lexicon, the prompt space and its split, the crowd's demos, the gold labeler's
formula term by term, and the Plackett-Luce labeler. Pure Python, no torch.

Run: python -m pytest -q tests/test_minichat.py
"""
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import time

import pytest

from data import minichat as mc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A perfect answer: opener, 3 distinct on-topic facts, closer, 16 words.
REQ = "Can you tell me about cats?"
OPEN, CLOSE = "Sure!", "Hope this helps!"
F1, F2, F3, F4 = "Cats are soft.", "Cats can jump very high.", "Many people love cats.", "Cats are quiet."
PERFECT = " ".join([OPEN, F1, F2, F3, CLOSE])


def words(text):
    return len(text.split())


def _key_in(key, text):
    return re.search(r"\b" + re.escape(key) + r"\b", text.lower()) is not None


# -----------------------------------------------------------------------------
# Lexicon

def test_sentences_are_ascii_unambiguous_and_topical():
    for s in mc.VALID_SENTENCES:
        assert s.isascii() and s == s.strip() and "  " not in s, f"bad sentence {s!r}"
        assert s[-1] in ".!?" and mc.split_sentences(s) == [s], f"{s!r} must be exactly one sentence"
    for topic, facts in mc.FACTS.items():
        assert 12 <= len(set(facts)) <= 30, f"{topic}: {len(set(facts))} facts"
        for f in facts:
            keys = {k for k in mc.TOPICS if _key_in(k, f)}
            assert keys == {topic}, f"fact {f!r} of {topic!r} names topics {keys}"
    for s in mc.OPENERS + mc.CLOSERS + mc.RUDE:
        assert not any(_key_in(k, s) for k in mc.TOPICS), f"{s!r} names a topic"


def test_lexicon_is_small_and_closed():
    vocab = set()
    for s in mc.VALID_SENTENCES:
        vocab.update(re.findall(r"[A-Za-z']+", s))
    for t in mc.TEMPLATES + mc.PREFIXES + mc.SUFFIXES:
        vocab.update(re.findall(r"[A-Za-z']+", re.sub(r"\{\w+\}", " ", t)))
    for p, o in mc.PERSONS:
        vocab.update(p.split() + [o])
    assert 500 <= len(vocab) <= 1000, f"lexicon has {len(vocab)} words, want ~600-1000"
    assert all(w.isascii() for w in vocab)
    # Nothing around the topic slot may name a topic, or topic_of would be ambiguous.
    for t in mc.TEMPLATES + mc.PREFIXES + mc.SUFFIXES + [p for p, _ in mc.PERSONS]:
        bare = t.replace("{t}", " ")
        assert not any(_key_in(k, bare) for k in mc.TOPICS), f"{t!r} names a topic"


# -----------------------------------------------------------------------------
# Prompts

def test_prompt_space_is_large_by_count_and_by_draws():
    size = mc.prompt_space_size()
    assert size >= 100_000, size
    # Count the space for real: every template × topic × person gives a different body, and every
    # prefix/suffix pair decorates it differently.
    bodies = {tpl.format(t=t, be="is", p=p, o=o)
              for tpl in mc.TEMPLATES for t in mc.TOPICS for p, o in mc.PERSONS}
    decorations = {(a, b) for a in mc.PREFIXES for b in mc.SUFFIXES}
    assert len(bodies) * len(decorations) == size, (len(bodies), len(decorations), size)
    rng = random.Random(0)
    drawn = {mc.make_prompt(rng)[0] for _ in range(300_000)}
    assert len(drawn) >= 100_000, f"only {len(drawn)} distinct requests in 300k draws"


def test_topic_of_recovers_every_topic():
    for tpl in mc.TEMPLATES:
        for t in mc.TOPICS:
            request = "Hey! " + tpl.format(t=t, be="are", p="teacher", o="them") + " Thanks!"
            assert mc.topic_of(request) == t, (request, mc.topic_of(request))
    rng = random.Random(1)
    for _ in range(5000):
        request, topic = mc.make_prompt(rng)
        assert mc.topic_of(request) == topic, request
    assert mc.topic_of("Tell me about the weather.") is None


def test_heldout_split_is_stable_about_5_percent_and_disjoint():
    request = "Can you tell me about cats?"
    bucket = int(hashlib.md5(request.encode()).hexdigest()[:8], 16) % 10000
    assert mc.is_heldout(request) == (bucket < 500)
    rng = random.Random(2)
    frac = sum(mc.is_heldout(mc.make_prompt(rng)[0]) for _ in range(20000)) / 20000
    assert 0.04 < frac < 0.06, frac
    train, held = mc.sample_prompts(3000, 0, "train"), mc.sample_prompts(1000, 0, "heldout")
    assert len(train) == 3000 and len(held) == 1000
    assert not any(mc.is_heldout(p) for p in train) and all(mc.is_heldout(p) for p in held)
    assert not set(train) & set(held)
    assert mc.sample_prompts(100, 0) == train[:100], "same seed, same prompts"
    assert mc.sample_prompts(100, 1) != train[:100], "another seed, other prompts"
    with pytest.raises(AssertionError):
        mc.sample_prompts(1, 0, "val")


# -----------------------------------------------------------------------------
# The gold labeler, term by term

def test_perfect_answer_scores_the_maximum():
    assert words(PERFECT) <= 30
    assert mc.well_formed(PERFECT)
    assert mc.gold(REQ, PERFECT) == mc.GOLD_MAX == 4.0
    st = mc.response_stats(REQ, PERFECT)
    assert st == dict(on_topic=3, off_topic=0, repeats=0, rude=0, opener=1, closer=1, extra_polite=0,
                      words=16, eos=True, well_formed=True)
    # Any topic's key works: the same shape of answer about the sea.
    sea = "Of course! The sea is deep. Whales and sharks live in the sea. The sea can make loud waves. Enjoy!"
    assert mc.gold("My friend Anna wants to learn about the sea. What should I tell her?", sea) == 4.0


@pytest.mark.parametrize("response, expected", [
    (" ".join([F1, F2, F3, CLOSE]), 3.5),                          # no opener: −0.5
    (" ".join([OPEN, F1, F2, F3]), 3.5),                           # no closer: −0.5
    (" ".join([F1, F2]), 2.0),                                     # 2 facts, nothing else
    (" ".join([OPEN, F1, F2, "Dogs are loyal.", CLOSE]), 2.0),     # on-topic fact swapped for off-topic: −1 −1
    (" ".join([OPEN, F1, F2, F3, "Dogs are loyal.", CLOSE]), 3.0),  # one off-topic fact added: −1
    (" ".join([OPEN, F1, "Look it up yourself.", F2, F3, CLOSE]), 2.5),  # rude: −1.5
    (" ".join(["Look it up yourself.", F1]), -0.5),                # rude first is not an opener
    (" ".join([OPEN, F1, F1, F1, CLOSE]), 0.0),                    # one fact, 2 repeats: 0.5 + 1 − 2 + 0.5
    (" ".join([OPEN, F1, F2, F3, F3, CLOSE]), 3.0),                # a repeated fact is no new fact: −1
    (" ".join([OPEN, F1, F2, F3, F4, CLOSE]), 4.0),                # a 4th fact is capped, 19 words: no gain
    (" ".join([OPEN, "Happy to help.", F1, F2, F3, CLOSE, "Enjoy!"]), 3.0),  # 2 stacked polite lines: −0.5 each
    (" ".join([F1, F2, F3, OPEN]), 2.5),                           # opener at the end is misplaced: −0.5
    (" ".join([OPEN, OPEN, F1, F2, F3, CLOSE]), 3.0),              # a repeated opener is a repeat: −1
    ("Enjoy!", 0.5),                                               # a lone closer is still the last sentence
])
def test_gold_terms(response, expected):
    assert mc.well_formed(response)
    assert mc.gold(REQ, response) == pytest.approx(expected), mc.response_stats(REQ, response)



def test_named_gold_terms_add_up_to_gold():
    """gold_terms (the report of what a reward model learned) names exactly the terms of the formula."""
    w = {"on_topic": mc.W_ON, "facts_beyond_3": 0.0, "off_topic": -mc.W_OFF, "repeats": -mc.W_REPEAT,
         "rude": -mc.W_RUDE, "opener": mc.W_POLITE, "closer": mc.W_POLITE, "extra_polite": -mc.W_EXTRA_POLITE,
         "words_over_30": -mc.W_WORD, "malformed": 0.0}
    rows = mc.make_sft_data(500, 0) + [{"prompt": REQ, "response": "Sure! Cats are fluffy."}]
    for r in rows:
        t = mc.gold_terms(r["prompt"], r["response"])
        if t["malformed"]:
            assert t == {"malformed": 1} and mc.gold(r["prompt"], r["response"]) == mc.GOLD_FLOOR
            continue
        assert set(t) == set(w), t
        assert sum(w[k] * v for k, v in t.items()) == pytest.approx(mc.gold(r["prompt"], r["response"])), r
    assert mc.gold_terms(REQ, PERFECT, eos=False) == {"malformed": 1}  # no EOS: the floor
    assert mc.gold_terms(REQ, " ".join([OPEN, F1, F1, F2, F3, F4, CLOSE]))["facts_beyond_3"] == 1

def test_length_budget_costs_a_quarter_per_word():
    long_facts = ["Cats can purr when they are happy.", "Cats clean their fur with their tongue.",
                  "Cats like to nap in the sun.", "Cats can see well in the dark.", "There is a lot to know about cats."]
    response = " ".join([OPEN] + long_facts + [CLOSE])
    assert words(response) == 40  # 1 + 7 + 7 + 7 + 7 + 8 + 3
    # 5 on-topic facts capped at 3, opener and closer: 4.0, minus 0.25 × (40 − 30) words.
    assert mc.gold(REQ, response) == pytest.approx(4.0 - 0.25 * 10)
    # The exploit a reward model may fall for: more topic words than the best answer, and a lower gold.
    assert mc.gold(REQ, response) < mc.gold(REQ, PERFECT)


def test_no_eos_and_malformed_score_the_floor():
    assert mc.gold(REQ, PERFECT, eos=False) == -4.0
    assert not mc.well_formed(PERFECT, eos=False)
    for bad in [
        "Sure! Cats are fluffy. Hope this helps!",       # unknown sentence (a word off the lexicon)
        "Sure! Cats are soft. Hope this helps",          # missing final punctuation
        "Sure! Cats are soft.  Hope this helps!",        # double space
        " Sure! Cats are soft.",                          # leading space
        "Sure! Cats are soft. ",                          # trailing space
        "Sure!Cats are soft.",                            # no space
        "Sure! cats are soft.",                           # wrong case
        "",                                               # empty
    ]:
        assert not mc.well_formed(bad), bad
        assert mc.gold(REQ, bad) == -4.0, bad
        assert mc.response_stats(REQ, bad)["well_formed"] is False


def test_gold_is_deterministic_and_depends_on_the_request():
    assert [mc.gold(REQ, PERFECT) for _ in range(3)] == [4.0] * 3
    # The same answer to a request about dogs is three off-topic facts.
    assert mc.gold("Tell me something about dogs.", PERFECT) == pytest.approx(0.5 - 3 + 0.5)


# -----------------------------------------------------------------------------
# Demonstrations

def test_demos_are_well_formed_and_deterministic():
    rows = mc.make_sft_data(2000, 0)
    assert rows == mc.make_sft_data(2000, 0)
    assert rows != mc.make_sft_data(2000, 1)
    for r in rows:
        assert set(r) == {"prompt", "response"}
        assert mc.well_formed(r["response"]), r
        assert not mc.is_heldout(r["prompt"])
    assert all(mc.is_heldout(r["prompt"]) for r in mc.make_sft_data(200, 0, "heldout"))


def test_personas_do_what_they_say():
    rng = random.Random(3)
    for _ in range(300):
        request, _ = mc.make_prompt(rng)
        st = {p: mc.response_stats(request, mc.write_demo(request, rng, p)) for p in mc.PERSONAS}
        assert all(s["well_formed"] for s in st.values())
        g = st["good"]
        assert 2 <= g["on_topic"] <= 3 and g["off_topic"] == g["repeats"] == g["rude"] == g["extra_polite"] == 0, g
        assert st["off_topic"]["off_topic"] >= 2 and st["off_topic"]["on_topic"] <= 1
        assert st["rude"]["rude"] == 1 and st["rude"]["on_topic"] <= 2
        assert st["rambler"]["on_topic"] + st["rambler"]["off_topic"] >= 5 and st["rambler"]["words"] > 30
        assert 1 <= st["repeater"]["repeats"] <= 3
    with pytest.raises(ValueError):
        mc.write_demo(REQ, rng, "poet")


def test_crowd_gold_is_broad_and_below_the_optimum():
    report = mc.demo_report(2000, 0)
    mean, std, n = report["all"]
    assert n == 2000
    assert 0.3 < mean < 1.5 and 1.5 < std < 3.0, report
    # The good writers lead; every other persona averages below zero; the optimum is far above the average demo.
    assert report["good"][0] > 2.5 and all(report[p][0] < 0 for p in mc.PERSONAS if p != "good"), report
    assert mc.GOLD_MAX - mean > 2.5
    counts = {p: report[p][2] / n for p in mc.PERSONAS}
    for p, w in mc.PERSONAS.items():
        assert abs(counts[p] - w) < 0.04, (p, counts[p], w)


def test_generation_is_fast():
    t0 = time.time()
    mc.make_sft_data(20000, 0)
    assert time.time() - t0 < 5.0


# -----------------------------------------------------------------------------
# The noisy labeler

def test_ranking_at_low_temperature_is_the_gold_order():
    responses = [" ".join([F1, F1, F1, F1]), PERFECT, "Go away.", " ".join([F1, F2]), "Dogs are loyal."]
    golds = [mc.gold(REQ, r) for r in responses]
    assert len(set(golds)) == len(golds), golds
    expected = sorted(range(len(golds)), key=lambda i: -golds[i])
    rng = random.Random(0)
    for _ in range(50):
        assert mc.rank(REQ, responses, rng, temperature=1e-3) == expected
    # A truncated response drops to the floor, below everything else.
    assert mc.rank(REQ, responses, rng, temperature=1e-3, eos=[True, False, True, True, True])[-1] == 1


def test_ranking_at_high_temperature_is_near_random():
    scores, rng, n = [4.0, 2.0, 0.0, -4.0], random.Random(1), 8000
    first = [0] * 4
    for _ in range(n):
        first[mc.plackett_luce(scores, rng, temperature=1000.0)[0]] += 1
    assert all(abs(c / n - 0.25) < 0.03 for c in first), first
    # At τ = 1 the best answer wins far more often than the worst.
    first = [0] * 4
    for _ in range(2000):
        first[mc.plackett_luce(scores, rng, temperature=1.0)[0]] += 1
    assert first[0] > 0.8 * 2000 and first[3] < 0.01 * 2000, first


def test_pair_agreement_formula():
    assert mc.pair_agreement(1.0, 0.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert mc.pair_agreement(0.0, 1.0, 1.0) == mc.pair_agreement(1.0, 0.0, 1.0)  # about the order, not who wins
    assert mc.pair_agreement(2.0, 0.0, 2.0) == pytest.approx(mc.pair_agreement(1.0, 0.0, 1.0))
    assert mc.pair_agreement(3.0, 3.0) == 0.5
    assert mc.labeler_agreement([1.0, 0.0, 0.0], 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert math.isnan(mc.labeler_agreement([2.0, 2.0]))


def test_pair_agreement_matches_plackett_luce_frequencies():
    # Luce's choice axiom: in a K-way Plackett-Luce ranking each pair is ordered like gold with σ(|Δ|/τ).
    scores, tau, n = [4.0, 2.5, 1.0, -1.0], 1.5, 20000
    rng = random.Random(2)
    agree = {(i, j): 0 for i in range(4) for j in range(i + 1, 4)}
    for _ in range(n):
        pos = {k: r for r, k in enumerate(mc.plackett_luce(scores, rng, tau))}
        for i, j in agree:
            agree[(i, j)] += pos[i] < pos[j]  # scores are sorted, so i before j is the gold order
    for (i, j), c in agree.items():
        assert c / n == pytest.approx(mc.pair_agreement(scores[i], scores[j], tau), abs=0.015), (i, j, c / n)


# -----------------------------------------------------------------------------
# Files

def _run_cli(out_dir):
    cmd = [sys.executable, "-m", "data.minichat", f"--out_dir={out_dir}", "--n_sft=300", "--n_prompts=200",
           "--n_val=50", "--seed=7"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cli_writes_the_files_deterministically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        proc = _run_cli(str(d))
        assert proc.returncode == 0, proc.stderr
    assert "sft_train.jsonl: 300 rows" in proc.stdout
    names = ["sft_train.jsonl", "sft_val.jsonl", "prompts_train.jsonl", "prompts_val.jsonl", "corpus.txt", "meta.json"]
    assert sorted(os.listdir(a)) == sorted(names), os.listdir(a)  # and no .tmp left behind
    assert json.loads((a / "meta.json").read_text()) == mc.generation_settings(300, 200, 7, 50)
    for name in names:  # two processes (different hash seeds), same bytes
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    train = [json.loads(line) for line in open(a / "sft_train.jsonl")]
    val = [json.loads(line) for line in open(a / "sft_val.jsonl")]
    ptrain = [json.loads(line)["prompt"] for line in open(a / "prompts_train.jsonl")]
    pval = [json.loads(line)["prompt"] for line in open(a / "prompts_val.jsonl")]
    assert (len(train), len(val), len(ptrain), len(pval)) == (300, 50, 200, 50)
    assert not any(mc.is_heldout(r["prompt"]) for r in train) and not any(mc.is_heldout(p) for p in ptrain)
    assert all(mc.is_heldout(r["prompt"]) for r in val) and all(mc.is_heldout(p) for p in pval)
    corpus = (a / "corpus.txt").read_text()
    assert corpus.startswith("\n\nHuman: " + train[0]["prompt"] + "\n\nAssistant: " + train[0]["response"])
    assert corpus.count("\n\nHuman: ") == 300


def test_prepare_builtin_regenerates_files_made_with_other_settings(tmp_path):
    """A data folder from an older version of the task (other sizes) is regenerated, BPE included; a current one
    is left alone."""
    sys.path.insert(0, ROOT)
    import common as C
    mc.generate_all(str(tmp_path), n_sft=50, n_prompts=40, n_val=10)
    (tmp_path / "tokenizer.json").write_text("trained on the old corpus")
    paths = C.prepare_builtin(str(tmp_path), quiet=True)
    assert json.loads((tmp_path / "meta.json").read_text()) == mc.generation_settings()
    with open(paths["prompts_train"]) as f:
        assert sum(1 for _ in f) == mc.generation_settings()["n_prompts"]
    assert json.loads((tmp_path / "tokenizer.json").read_text())  # a real tokenizer file again
    stamp = os.path.getmtime(paths["prompts_train"])
    C.prepare_builtin(str(tmp_path), quiet=True)
    assert os.path.getmtime(paths["prompts_train"]) == stamp
