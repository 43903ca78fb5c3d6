"""Tokenizer tests: GPT-2 ids, special tokens, our BPE against a brute-force trainer, the chat template's mask."""
import gzip
import json
import os
import random
from collections import Counter

import pytest
import tiktoken
import torch

from tokenizer import (ASSISTANT, EOS, GPT2_PAT_STR, HUMAN, PAD, Tokenizer, _gpt2_split_re, get_tokenizer,
                       parse_hh, render_chat, render_prompt)

HH_TEST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf", "helpful-base",
                       "test.jsonl.gz")
UNICODE = "It’s “quoted” — café, naïve, 日本語, Ελληνικά, ² ⅻ ١٢٣, emoji 🙂🚀, tabs\tand  spaces\u00a0\n\n\r\nend "


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.gpt2()


def _corpus(n_sentences=2000, seed=0):
    """Repetitive little stories over a fixed word list: the shape of text the small models train on."""
    rng = random.Random(seed)
    words = ("the cat dog bird sat ran jumped on over under a mat log tree happy sad big little "
             "Tom Lily said \"hello\" it's they'll we've 1 2 3 42 2024 , . ! ?").split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n_sentences))


@pytest.fixture(scope="module")
def trained():
    return Tokenizer.train(_corpus(), vocab_size=300, name="test_bpe")


# --- GPT-2 -----------------------------------------------------------------------------------------------------

def test_gpt2_ids_and_specials(gpt2):
    assert gpt2.encode("hello world") == [31373, 995]
    assert (gpt2.eos_id, gpt2.pad_id, gpt2.vocab_size) == (50256, 50257, 50258)
    assert gpt2.encode("hello world") == tiktoken.get_encoding("gpt2").encode("hello world")


def test_gpt2_round_trip_unicode(gpt2):
    ids = gpt2.encode(UNICODE)
    assert gpt2.decode(ids) == UNICODE
    assert gpt2.decode(torch.tensor(ids)) == UNICODE  # 1-D tensors decode too
    assert gpt2.encode("’") == [447, 247]  # one character, two byte-level tokens


def test_special_strings_in_text_are_plain_text(gpt2):
    text = f"a{EOS}b{PAD}c"
    ids = gpt2.encode(text)
    assert gpt2.eos_id not in ids and gpt2.pad_id not in ids
    assert len(ids) > 5
    assert gpt2.decode(ids) == text


def test_decode_drops_pad_keeps_eos(gpt2):
    ids = [31373, gpt2.pad_id, 995, gpt2.eos_id, gpt2.pad_id, gpt2.pad_id]
    assert gpt2.decode(ids) == "hello world" + EOS


def test_gpt2_to_dict(gpt2, tmp_path):
    assert gpt2.to_dict() == {"name": "gpt2"}
    again = Tokenizer.from_dict(json.loads(json.dumps(gpt2.to_dict())))
    assert again.encode(UNICODE) == gpt2.encode(UNICODE) and again.pad_id == gpt2.pad_id
    gpt2.save(tmp_path / "gpt2.json")
    assert get_tokenizer(str(tmp_path / "gpt2.json")).vocab_size == 50258


# --- the pre-split regex ---------------------------------------------------------------------------------------

def test_split_matches_tiktoken(gpt2):
    text = UNICODE + " don't I'LL we're x\x1c\x1dy \u3000 z 3.14 e\u0301 " + _corpus(50)
    chunks = _gpt2_split_re().findall(text)
    assert "".join(chunks) == text
    # GPT-2's tokens never cross a chunk boundary, so encoding chunk by chunk must give the same ids.
    assert [i for c in chunks for i in gpt2.encode(c)] == gpt2.encode(text)
    regex = pytest.importorskip("regex")  # installed with tiktoken; the exact reference for \p{L}, \p{N}
    assert chunks == regex.findall(GPT2_PAT_STR, text) == regex.findall(gpt2.enc._pat_str, text)
    # GPT-2's original spelling of the pattern, which our `re` version follows, splits the same way
    original = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    assert chunks == regex.findall(original, text)


# --- our BPE ---------------------------------------------------------------------------------------------------

def test_trained_sizes_and_round_trip(trained):
    assert trained.vocab_size == 300
    assert (trained.eos_id, trained.pad_id) == (298, 299)
    assert trained.enc.n_vocab == 300
    text = _corpus(100, seed=1)
    ids = trained.encode(text)
    assert len(ids) < 0.65 * len(text.encode()), "42 merges should compress this repetitive text"
    assert trained.decode(ids) == text
    assert trained.decode(trained.encode(UNICODE)) == UNICODE  # unseen characters fall back to bytes
    assert trained.encode(EOS) != [trained.eos_id]
    assert trained.decode(ids + [trained.eos_id, trained.pad_id]) == text + EOS


def test_trained_save_load_and_dict(trained, tmp_path):
    path = str(tmp_path / "tok.json")
    trained.save(path)
    text = _corpus(50, seed=2) + UNICODE
    for again in (Tokenizer.load(path), get_tokenizer(path),
                  Tokenizer.from_dict(json.loads(json.dumps(trained.to_dict())))):
        assert again.encode(text) == trained.encode(text)
        assert (again.eos_id, again.pad_id, again.vocab_size) == (298, 299, 300)
        assert again.enc.name == "test_bpe"


def test_get_tokenizer_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        get_tokenizer(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "pat_str": "."}')
    with pytest.raises(ValueError, match="bad.json"):
        get_tokenizer(str(bad))


def _naive_bpe(text, n_merges):
    """Brute force: recount every pair after every merge; ties to the smallest pair. Returns the merge list."""
    words = Counter(tuple(c.encode()) for c in _gpt2_split_re().findall(text))
    merges = []
    for new in range(256, 256 + n_merges):
        pairs = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for w, f in words.items():
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            merged[tuple(out)] += f
        words = merged
    return merges


def test_trained_matches_brute_force():
    text = _corpus(300, seed=3)
    tok = Tokenizer.train(text, vocab_size=256 + 40 + 2)
    merges = _naive_bpe(text, 40)
    vocab = [bytes([b]) for b in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    assert len(set(vocab)) == len(vocab), "this corpus should not produce duplicate merges"
    assert {t: i for i, t in enumerate(vocab)} == tok.enc._mergeable_ranks
    # tiktoken merges by rank; applying our merges in training order to held-out text must agree with it.
    for chunk in _gpt2_split_re().findall(_corpus(30, seed=4)):
        ids = list(chunk.encode())
        for new, (a, b) in enumerate(merges, start=256):
            out, j = [], 0
            while j < len(ids):
                if j + 1 < len(ids) and (ids[j], ids[j + 1]) == (a, b):
                    out.append(new)
                    j += 2
                else:
                    out.append(ids[j])
                    j += 1
            ids = out
        assert tok.encode(chunk) == ids, chunk


def test_train_too_little_text():
    with pytest.raises(ValueError, match="ran out of pairs"):
        Tokenizer.train("ab ab", vocab_size=300)


# --- chat template ---------------------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "human", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]


def test_render_chat_mask(gpt2):
    ids, mask = render_chat(gpt2, CHAT)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert gpt2.decode(ids) == ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?" + EOS +
                                "\n\nHuman: Name a colour.\n\nAssistant: Blue." + EOS)
    learned = [i for i, m in zip(ids, mask) if m]
    assert gpt2.decode(learned) == " Hello! How can I help?" + EOS + " Blue." + EOS
    assert gpt2.decode([i for i, m in zip(ids, mask) if not m]) == (
        "\n\nHuman: Hi there\n\nAssistant:\n\nHuman: Name a colour.\n\nAssistant:")
    assert learned.count(gpt2.eos_id) == 2 and ids[-1] == gpt2.eos_id and mask[-1] == 1
    # the mask is two contiguous runs of ones, one per assistant reply
    switches = [k for k in range(1, len(mask)) if mask[k] != mask[k - 1]]
    assert len(switches) == 3 and mask[0] == 0


def test_render_prompt_is_prefix_of_chat(gpt2, trained):
    for tok in (gpt2, trained):
        prompt = render_prompt(tok, CHAT[:3])
        ids, mask = render_chat(tok, CHAT)
        assert ids[:len(prompt)] == prompt and all(mask[len(prompt):])  # prompt + reply, nothing re-tokenised
        assert prompt[-len(tok.encode(ASSISTANT)):] == tok.encode(ASSISTANT)
        assert render_chat(tok, CHAT[:3]) == (prompt, mask[:len(prompt)])
    with pytest.raises(ValueError, match="end with a user"):
        render_prompt(gpt2, CHAT)


def test_truncation_drops_oldest_exchange(gpt2):
    chat = CHAT + [{"role": "user", "content": "And another?"}, {"role": "assistant", "content": "Red."}]
    full, _ = render_chat(gpt2, chat)
    last_two = render_chat(gpt2, chat[2:])
    last_one = render_chat(gpt2, chat[4:])
    assert render_chat(gpt2, chat, max_tokens=len(full)) == render_chat(gpt2, chat)
    assert render_chat(gpt2, chat, max_tokens=len(full) - 1) == last_two
    assert render_chat(gpt2, chat, max_tokens=len(last_two[0])) == last_two
    assert render_chat(gpt2, chat, max_tokens=len(last_two[0]) - 1) == last_one
    k = len(last_one[0]) - 3  # the last exchange alone is too long: keep its end
    assert render_chat(gpt2, chat, max_tokens=k) == (last_one[0][-k:], last_one[1][-k:])
    for max_tokens in range(1, len(full) + 3):
        ids, mask = render_chat(gpt2, chat, max_tokens)
        assert len(ids) == len(mask) <= max_tokens
        assert ids == full[-len(ids):]  # whatever is kept is the end of the conversation
    assert render_prompt(gpt2, chat[:5], max_tokens=len(last_one[0])) == render_prompt(gpt2, chat[4:5])


@pytest.mark.parametrize("messages, reason", [
    ([], "non-empty list"),
    ([{"role": "assistant", "content": "hi"}], "should be from 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternates"),
    ([{"role": "system", "content": "a"}], "role 'system'"),
    ([{"role": "user"}], "string 'role' and 'content'"),
])
def test_render_chat_rejects_bad_messages(gpt2, messages, reason):
    with pytest.raises(ValueError, match=reason):
        render_chat(gpt2, messages)


def test_parse_hh():
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman:  c "
    assert parse_hh(text) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": " c "}]
    assert parse_hh("\n\nHuman: a\n\nAssistant:") == [{"role": "user", "content": "a"}]  # generation prompt
    with pytest.raises(ValueError, match="must start with"):
        parse_hh("Human: a\n\nAssistant: b")
    with pytest.raises(ValueError, match="alternate"):
        parse_hh("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c")


def test_parse_hh_real_record(gpt2):
    if not os.path.exists(HH_TEST):
        pytest.skip(f"{HH_TEST} not present")
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        chosen = json.loads(f.readline())["chosen"]
    messages = parse_hh(chosen)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "Do you know why turkeys became the official food of thanksgiving?"
    assert messages[1]["content"].startswith("To be honest, I don’t know")
    ids, mask = render_chat(gpt2, messages)
    assert gpt2.decode(ids) == chosen + EOS  # the template is HH's own format, byte for byte
    assert HUMAN in gpt2.decode(ids)
