"""The tokenizer and the chat template: text <-> token ids for every stage of the pipeline.

Two tokenizers, both served by tiktoken so encoding is fast and identical everywhere:

- `Tokenizer.gpt2()`: GPT-2's BPE (50,257 tokens, EOS = 50256) plus one extra special token PAD = 50257,
  so padding can never be confused with a real end of text. vocab_size = 50,258.
- `Tokenizer.train(text, vocab_size)`: our own byte-level BPE (the minbpe / nanochat recipe, written from
  scratch): GPT-2's pre-split regex, then greedy merges of the most frequent adjacent pair. Used for the
  small from-scratch models, where a 50k-row embedding would dwarf the rest of the network.

The chat template is Anthropic's HH-RLHF one ("\\n\\nHuman: ...\\n\\nAssistant: ..."), so the HH data needs no
conversion. `render_chat` turns a conversation into ids plus a 0/1 loss mask (1 on the assistant's words and
its EOS: SFT learns only what the assistant says) and `render_prompt` gives a generation prompt.

Reads/writes: a trained BPE is saved as one JSON file (`save`/`load`), and `to_dict` is stored in every
checkpoint so later stages rebuild exactly the tokenizer the model was trained with.
Command: none, this is a library (`get_tokenizer("gpt2")` or `get_tokenizer("path/to/tok.json")`).
"""
import base64
import functools
import heapq
import json
import os
import re
import sys
import unicodedata
from collections import Counter, defaultdict

import tiktoken

EOS = "<|endoftext|>"
PAD = "<|pad|>"

# GPT-2's pre-split pattern, as tiktoken writes it for its "gpt2" encoding. Tokens never cross the boundaries
# of these chunks: contractions, words with their leading space, numbers, punctuation runs, whitespace.
# It splits exactly like GPT-2's original  's|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+  :
# tiktoken rewrote it with possessive quantifiers (++) for speed; the chunks are the same.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer:
    """A tiktoken Encoding with EOS and PAD as special tokens, and the few methods the pipeline needs."""

    def __init__(self, enc: tiktoken.Encoding, is_gpt2: bool = False):
        self.enc = enc
        self.is_gpt2 = is_gpt2  # GPT-2 serialises by name: its 50k merges come from tiktoken, not our files
        self.eos_id = enc.encode_single_token(EOS)
        self.pad_id = enc.encode_single_token(PAD)
        assert self.eos_id != self.pad_id, f"EOS and PAD must be distinct ids, both are {self.eos_id}"
        self.vocab_size = enc.n_vocab  # every id incl. the specials: the model's embedding has this many rows

    def encode(self, text: str) -> list[int]:
        # Ordinary text only: a user typing "<|endoftext|>" gets the plain-text tokens of that string, never the
        # EOS id. Special ids are placed by code (render_chat), not by whatever the data happens to contain.
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):  # a 1-D tensor or numpy array
            ids = ids.tolist()
        # PAD is bookkeeping, never text; EOS stays visible so a reader sees where a response ended.
        return self.enc.decode([i for i in ids if i != self.pad_id])

    # --- construction -------------------------------------------------------------------------------------

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        return cls(_gpt2_encoding(), is_gpt2=True)

    @classmethod
    def train(cls, text: str, vocab_size: int, name: str = "bpe") -> "Tokenizer":
        """Byte-level BPE on `text`: 256 byte tokens + (vocab_size - 258) merges + EOS + PAD = vocab_size ids."""
        assert vocab_size >= 258, f"vocab_size must leave room for 256 bytes + EOS + PAD, got {vocab_size}"
        ranks = _train_bpe(text, vocab_size - 2)
        specials = {EOS: vocab_size - 2, PAD: vocab_size - 1}
        return cls(tiktoken.Encoding(name, pat_str=GPT2_PAT_STR, mergeable_ranks=ranks, special_tokens=specials))

    # --- serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        if self.is_gpt2:
            return {"name": "gpt2"}
        ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        assert [r for _, r in ranks] == list(range(len(ranks))), "mergeable ranks must be the ids 0..n-1"
        return {
            "name": self.enc.name,
            "pat_str": self.enc._pat_str,
            # token bytes in rank order (index = rank = id); base64 because most merges are not valid UTF-8
            "mergeable_ranks": [base64.b64encode(tok).decode("ascii") for tok, _ in ranks],
            "special_tokens": dict(self.enc._special_tokens),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Tokenizer":
        if "mergeable_ranks" not in d:
            assert d.get("name") == "gpt2", f"a tokenizer dict without merges must be {{'name': 'gpt2'}}, got {d}"
            return cls.gpt2()
        ranks = {base64.b64decode(tok): rank for rank, tok in enumerate(d["mergeable_ranks"])}
        enc = tiktoken.Encoding(d["name"], pat_str=d["pat_str"], mergeable_ranks=ranks,
                                special_tokens={k: int(v) for k, v in d["special_tokens"].items()})
        return cls(enc)

    def save(self, path: str):
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written tokenizer behind

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def get_tokenizer(spec: str) -> Tokenizer:
    """'gpt2', or the path of a file written by Tokenizer.save."""
    spec = os.fspath(spec)
    if spec == "gpt2":
        return Tokenizer.gpt2()
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"tokenizer {spec!r}: no such file (expected 'gpt2' or a file from Tokenizer.save)")
    try:
        return Tokenizer.load(spec)
    except (ValueError, KeyError, TypeError, AssertionError) as e:  # bad JSON, missing keys, wrong types
        raise ValueError(f"tokenizer file {spec}: not a valid tokenizer ({type(e).__name__}: {e})") from None


@functools.lru_cache(maxsize=1)
def _gpt2_encoding() -> tiktoken.Encoding:
    # tiktoken's documented way to extend an encoding: reuse its ranks, add special tokens.
    base = tiktoken.get_encoding("gpt2")
    return tiktoken.Encoding("gpt2", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                             special_tokens={**base._special_tokens, PAD: base.n_vocab})


# ------------------------------------------------------------------------------------------------------------
# BPE training

@functools.lru_cache(maxsize=1)
def _gpt2_split_re() -> re.Pattern:
    """GPT2_PAT_STR for Python's `re`, which has no \\p{..} classes (in GPT-2's original spelling).

    tiktoken splits inside Rust and does not expose the chunks, and the `regex` module that understands \\p{L}
    is not one of our dependencies. So we spell the three classes out: \\p{L} and \\p{N} as explicit code point
    ranges read from unicodedata, \\s as Unicode's White_Space list (what Rust's \\s means; Python's own \\s also
    matches \\x1c-\\x1f). tests/test_tokenizer.py checks the chunks against tiktoken's pattern. Only training
    uses this: a rare disagreement would change which merges get learned, never what encode/decode do.
    """
    def ranges(pred):
        out, start = [], None
        for cp in range(sys.maxunicode + 2):
            inside = cp <= sys.maxunicode and pred(unicodedata.category(chr(cp)))
            if inside and start is None:
                start = cp
            elif not inside and start is not None:
                out.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
                start = None
        return "".join(out)
    L = ranges(lambda cat: cat[0] == "L")
    N = ranges(lambda cat: cat[0] == "N")
    S = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
    return re.compile(rf"""'(?:[sdmt]|ll|ve|re)| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+""")


def _train_bpe(text: str, n_ordinary: int) -> dict[bytes, int]:
    """Greedy byte-pair merges until there are n_ordinary tokens. Returns {token bytes: rank}.

    tiktoken applies merges lowest rank first, so a token's rank must be its merge order: bytes are ranks
    0..255 and the k-th merge gets rank 255 + k. Ties between equally frequent pairs go to the smallest
    (left id, right id), so training is deterministic.
    """
    # Work on unique chunks with their counts: a 5 MB story corpus has a few thousand distinct words.
    chunk_counts = Counter(_gpt2_split_re().findall(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # each word: a list of token ids
    freqs = list(chunk_counts.values())

    pair_counts = defaultdict(int)  # (left id, right id) -> occurrences in the corpus
    where = defaultdict(set)        # (left id, right id) -> indices of the words that contain it
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            where[pair].add(i)
    # Max-heap of (-count, pair). Counts change as we merge; instead of updating entries in place we push a
    # fresh one and skip stale ones when they surface (an entry is current iff its count is the live count).
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([b]) for b in range(256)]  # id -> bytes
    ranks = {tok: i for i, tok in enumerate(vocab)}  # bytes -> id
    while len(vocab) < n_ordinary:
        while heap and -heap[0][0] != pair_counts.get(heap[0][1], 0):
            heapq.heappop(heap)
        if not heap:
            raise ValueError(f"the training text ran out of pairs to merge at {len(vocab)} tokens; "
                             f"use more text or a vocab_size below {len(vocab) + 2}")
        _, (a, b) = heapq.heappop(heap)
        merged = vocab[a] + vocab[b]
        if merged in ranks:
            # Two different pairs can spell the same bytes ("a"+"bc" after "ab"+"c"). tiktoken keys tokens by
            # their bytes, so reuse the id: it costs no vocab slot and tiktoken would merge it the same way.
            new = ranks[merged]
        else:
            new = ranks[merged] = len(vocab)
            vocab.append(merged)
        # Only the words containing (a, b) change: take their pairs out, merge, put the new pairs back.
        touched = set()
        for i in where.pop((a, b)):
            w, f = words[i], freqs[i]
            for pair in zip(w, w[1:]):
                pair_counts[pair] -= f
                touched.add(pair)
            out, j = [], 0
            while j < len(w):  # left to right, non-overlapping: "aaa" -> ["aa", "a"], as tiktoken does
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for pair in zip(out, out[1:]):
                pair_counts[pair] += f
                where[pair].add(i)
                touched.add(pair)
        for pair in touched:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair]
                where.pop(pair, None)
    return ranks


# ------------------------------------------------------------------------------------------------------------
# Chat format (Anthropic HH-RLHF)

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLES = {"user": "user", "human": "user", "assistant": "assistant"}  # accepted role names -> canonical


def parse_hh(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{'role': 'user', 'content': 'a'}, {'role': 'assistant', ...}].

    A trailing '\\n\\nAssistant:' with nothing after it is a generation prompt, not a turn, and is dropped,
    so HH-style prompts parse to messages that end with the user.
    """
    if not text.startswith(HUMAN):
        raise ValueError(f"an HH conversation must start with {HUMAN!r}, this one starts with {text[:20]!r}")
    parts = re.split(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})", text)  # ['', marker, content, marker, ...]
    messages = []
    for k, (marker, content) in enumerate(zip(parts[1::2], parts[2::2])):
        role = "user" if marker == HUMAN else "assistant"
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"HH turn {k + 1} is {marker.strip()!r} but should be {expected!r}: roles must alternate")
        messages.append({"role": role, "content": content[1:] if content.startswith(" ") else content})
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages.pop()
    return messages


def check_messages(messages) -> list[dict]:
    """Validate a conversation and return it with canonical roles ('human' -> 'user')."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list, got {type(messages).__name__} {messages!r:.60}")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {k} must be a dict with string 'role' and 'content', got {m!r:.80}")
        role = ROLES.get(m["role"].lower())
        if role is None:
            raise ValueError(f"message {k} has role {m['role']!r}; expected one of {sorted(ROLES)}")
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {k} is from {role!r} but should be from {expected!r}: a conversation "
                             f"starts with the user and alternates user/assistant")
        out.append({"role": role, "content": m["content"]})
    return out


def render_chat(tok: Tokenizer, messages, max_tokens: int | None = None, cuts=None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a same-length 0/1 mask of the tokens to learn from.

    user turn       encode("\\n\\nHuman: " + content)              mask 0
    assistant turn  encode("\\n\\nAssistant:")                      mask 0
                    encode(" " + content) + [EOS]                  mask 1
    ends with user  encode("\\n\\nAssistant:")                      mask 0  (the generation prompt)

    Each segment is encoded on its own and the ids concatenated, rather than encoding the whole string: BPE
    could otherwise merge across a turn boundary, and the prompt's tokens during training would not be the
    prompt's tokens at generation time. This way a prompt is always an exact prefix of prompt + response.

    max_tokens: drop the oldest exchanges (a user turn and its reply) first, as InstructGPT/ChatGPT do for long
    conversations, always keeping the last one; if that alone is too long keep its last max_tokens tokens.
    cuts: an optional collections.Counter that counts "turns_dropped" and "cut" (the last exchange cut short,
    its start lost), so that a caller can say once per run how much of its data was shortened.
    """
    messages = check_messages(messages)
    exchanges = []  # one (ids, mask) per user turn + its assistant reply, or + the generation prompt
    for k in range(0, len(messages), 2):
        ids = tok.encode(HUMAN + " " + messages[k]["content"])
        mask = [0] * len(ids)
        head = tok.encode(ASSISTANT)
        ids += head
        mask += [0] * len(head)
        if k + 1 < len(messages):
            reply = tok.encode(" " + messages[k + 1]["content"]) + [tok.eos_id]
            ids += reply
            mask += [1] * len(reply)
        exchanges.append((ids, mask))

    if max_tokens is not None:
        assert max_tokens > 0, f"max_tokens must be positive, got {max_tokens}"
        total = sum(len(ids) for ids, _ in exchanges)
        while len(exchanges) > 1 and total > max_tokens:
            total -= len(exchanges.pop(0)[0])
            if cuts is not None:
                cuts["turns_dropped"] += 1
    ids = [i for e, _ in exchanges for i in e]
    mask = [m for _, e in exchanges for m in e]
    if max_tokens is not None and len(ids) > max_tokens:
        ids, mask = ids[-max_tokens:], mask[-max_tokens:]  # left truncation: the end is what gets answered
        if cuts is not None:
            cuts["cut"] += 1
    return ids, mask


def render_prompt(tok: Tokenizer, messages, max_tokens: int | None = None, cuts=None) -> list[int]:
    """Ids of a conversation that ends with the user, followed by '\\n\\nAssistant:' for the model to continue."""
    messages = check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user turn, this one ends with the assistant")
    return render_chat(tok, messages, max_tokens, cuts)[0]
