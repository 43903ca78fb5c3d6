"""JSONL loader tests: every documented format loads, every bad line names its file and line, HH pairs split."""
import gzip
import json
import os

import pytest

from data.formats import (DataError, load_preferences, load_prompts, load_sft, parse_preference, read_jsonl,
                          split_hh, write_jsonl)

HH_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_lines(path, lines):
    """Raw lines (dicts are JSON-encoded, strings written as they are), so tests can plant broken ones."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def test_load_sft_formats(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "human", "content": "Hi!"}, assistant("Hello.")], "id": 7},
        "",
        {"prompt": "Name a colour.", "response": "Blue."},
        {"prompt": "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant:", "response": "Blue."},
    ])
    assert load_sft(path) == [
        [user("Hi!"), assistant("Hello.")],
        [user("Name a colour."), assistant("Blue.")],
        [user("Hi!"), assistant("Hello."), user("Name a colour."), assistant("Blue.")],
    ]


def test_load_preferences_formats(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [
        {"chosen": "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?",
         "rejected": "\n\nHuman: Hi!\n\nAssistant: What."},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
        {"prompt": "Name a colour.", "responses": ["Seven.", "Blue.", "Red."], "ranking": [1, 2, 0]},
    ])
    assert load_preferences(path) == [
        {"prompt": [user("Hi!")], "responses": ["Hello, how can I help?", "What."]},
        {"prompt": [user("Name a colour.")], "responses": ["Blue.", "Seven."]},
        {"prompt": [user("Name a colour.")], "responses": ["Blue.", "Red.", "Seven."]},
    ]


def test_load_prompts_formats(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", [
        {"prompt": "Write a haiku about rain."},
        {"prompt": "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: A haiku?\n\nAssistant:"},
        {"messages": [user("Hi!"), assistant("Hello."), user("A haiku?")]},
    ])
    assert load_prompts(path) == [
        [user("Write a haiku about rain.")],
        [user("Hi!"), assistant("Hello."), user("A haiku?")],
        [user("Hi!"), assistant("Hello."), user("A haiku?")],
    ]


GOOD = {
    load_sft: {"prompt": "Hi", "response": "Hello"},
    load_preferences: {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
    load_prompts: {"prompt": "Hi"},
}


@pytest.mark.parametrize("loader, bad, reason", [
    (load_sft, '{"prompt": "Hi", "response": "Hello"', "bad JSON"),
    (load_sft, '["not", "an", "object"]', "expected a JSON object"),
    (load_sft, {"prompt": "Hi"}, "missing key 'response'"),
    (load_sft, {"prompt": "Hi", "response": "  "}, "'response' is empty"),
    (load_sft, {"prompt": "Hi", "response": 3}, "must be a string"),
    (load_sft, {"messages": [user("Hi")]}, "no assistant turn"),
    (load_sft, {"messages": [{"role": "system", "content": "Be nice"}, assistant("ok")]}, "role 'system'"),
    (load_sft, {"messages": [assistant("Hello"), user("Hi")]}, "should be from 'user'"),
    (load_sft, {"messages": [user("Hi"), assistant("")]}, "empty content"),
    (load_sft, {"messages": [user("Hi"), assistant("Hello")], "prompt": "Hi"}, "expected keys"),
    (load_sft, {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello", "response": "Bye"}, "must end with a Human turn"),
    (load_preferences, {"prompt": "Hi", "chosen": "Hello", "rejected": ""}, "'rejected' is empty"),
    (load_preferences, {"prompt": "Hi", "chosen": "Hello"}, "missing key 'rejected'"),
    (load_preferences, {"prompt": "Hi", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "permutation"),
    (load_preferences, {"prompt": "Hi", "responses": ["a", "b"], "ranking": [0, 2]}, "permutation"),
    (load_preferences, {"prompt": "Hi", "responses": ["a", "b"], "ranking": [True, False]}, "permutation"),
    (load_preferences, {"prompt": "Hi", "responses": ["a", "b"]}, "permutation"),
    (load_preferences, {"prompt": "Hi", "responses": ["a"], "ranking": [0]}, "at least 2"),
    (load_preferences, {"prompt": "Hi", "responses": ["a", ""], "ranking": [0, 1]}, r"responses\[1\]"),
    (load_preferences, {"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": "\n\nHuman: Yo\n\nAssistant: a"},
     "share no prompt"),
    (load_preferences, {"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": "\n\nHuman: Hi\n\nAssistant: "},
     "rejected reply is empty"),
    (load_preferences, {"chosen": "Hi there", "rejected": "Hi you"}, "share no prompt"),
    (load_preferences, {"text": "Hi"}, "expected keys"),
    (load_prompts, {"messages": [user("Hi"), assistant("Hello")]}, "must end with a user turn"),
    (load_prompts, {"prompt": ""}, "'prompt' is empty"),
    (load_prompts, {"prompt": "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c"}, "roles must alternate"),
])
def test_bad_line_names_file_and_line(tmp_path, loader, bad, reason):
    path = write_lines(tmp_path / "data.jsonl", [GOOD[loader], "", bad, GOOD[loader]])
    assert len(loader(write_lines(tmp_path / "ok.jsonl", [GOOD[loader]]))) == 1  # the good line alone loads
    with pytest.raises(DataError, match=reason) as e:
        loader(path)
    assert str(e.value).startswith(f"{path}:3: "), str(e.value)  # blank line 2 still counts


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.jsonl")
    for loader in (load_sft, load_preferences, load_prompts):
        with pytest.raises(DataError, match="absent.jsonl"):
            loader(path)


def test_gzip_and_write_jsonl(tmp_path):
    rows = [{"prompt": "Café ’quoted’ 日本", "response": "Oui."}, {"prompt": "Hi", "response": "Hello"}]
    path = str(tmp_path / "sub" / "sft.jsonl.gz")
    assert write_jsonl(path, rows) == 2
    with open(path, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # really gzip
    assert os.listdir(tmp_path / "sub") == ["sft.jsonl.gz"]  # no temporary file left behind
    assert [obj for _, obj in read_jsonl(path)] == rows
    assert load_sft(path)[0] == [user("Café ’quoted’ 日本"), assistant("Oui.")]
    # hand-written gzip with a bad line: the line number still comes through
    bad = write_lines(tmp_path / "bad.jsonl.gz", [rows[0], "{oops"])
    with pytest.raises(DataError, match="bad.jsonl.gz:2: bad JSON"):
        load_sft(bad)
    # plain path, overwriting an existing file
    plain = str(tmp_path / "sft.jsonl")
    write_jsonl(plain, rows)
    write_jsonl(plain, rows[:1])
    assert [obj for _, obj in read_jsonl(plain)] == rows[:1]


def test_split_hh():
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant:"
    assert split_hh(prompt + " Blue, the sky's.", prompt + " Blue") == (prompt, "Blue, the sky's.", "Blue")
    assert split_hh(prompt + " Same", prompt + " Same") == (prompt, "Same", "Same")  # ties are allowed
    # Conversations that diverge before the last turn: cut at the last shared "\n\nAssistant:".
    first = "\n\nHuman: Hi\n\nAssistant:"
    chosen = first + " Hello.\n\nHuman: Bye\n\nAssistant: Bye!"
    rejected = first + " Go.\n\nHuman: Bye\n\nAssistant: ..."
    assert split_hh(chosen, rejected) == (first, "Hello.\n\nHuman: Bye\n\nAssistant: Bye!",
                                          "Go.\n\nHuman: Bye\n\nAssistant: ...")
    # They differ right after "\n\nAssist": that marker is not wholly shared, so the cut is the one before.
    assert split_hh(first + " A\n\nAssistant: x", first + " A\n\nAssistance")[0] == first
    with pytest.raises(ValueError, match="share no prompt"):
        split_hh("\n\nHuman: Hi\n\nAssistant: a", "\n\nHuman: Ho\n\nAssistant: a")


def _render_hh(messages):
    return "".join(("\n\nHuman: " if m["role"] == "user" else "\n\nAssistant: ") + m["content"] for m in messages)


@pytest.mark.parametrize("subset", ["helpful-base", "harmless-base"])
def test_real_hh_pairs(subset):
    path = os.path.join(HH_DIR, subset, "test.jsonl.gz")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    n = bad = 0
    for _, obj in read_jsonl(path):
        n += 1
        try:
            pair = parse_preference(obj)
        except ValueError:
            bad += 1  # HH has a few broken records (two Assistant turns in a row, empty replies)
            continue
        prompt, (chosen, rejected) = pair["prompt"], pair["responses"]
        assert prompt[-1]["role"] == "user" and len(prompt) % 2 == 1
        # Rendering the parsed prompt + a reply gives back the original conversation, byte for byte.
        assert _render_hh(prompt) + "\n\nAssistant: " + chosen == obj["chosen"]
        assert _render_hh(prompt) + "\n\nAssistant: " + rejected == obj["rejected"]
    assert n > 2000 and bad < 0.01 * n, (n, bad)
