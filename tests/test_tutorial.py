"""docs/tutorial.md runs as written and prints what it says it prints.

    python -m pytest -q tests/test_tutorial.py

The tutorial is read, not restated here. Its steps are its fenced ```bash NAME blocks, one command each, and the
```text block right after one is the output a reader should expect. Its claims are the comments
`<!-- check: EXPR -->` under a step: EXPR is a Python expression over the runs, by NAME:

    pg.it("adv_var")      the values of a key over the run's per-iteration lines ("ppo iter ...")
    pg.ev("gold")         the same over its evaluation lines ("eval ...")
    pg.sum("gold_after")  a figure of its "summary: ..." line
    pg.all("score")       the key over every line, whatever its kind (sample.py prints one "score ..." line)
    pg.count("text")      how many lines of the output contain the text
    pg.lines              its output's lines
    mean(xs), about(x, v, tol) (|x − v| ≤ tol), and Python's min, max, abs, len, all, any, zip, set

Every number a check states (a figure or a factor; not an index) must also stand in the prose of its section, so
the text cannot say one thing while the test checks another; and the Chinese version carries the same checks.

The run: a clean checkout (the repository's files without out/ or the generated data) in a temporary folder, every
command through bash from its root, as a reader would type it, two at a time (a step waits for the steps whose
--out_dir it reads). Each command must succeed in under 60 s of CPU time; the expected lines must have the printed
lines' form (the same words, any numbers; "..." stands for anything); every check must hold. About 2 minutes on
2 cores alone. In a whole session the run starts with the session, at the lowest CPU priority (nice 19), on the
core the other tests, mostly one-threaded, leave idle (tests/conftest.py); the CPU limit is CPU time, not wall
time, so this cannot change a verdict. TUTORIAL_OUTPUTS=out.json keeps every command's output (to refresh the
page's blocks). The checker itself
is tested on a deliberately wrong tutorial, and --critic=0 (the REINFORCE step's flag) against the return-to-go.
"""
import ast
import concurrent.futures
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from test_bilingual import figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "tutorial.md")
DOC_ZH = os.path.join(ROOT, "docs", "tutorial.zh.md")
CPU_LIMIT_S = 60  # "under a minute each on 2 cores": the command's own CPU time (user + sys), immune to a busy machine
WORKERS = 2       # the tutorial's commands use one thread each: two at a time fill a 2-core machine

FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)\s*(.*?)\s*$")
CHECK = re.compile(r"<!--\s*check:\s*(.*?)\s*-->")
OUT_DIR = re.compile(r"--out_dir=(\S+)")
NUMBER = r"[+\-−]?\d+(?:[.,]\d+)*(?:[eE][+\-]?\d+)?"


# ----------------------------------------------------------------------------------------------------------------
# reading the tutorial


def blocks(text):
    """The document as items: ("code", lang, info, lines, line number) for fenced blocks, ("text", line, number)."""
    items, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line.strip())
        if fence is None and m:
            fence, lang, info, body, start = m.group(1), m.group(2), m.group(3), [], n
        elif fence is not None and line.strip() == fence:
            items.append(("code", lang, info, body, start))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            items.append(("text", line, n))
    return items


def parse(text):
    """(steps, checks, prose). steps: [{name, command, expected, section, line}] in document order, expected being
    the lines of the ```text block that follows a step's block (blank lines between allowed); checks: [{expr,
    section, line}]; prose: each section's headings and text without code blocks and check comments."""
    steps, checks, prose, section = [], [], {}, ""
    items = blocks(text)
    for i, item in enumerate(items):
        if item[0] == "text":
            _, line, n = item
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            checks += [{"expr": c.group(1), "section": section, "line": n} for c in CHECK.finditer(line)]
            prose.setdefault(section, []).append(CHECK.sub(" ", line))
            continue
        _, lang, name, body, n = item
        if lang != "bash":
            continue
        assert name, f"tutorial line {n}: a ```bash block without a step name (every command is run by the test)"
        assert len(body) == 1, f"tutorial line {n}: step {name} has {len(body)} lines: one command per step"
        assert name not in {s["name"] for s in steps}, f"tutorial line {n}: step name {name} twice"
        j = i + 1
        while j < len(items) and items[j][0] == "text" and not items[j][1].strip():
            j += 1
        expected = items[j][3] if j < len(items) and items[j][0] == "code" and items[j][1] == "text" else None
        steps.append({"name": name, "command": body[0].strip(), "expected": expected, "section": section, "line": n})
    return steps, checks, {k: "\n".join(v) for k, v in prose.items()}


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def stated_numbers(expr):
    """The numbers a check states: every numeric literal of EXPR except indices, slice bounds and 0 (a sign)."""
    tree = ast.parse(expr, mode="eval")
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            skip |= {id(n) for n in ast.walk(node.slice)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float) and id(node) not in skip \
                and node.value != 0:
            out += figures(ast.get_source_segment(expr, node))
    return out


# ----------------------------------------------------------------------------------------------------------------
# a run's output, as the checks read it


def fields(line):
    """'ppo iter 3/20 | score +0.518 | kl 0.522' -> {'ppo iter': 3, 'score': 0.518, 'kl': 0.522}; the summary line's
    'summary: a 1.0, b 2.0' -> {'a': 1.0, 'b': 2.0}."""
    parts = line[len("summary: "):].split(", ") if line.startswith("summary: ") else line.split(" | ")
    out = {}
    for part in parts:
        m = re.match(r"\s*(.*?)\s+(" + NUMBER + r")(?=$|[\s/%(])", part)
        if m:
            out[m.group(1)] = float(m.group(2).replace("−", "-").replace(",", ""))
    return out


class Run:
    """One command's output. Every lookup is recorded in `log`, so that a failed check shows what it read."""

    def __init__(self, name, output, log):
        self.name, self.lines, self.log = name, output.splitlines(), log

    def _values(self, key, prefixes, what):
        vals = [f[key] for f in (fields(x) for x in self.lines if x.startswith(prefixes)) if key in f]
        assert vals, f"step {self.name}: no {what} line prints {key!r}"
        self.log.append(f"{self.name}.{what}({key!r}) = {[round(v, 4) for v in vals]}")
        return vals

    def it(self, key):
        return self._values(key, ("ppo iter", "sft step", "rm step"), "it")

    def ev(self, key):
        return self._values(key, ("eval ",), "ev")

    def sum(self, key):
        return self._values(key, ("summary: ",), "sum")[-1]

    def all(self, key):
        return self._values(key, ("",), "all")

    def count(self, text):
        n = sum(text in x for x in self.lines)
        self.log.append(f"{self.name}.count({text!r}) = {n}")
        return n


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def about(x, value, tol):
    return abs(x - value) <= tol


def evaluate(check, outputs):
    """None if the check holds, else a message with the expression and everything it read."""
    log = []
    env = {name: Run(name, out, log) for name, out in outputs.items()}
    env.update(mean=mean, about=about, min=min, max=max, abs=abs, len=len, all=all, any=any, zip=zip, set=set)
    try:
        ok = eval(check["expr"], {"__builtins__": {}}, env)
    except Exception as e:  # a missing step or key is a failure of the tutorial, not of the test
        return f"line {check['line']}: {check['expr']}\n  could not be evaluated: {type(e).__name__}: {e}"
    if ok is True:
        return None
    return f"line {check['line']}: {check['expr']} is {ok!r}\n  " + "\n  ".join(log)


def form(expected_line):
    """A regex for a printed line of this form: the same words, any numbers, '...' for anything."""
    out = []
    for i, piece in enumerate(expected_line.rstrip().split("...")):
        if i:
            out.append(".*?")
        for j, text in enumerate(re.split(NUMBER, piece)):
            if j:
                out.append(NUMBER)
            out.append(re.escape(text))
    return re.compile("".join(out) + r"\s*$")


def form_mismatches(step, output):
    """The expected lines of a step that no printed line has the form of."""
    printed = [line.rstrip() for line in output.splitlines()]
    bad = []
    for line in step["expected"] or []:
        if line.strip() in ("", "..."):
            continue
        rx = form(line)
        if not any(rx.match(p) for p in printed):
            bad.append(line)
    return bad


# ----------------------------------------------------------------------------------------------------------------
# running it on a clean checkout


def clean_checkout(dst):
    """The repository's files as a fresh clone has them (tracked, plus new files that git does not ignore)."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but runs and generated data
        names = [os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, fs in os.walk(ROOT) for f in fs
                 if not re.match(r"(\.git|\.venv|venv|out|data/minichat|.*__pycache__|\.pytest_cache)(/|$)",
                                 os.path.relpath(d, ROOT))]
    for name in filter(None, names):
        src = os.path.join(ROOT, name)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, name)) or dst, exist_ok=True)
            shutil.copy2(src, os.path.join(dst, name))
    assert not os.path.exists(os.path.join(dst, "out")), "the clean checkout has runs in it"


RUNNING = set()  # the process groups of the commands running now (killed if the session ends first)


def run_command(command, cwd, timeout=300, nice=0):
    """bash -c command in cwd, with this Python first on the PATH (the reader's activated environment), at CPU
    priority `nice` -> (exit status, output, CPU seconds of the command and its children, wall seconds)."""
    t0 = time.time()
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    prefix = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    # its own process group, to kill it whole; not its own session: Linux schedules each session as one group
    # (autogroup), which would give a niced command a core's share whatever its nice value
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    proc = subprocess.Popen(prefix + ["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, **group)
    RUNNING.add(proc.pid)
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, 9))
    timer.start()
    try:
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
        RUNNING.discard(proc.pid)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, output, usage.ru_utime + usage.ru_stime, time.time() - t0


def run_all(steps, cwd, workers=WORKERS, nice=0, stop=None):
    """Every step, at most `workers` at a time, each after the steps whose --out_dir its command reads, until the
    event `stop` is set. Returns {name: {rc, output, cpu, wall}}; a step whose dependency failed is not run (rc
    None)."""
    outs = {s["name"]: OUT_DIR.search(s["command"]) for s in steps}
    deps = {s["name"]: [t["name"] for t in steps[:i] if outs[t["name"]]
                        and outs[t["name"]].group(1).rstrip("/") + "/" in s["command"]]
            for i, s in enumerate(steps)}
    results, running, todo = {}, {}, list(steps)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        while (todo and not (stop and stop.is_set())) or running:
            for s in list(todo) if not (stop and stop.is_set()) else []:
                if len(running) >= workers:
                    break
                if any(d not in results for d in deps[s["name"]]):
                    continue
                todo.remove(s)
                if any(results[d]["rc"] != 0 for d in deps[s["name"]]):
                    results[s["name"]] = {"rc": None, "output": "not run: a step it reads failed", "cpu": 0, "wall": 0}
                    continue
                running[pool.submit(run_command, s["command"], cwd, nice=nice)] = s["name"]
            if not running:
                continue
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                rc, output, cpu, wall = f.result()
                results[running.pop(f)] = {"rc": rc, "output": output, "cpu": cpu, "wall": wall}
    return results


BACKGROUND = {}  # the run started with the session (tests/conftest.py): its thread, stop event and result


def start_in_background(work):
    """Start the tutorial's run on a clean checkout in `work`, niced, in a thread; the fixture below waits for it."""
    steps = parse(read(DOC))[0]
    clean_checkout(str(work))
    stop, box = threading.Event(), {}

    def run():
        try:
            box["results"] = run_all(steps, str(work), nice=19, stop=stop)
        except BaseException as e:  # shown by the fixture, in the test that needs the run
            box["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    BACKGROUND.update(thread=thread, stop=stop, box=box, t0=time.time())
    thread.start()


def stop_background():
    """The session is over: stop scheduling, kill what still runs."""
    if BACKGROUND:
        BACKGROUND["stop"].set()
        for pid in list(RUNNING):
            try:
                os.killpg(pid, 9)
            except ProcessLookupError:
                pass
        BACKGROUND["thread"].join(timeout=30)


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    steps, checks, prose = parse(read(DOC))
    if BACKGROUND:
        BACKGROUND["thread"].join()
        if "error" in BACKGROUND["box"]:
            raise BACKGROUND["box"]["error"]
        t0, results = BACKGROUND["t0"], BACKGROUND["box"]["results"]
    else:
        work = tmp_path_factory.mktemp("checkout")
        clean_checkout(str(work))
        t0 = time.time()
        results = run_all(steps, str(work))
    print(f"\ntutorial: {len(steps)} commands in {time.time() - t0:.0f} s wall, "
          f"{sum(r['cpu'] for r in results.values()):.0f} s CPU")
    for s in steps:
        r = results[s["name"]]
        print(f"  {s['name']:<12} {r['cpu']:5.1f} s CPU {r['wall']:5.1f} s wall  {s['command'][:80]}")
    if os.environ.get("TUTORIAL_OUTPUTS"):  # a file to keep every command's output in (to refresh the page's blocks)
        with open(os.environ["TUTORIAL_OUTPUTS"], "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False, indent=1)
    return {"steps": steps, "checks": checks, "prose": prose, "results": results}


# ----------------------------------------------------------------------------------------------------------------
# the tutorial, run


def test_every_command_runs_in_under_a_minute(tutorial):
    bad = []
    for s in tutorial["steps"]:
        r = tutorial["results"][s["name"]]
        if r["rc"] != 0:
            bad.append(f"{s['name']} (line {s['line']}): exit {r['rc']}: {s['command']}\n{r['output'][-2000:]}")
        elif r["cpu"] >= CPU_LIMIT_S:
            bad.append(f"{s['name']} (line {s['line']}): {r['cpu']:.0f} s of CPU, the tutorial promises under a minute")
    assert not bad, "\n".join(bad)


def test_every_command_prints_lines_of_the_expected_form(tutorial):
    bad = []
    for s in tutorial["steps"]:
        assert s["expected"], f"step {s['name']} (line {s['line']}) shows no expected output (a ```text block)"
        r = tutorial["results"][s["name"]]
        if r["rc"] == 0:
            bad += [f"{s['name']}: no printed line has the form of {line!r}" for line in form_mismatches(s, r["output"])]
    assert not bad, "\n".join(bad)


def test_every_check_holds(tutorial):
    outputs = {name: r["output"] for name, r in tutorial["results"].items()}
    failed = [m for m in (evaluate(c, outputs) for c in tutorial["checks"]) if m]
    assert not failed, f"{len(failed)} of {len(tutorial['checks'])} claims of docs/tutorial.md do not hold:\n" + \
        "\n".join(failed)


# ----------------------------------------------------------------------------------------------------------------
# the tutorial, read


def test_checks_state_the_figures_of_their_section():
    steps, checks, prose = parse(read(DOC))
    assert len(steps) >= 12 and len(checks) >= len(steps), (len(steps), len(checks))
    names = {s["name"] for s in steps}
    bad = []
    for c in checks:
        used = {n.id for n in ast.walk(ast.parse(c["expr"], mode="eval")) if isinstance(n, ast.Name)}
        unknown = used - names - {"mean", "about", "min", "max", "abs", "len", "all", "any", "zip", "set"}
        if unknown:
            bad.append(f"line {c['line']}: {c['expr']}: no step named {sorted(unknown)}")
        said = figures(prose[c["section"]])
        missing = [x for x in stated_numbers(c["expr"]) if x not in said]
        if missing:
            bad.append(f"line {c['line']}: {c['expr']}: {missing} not in the text of section {c['section']!r}")
    assert not bad, "\n".join(bad)


def test_chinese_tutorial_has_the_same_steps_and_checks():
    en_steps, en_checks, _ = parse(read(DOC))
    zh_steps, zh_checks, _ = parse(read(DOC_ZH))
    assert [(s["name"], s["command"], s["expected"]) for s in zh_steps] == \
        [(s["name"], s["command"], s["expected"]) for s in en_steps]
    assert [c["expr"] for c in zh_checks] == [c["expr"] for c in en_checks]


def test_named_functions_and_tests_exist():
    """Every `file.py:name` and `test_x.py::test_name` the tutorial cites is defined there."""
    text = read(DOC) + read(DOC_ZH)
    cited = set(re.findall(r"`((?:tests/)?[\w/]+\.py)::?([\w.]+)`", text))
    cited |= set(re.findall(r"`((?:tests/)?[\w/]+\.py):([\w.]+)", text))
    assert len(cited) >= 20, cited
    missing = []
    for path, name in cited:
        path = path if os.path.exists(os.path.join(ROOT, path)) else os.path.join("tests", path)
        src = read(os.path.join(ROOT, path)) if os.path.exists(os.path.join(ROOT, path)) else ""
        last = name.split(".")[-1]
        if not re.search(rf"^\s*(def|class) {re.escape(last)}\b", src, re.M):
            missing.append(f"{path}:{name}")
    assert not missing, missing


# ----------------------------------------------------------------------------------------------------------------
# the checker can fail


WRONG = """# A tutorial

## 1. Step

```bash one
python -c "print('ppo iter 0/2 | score +0.5 | kl 0.000'); print('ppo iter 1/2 | score +0.9 | kl 1.000')"
```

```text
ppo iter 0/2 | score +0.500 | kl 0.000
ppo iter 1/2 | ... | clipfrac 0.100
```

The score rises by about 0.4 (± 0.1), and the KL ends at least 2 times higher than 0.4.

<!-- check: about(one.it("score")[-1] - one.it("score")[0], 0.4, 0.1) -->
<!-- check: one.it("kl")[-1] >= 2 * 0.4 -->
<!-- check: one.it("kl")[-1] >= 3 * 0.5 -->
<!-- check: one.ev("gold")[0] > 0 -->
"""


def test_the_checker_fails_on_a_wrong_expectation(tmp_path):
    steps, checks, prose = parse(WRONG)
    assert [s["name"] for s in steps] == ["one"] and len(steps[0]["expected"]) == 2 and len(checks) == 4
    results = run_all(steps, str(tmp_path))
    out = {"one": results["one"]["output"]}
    assert results["one"]["rc"] == 0, results
    msgs = [evaluate(c, out) for c in checks]
    assert msgs[0] is None and msgs[1] is None  # the true claims hold
    assert "is False" in msgs[2] and "one.it('kl') = [0.0, 1.0]" in msgs[2]  # a wrong factor fails, says what it read
    assert "no ev line prints 'gold'" in msgs[3]  # a figure the command never prints fails
    assert form_mismatches(steps[0], out["one"]) == ["ppo iter 1/2 | ... | clipfrac 0.100"]  # a key it never prints
    # the stated figures: 3 and 0.5 of the third check are not in the text, the others are
    said = figures(prose["1. Step"])
    assert [x for c in checks for x in stated_numbers(c["expr"]) if x not in said] == ["3", "0.5"]
    assert stated_numbers('a.it("kl")[10:] >= 2 * b.it("kl")[0]') == ["2"]  # indices are not figures
    rc, output, cpu, _ = run_command("exit 3", str(tmp_path))
    assert rc == 3 and cpu < 1


def test_fields_parse_the_printed_lines():
    assert fields("ppo iter 3/20 | score +0.518 | kl 0.522 | β 0.0476 | max|ρ−1| 0.123 | 0.30s+0.57s | eta 0m06s") \
        == {"ppo iter": 3, "score": 0.518, "kl": 0.522, "β": 0.0476, "max|ρ−1|": 0.123}  # not the timings
    assert fields("summary: val_loss 0.6768, seconds 33.3576, iters 400") == \
        {"val_loss": 0.6768, "seconds": 33.3576, "iters": 400}
    assert fields("score -1.234 (normalised; raw +0.456)") == {"score": -1.234}
    assert form("eval iter 0 | gold -1.086 | ...").match("eval iter 20 | gold 0.5 | kl 3")
    assert not form("eval iter 0 | gold -1.086").match("eval iter 0 | score -1.086")


# ----------------------------------------------------------------------------------------------------------------
# --critic=0: REINFORCE's advantages are the return-to-go


def test_critic_0_advantages_are_the_return_to_go(chain, ppo_prompts):
    """train_ppo.py --critic=0 --lam=1 (the tutorial's REINFORCE step): no critic is built, V ≡ 0, and before
    whitening Â_t = R_t = Σ_{t'≥t} r_{t'}: each token's return minus the next one's is its own KL-shaped reward
    −β(log π − log π_ref), the last real token's is the score − β·its KL; the logged ppo/advantages/var is the
    variance of those returns before whitening, and the advantages are their whitened values. With the critic the
    same statistic is the variance of Â = R − V (the returns are GAE's, before whitening)."""
    import ppo
    from runs import do_rollout, do_update, ppo_args, ppo_setup
    args = ppo_args(chain, "--critic=0", "--lam=1")
    m = ppo_setup(args)
    assert m["critic"] is None and m["opt_c"] is None
    batch = do_rollout(m, ppo_prompts[:8], args, seed=3)
    mask = batch["response_mask"].float()
    R, lp, ref = batch["returns"], batch["logprobs"], batch["ref_logprobs"]
    assert torch.equal(batch["values"], torch.zeros_like(R))
    step = R[:, :-1] - R[:, 1:] * mask[:, 1:]                                          # (B, T−1) r_t where t is not last
    not_last = mask[:, :-1] * mask[:, 1:]
    kl_reward = -args.kl_coef * (lp - ref)                                             # (B, T)
    assert (((step - kl_reward[:, :-1]) * not_last).abs().max() < 1e-5), "R_t − R_{t+1} is not r_t"
    assert ((R * (1 - mask)).abs().max() == 0), "a return after the end of a response"
    var = ppo.masked_var(R, batch["response_mask"])
    assert math.isclose(batch["stats"]["ppo/advantages/var"].item(), var.item(), rel_tol=1e-5)
    assert torch.allclose(batch["advantages"], ppo.masked_whiten(R, batch["response_mask"]), atol=1e-5)
    upd = do_update(m, batch, args, seed=4)
    assert "ppo/loss/value" not in upd and upd["ppo/policy/ratio_max_dev"] > 0  # the policy moved; no value loss

    args = ppo_args(chain)  # with the critic: the logged variance is that of R − V, the advantages before whitening
    m = ppo_setup(args)
    batch = do_rollout(m, ppo_prompts[:8], args, seed=3)
    pre = (batch["returns"] - batch["values"]) * batch["response_mask"]
    assert math.isclose(batch["stats"]["ppo/advantages/var"].item(),
                        ppo.masked_var(pre, batch["response_mask"]).item(), rel_tol=1e-4)
    assert not torch.equal(batch["values"], torch.zeros_like(batch["values"]))
