"""The JSONL formats of the three datasets (SFT, preferences, prompts) and their strict loaders.

One JSON object per line; blank lines are skipped; a path ending in .gz is read (and written) with gzip.
Roles are "user" and "assistant" ("human" is accepted for "user"); a conversation starts with the user and
alternates. A "prompt" string that starts with "\\n\\nHuman:" is a whole HH-RLHF conversation (a trailing
"\\n\\nAssistant:" is allowed); any other prompt string is the user's single message.

SFT demonstrations, load_sft(path) -> list of conversations (message lists with >= 1 assistant turn):
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]}
    {"prompt": "Name a colour.", "response": "Blue."}
    {"prompt": "\\n\\nHuman: Hi!\\n\\nAssistant: Hello.\\n\\nHuman: Name a colour.", "response": "Blue."}

Preferences, load_preferences(path) -> list of {"prompt": messages ending with the user,
                                                "responses": [best, ..., worst]} (at least 2 responses):
    {"chosen": "\\n\\nHuman: Hi!\\n\\nAssistant: Hello, how can I help?", "rejected": "\\n\\nHuman: Hi!\\n\\nAssistant: What."}
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}
    {"prompt": "Name a colour.", "responses": ["Seven.", "Blue.", "Red."], "ranking": [1, 2, 0]}
  The first is Anthropic's HH-RLHF format: two whole conversations that share a prompt. The prompt is the
  shared text up to the last "\\n\\nAssistant:" before the two differ; the responses are what follows it.
  In the K-way format "ranking" lists indices into "responses", best first (InstructGPT ranks K = 4..9).

Prompts for RL, load_prompts(path) -> list of message lists ending with the user:
    {"prompt": "Write a haiku about rain."}
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "Write a haiku about rain."}]}

Other keys on a line (ids, sources) are ignored. Anything else wrong raises DataError("path:line: reason").
parse_sft / parse_preference / parse_prompt check one decoded line and raise ValueError(reason): a prepare
script can use them to skip and count the bad records of raw data that it does not control.
Command: none, this is a library imported by the train_*.py scripts and the data/*/prepare.py scripts.
"""
import gzip
import json
import os
import zlib

from tokenizer import ASSISTANT, HUMAN, check_messages, parse_hh


class DataError(ValueError):
    """A dataset file that cannot be used, with the path and line number in its message."""


# ------------------------------------------------------------------------------------------------------------
# Reading and writing JSONL

MAX_LINE_BYTES = 16 << 20  # a longer "line" is a binary or corrupt file, not a record: refused, not read whole


def read_jsonl(path):
    """Yield (line number, object) for each non-blank line; DataError("path:line: reason") on a missing file, a
    truncated or corrupt .gz, bytes that are not UTF-8, an over-long line, bad JSON or a line that is not an object.
    Lines are read as bytes and decoded one by one, so a decoding error names its own line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    lineno = 0
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            while True:
                raw = f.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    break
                lineno += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"{path}:{lineno}: a line of over {MAX_LINE_BYTES >> 20} MB: not a JSONL file?")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                    f"{e.start + 1}): a binary file, or another encoding?") from None
                if not line.strip():
                    continue
                if "\x00" in line:
                    raise DataError(f"{path}:{lineno}: a NUL byte: a binary file, not JSONL")
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, found {type(obj).__name__}")
                yield lineno, obj
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut-off .gz is an EOFError
        what = "a truncated or corrupt gzip file" if path.endswith(".gz") else "could not be read"
        raise DataError(f"{path}:{lineno + 1}: {what} ({type(e).__name__}: {str(e) or 'unexpected end'})") from None


def write_jsonl(path, rows) -> int:
    """Write rows (dicts) one per line, atomically: readers see the old file or the whole new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    n = 0
    with (gzip.open(tmp, "wt", encoding="utf-8") if path.endswith(".gz") else open(tmp, "w", encoding="utf-8")) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def _load(path, parse):
    out = []
    for lineno, obj in read_jsonl(path):
        try:
            out.append(parse(obj))
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
    if not out:
        raise DataError(f"{path}: no records (an empty file?)")
    return out


def load_sft(path) -> list[list[dict]]:
    return _load(path, parse_sft)


def load_preferences(path) -> list[dict]:
    return _load(path, parse_preference)


def load_prompts(path) -> list[list[dict]]:
    return _load(path, parse_prompt)


# ------------------------------------------------------------------------------------------------------------
# One line of each format

def _text(obj, key) -> str:
    if key not in obj:
        raise ValueError(f"missing key {key!r} (keys present: {sorted(obj)})")
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{key!r} is empty")
    return value


def _messages(value) -> list[dict]:
    messages = check_messages(value)  # types, roles, alternation
    for k, m in enumerate(messages):
        if not m["content"].strip():
            raise ValueError(f"message {k} ({m['role']}) has empty content")
    return messages


def _prompt(obj) -> list[dict]:
    """The "prompt" key as messages ending with the user."""
    text = _text(obj, "prompt")
    if not text.startswith(HUMAN):
        return [{"role": "user", "content": text}]
    messages = parse_hh(text)
    if messages[-1]["role"] != "user":
        raise ValueError("the HH prompt must end with a Human turn (optionally followed by an empty "
                         f"{ASSISTANT.strip()!r}), it ends with an assistant reply")
    return messages


def _only_one_format(obj, formats):
    """Which of the alternative key sets a line uses; refuse lines that mix two or match none."""
    found = [keys for keys in formats if keys[0] in obj]
    if len(found) != 1:
        alternatives = " or ".join("{" + ", ".join(map(repr, keys)) + "}" for keys in formats)
        raise ValueError(f"expected keys {alternatives}, found {sorted(obj)}")
    return found[0]


def parse_sft(obj: dict) -> list[dict]:
    keys = _only_one_format(obj, [("messages",), ("prompt", "response")])
    if keys == ("messages",):
        messages = _messages(obj["messages"])
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("'messages' has no assistant turn: nothing to learn from")
        return messages
    return _prompt(obj) + [{"role": "assistant", "content": _text(obj, "response")}]


def parse_preference(obj: dict) -> dict:
    # Tell the formats apart by their keys; "prompt" with "responses" is K-way, "prompt" alone explicit.
    if "responses" in obj:
        prompt = _prompt(obj)
        responses, ranking = obj["responses"], obj.get("ranking")
        if not isinstance(responses, list) or len(responses) < 2:
            raise ValueError(f"'responses' must be a list of at least 2 strings, got {responses!r:.80}")
        for k, r in enumerate(responses):
            if not isinstance(r, str) or not r.strip():
                raise ValueError(f"responses[{k}] must be a non-empty string, got {r!r:.80}")
        if (not isinstance(ranking, list) or any(type(i) is not int for i in ranking)
                or sorted(ranking) != list(range(len(responses)))):
            raise ValueError(f"'ranking' must be a permutation of 0..{len(responses) - 1} (indices into "
                             f"'responses', best first), got {ranking!r:.80}")
        return {"prompt": prompt, "responses": [responses[i] for i in ranking]}
    if "prompt" in obj:
        return {"prompt": _prompt(obj), "responses": [_text(obj, "chosen"), _text(obj, "rejected")]}
    if "chosen" in obj or "rejected" in obj:
        prompt_text, chosen, rejected = split_hh(_text(obj, "chosen"), _text(obj, "rejected"))
        return {"prompt": _prompt({"prompt": prompt_text}), "responses": [chosen, rejected]}
    raise ValueError(f"expected keys {{'chosen', 'rejected'}}, {{'prompt', 'chosen', 'rejected'}} or "
                     f"{{'prompt', 'responses', 'ranking'}}, found {sorted(obj)}")


def parse_prompt(obj: dict) -> list[dict]:
    keys = _only_one_format(obj, [("prompt",), ("messages",)])
    if keys == ("prompt",):
        return _prompt(obj)
    messages = _messages(obj["messages"])
    if messages[-1]["role"] != "user":
        raise ValueError("'messages' must end with a user turn (the one the policy answers)")
    return messages


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Two HH conversations -> (shared prompt ending with '\\n\\nAssistant:', chosen reply, rejected reply).

    The cut is the last '\\n\\nAssistant:' that lies wholly inside the common prefix. Usually the two differ
    only in the final reply; when they differ earlier, each "reply" is the rest of its conversation, later
    turns included, since that is what the labeller compared.
    """
    common = len(os.path.commonprefix([chosen, rejected]))  # character-wise longest common prefix
    cut = chosen.rfind(ASSISTANT, 0, common)
    if cut < 0:
        raise ValueError(f"'chosen' and 'rejected' differ before their first {ASSISTANT.strip()!r} turn, "
                         "so they share no prompt")
    cut += len(ASSISTANT)
    replies = [s[cut:][1:] if s[cut:].startswith(" ") else s[cut:] for s in (chosen, rejected)]
    for name, reply in zip(("chosen", "rejected"), replies):
        if not reply.strip():
            raise ValueError(f"the {name} reply is empty")
    return chosen[:cut], replies[0], replies[1]
