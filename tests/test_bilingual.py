"""An English doc and its Chinese translation say the same thing where it can be checked by machine.

    python -m pytest -q tests/test_bilingual.py

check_in_step(en_path, zh_path) compares two Markdown files and raises AssertionError listing every difference:

- Commands. (1) Every line of every code block (fenced ``` / ~~~ blocks and 4-space indented blocks), with its shell
  comment (`# ...` after a space, or a whole-line comment) removed, so that comments may be translated. These are
  compared as ordered lists: a translation keeps the document's structure, and a command moved to another
  section is a difference worth seeing. (2) Inline code spans that start with `python `, `bash `, `torchrun `
  or `pip `, compared as multisets: Chinese word order may move two commands within one sentence.
- Figures. Every number in the prose, headings and tables (image alt texts included), compared as multisets.
  Excluded on both sides alike: code blocks, inline code spans, link and image targets `](...)`, bare URLs, HTML
  tags and file names (`compare_seed2.md`). A number is digits with an optional sign, thousands separators, decimals
  and exponent; it is normalised: "8,000" -> "8000", "−0.47" / "-0.47" -> "-0.47", "+2.455" -> "2.455",
  "1.44×" -> "1.44", "98.4%" -> "98.4" (the ×/% suffix is dropped, so "1.44 倍" also matches). Digits glued on
  their left to a Latin letter, digit, `_` or `.` are part of a name, not a figure (`bf16`, `k3`); a sign glued
  to one is a hyphen (`GPT-2` reads 2); a Chinese character on the left does not count ("约3分钟" reads 3). Units are not compared, so
  "6 min 52 s" and "6 分 52 秒" agree while "6 分 51 秒" does not.
"""
import os
import re
from collections import Counter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMAND_PREFIXES = ("python ", "bash ", "torchrun ", "pip ")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
URL = re.compile(r"https?://\S+")
HTML_TAG = re.compile(r"</?[A-Za-z][\w-]*(?:\s[^<>]*)?>")
FILE_NAME = re.compile(r"[A-Za-z0-9_./-]*\.(?:md|py|png|jsonl|json|pt|txt|gz|sh)\b")
NUMBER = re.compile(
    r"(?<![A-Za-z0-9_.])([+\-−]?)"
    r"([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(\.[0-9]+)?([eE][+\-−]?[0-9]+)?"
)


def split_code(text):
    """(code lines, prose lines): code lines are those of fenced and 4-space indented blocks."""
    code, prose = [], []
    in_fence, prev_blank, prev_indented = False, True, False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            prev_blank, prev_indented = False, False
            continue
        indented = not in_fence and line.startswith("    ") and line.strip() and (prev_blank or prev_indented)
        if in_fence or indented:
            code.append(line)
        else:
            prose.append(line)
        prev_blank, prev_indented = not line.strip(), bool(indented)
    return code, prose


def code_commands(text):
    """The code blocks' lines, comments removed, in order."""
    out = []
    for line in split_code(text)[0]:
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def inline_commands(text):
    """Inline code spans of the prose that are commands."""
    spans = [m.group(2).strip() for line in split_code(text)[1] for m in INLINE_CODE.finditer(line)]
    return [s for s in spans if s.startswith(COMMAND_PREFIXES)]


def normalise(sign, integer, decimals, exponent):
    sign = "-" if sign in ("-", "−") else ""
    exponent = (exponent or "").replace("−", "-").replace("+", "")
    return sign + integer.replace(",", "") + (decimals or "") + exponent


def figures(text):
    """Every number outside code, links' targets, URLs and file names, normalised (see the module docstring)."""
    out = []
    for line in split_code(text)[1]:
        for pattern in (INLINE_CODE, LINK_TARGET, URL, HTML_TAG, FILE_NAME):
            line = pattern.sub(" ", line)
        out += [normalise(*m.groups()) for m in NUMBER.finditer(line)]
    return out


def _missing(what, a, b, en_name, zh_name):
    ca, cb = Counter(a), Counter(b)
    only_en, only_zh = sorted((ca - cb).elements()), sorted((cb - ca).elements())
    out = []
    if only_en:
        out.append(f"{what} in {en_name} but not {zh_name}: {only_en}")
    if only_zh:
        out.append(f"{what} in {zh_name} but not {en_name}: {only_zh}")
    return out


def differences(en_text, zh_text, en_name="en", zh_name="zh"):
    """Every way the two texts are out of step, as readable lines (empty when in step)."""
    out = []
    en_code, zh_code = code_commands(en_text), code_commands(zh_text)
    out += _missing("code lines", en_code, zh_code, en_name, zh_name)
    if not out and en_code != zh_code:
        i = next(i for i, (a, b) in enumerate(zip(en_code, zh_code)) if a != b)
        out.append(f"code lines in another order: line {i} is {en_code[i]!r} in {en_name}, {zh_code[i]!r} in {zh_name}")
    out += _missing("inline commands", inline_commands(en_text), inline_commands(zh_text), en_name, zh_name)
    out += _missing("figures", figures(en_text), figures(zh_text), en_name, zh_name)
    return out


def check_in_step(en_path, zh_path):
    """Raise AssertionError listing every command and figure that is in one file and not in the other."""
    with open(en_path, encoding="utf-8") as f:
        en = f.read()
    with open(zh_path, encoding="utf-8") as f:
        zh = f.read()
    diff = differences(en, zh, os.path.basename(en_path), os.path.basename(zh_path))
    assert not diff, "\n".join(diff)


def test_readme_in_step():
    check_in_step(os.path.join(ROOT, "README.md"), os.path.join(ROOT, "README.zh.md"))


def test_tutorial_in_step():
    en = os.path.join(ROOT, "docs", "tutorial.md")
    if not os.path.exists(en):
        pytest.skip("docs/tutorial.md does not exist yet")
    check_in_step(en, os.path.join(ROOT, "docs", "tutorial.zh.md"))


EN = """# Demo (`python run.py --n=3`)

It took **6 min 52 s** and 8,000 prompts; gold −0.47, 1.44× faster, 98.4% well formed. See [the study](docs/study2.md).

```bash
python train.py --lr=3e-4   # the defaults
```

| run | KL |
|---|---|
| GPT-2, bf16 | +2.455 |
"""
ZH = """# 演示（`python run.py --n=3`）

用时 **6 分 52 秒**，共 8000 条提示；gold 为 -0.47，快 1.44 倍，98.4% 格式正确，约3分钟。参见[研究](docs/study2.md)。

```bash
python train.py --lr=3e-4   # 默认值
```

| 运行 | KL |
|---|---|
| GPT-2，bf16 | 2.455 |
"""


def test_translation_style_is_not_a_difference():
    assert differences(EN, ZH.replace("，约3分钟", "")) == []
    assert figures("约3分钟，k3 与 bf16，GPT-2") == ["3", "2"]


def test_checker_reports_a_changed_figure_and_command(tmp_path):
    en, zh = tmp_path / "a.md", tmp_path / "a.zh.md"
    en.write_text(EN, encoding="utf-8")
    zh.write_text(ZH.replace("，约3分钟", "").replace("52 秒", "51 秒").replace("--lr=3e-4", "--lr=1e-4"), encoding="utf-8")
    with pytest.raises(AssertionError) as e:
        check_in_step(en, zh)
    msg = str(e.value)
    assert "figures in a.md but not a.zh.md: ['52']" in msg
    assert "figures in a.zh.md but not a.md: ['51']" in msg
    assert "code lines in a.md but not a.zh.md: ['python train.py --lr=3e-4']" in msg
    zh.write_text(ZH.replace("，约3分钟", "").replace("--n=3", "--n=4"), encoding="utf-8")
    with pytest.raises(AssertionError, match=r"inline commands in a.md but not a.zh.md: \['python run.py --n=3'\]"):
        check_in_step(en, zh)
