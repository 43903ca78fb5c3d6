"""Shared test setup: the repo root on sys.path, tiktoken's offline cache, one torch thread."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

# tiktoken downloads GPT-2's files on first use; offline we point it at the copy in ../shared.
_cache = os.path.join(SHARED, "data", "tiktoken_cache")
if os.path.isdir(_cache):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _cache)

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to a busy machine


def randomize_(model, seed):
    """O(1) random weights. GPT-2's init (std 0.02) makes every position's logits nearly uniform and nearly
    independent of the input, so a 1e-5 comparison would pass on a broken mask or a wrong position id."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """The chained tiny SFT -> RM -> PPO run (tests/runs.py), built once and shared by every test file."""
    import runs
    return runs.make_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture(scope="session")
def ppo_prompts(chain):
    """The first 64 held-out prompts of the built-in task, rendered for PPO (tests/runs.py)."""
    import runs
    return runs.rendered_prompts(chain)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine are 10x slower with 2 threads: one, for every test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def tutorial_in_background(request, tmp_path_factory):
    """When the session runs docs/tutorial.md's commands (tests/test_tutorial.py), they start with the session, at
    the lowest CPU priority, beside the other tests: those are mostly one-threaded and leave a core idle, so the
    tutorial's two minutes of commands cost the session little wall time. Its test waits for the run."""
    wanted = any(item.fspath.basename == "test_tutorial.py" and "tutorial" in item.fixturenames
                 for item in request.session.items)
    if wanted:
        import test_tutorial
        test_tutorial.start_in_background(tmp_path_factory.mktemp("tutorial"))
    yield
    if wanted:
        test_tutorial.stop_background()
