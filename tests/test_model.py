"""Tests for model.py: the invariants the rest of the pipeline leans on.

Fused vs explicit attention, the causal mask, the KV cache vs one full forward pass, left-padding invariance
(RLHF_DETAILS #2), the sampler (its log-probs, EOS handling, greedy/top-k/top-p, seeds; #3, #4, #5, #7) and
C.response_logprobs, both against a one-sequence-at-a-time decoding loop, exact
equivalence with Hugging Face's GPT-2 (built locally, no download), GPT-2's initialisation, the optimizer's
parameter groups, and the small helpers. CPU, fp32, a few seconds.

    python -m pytest -q tests/test_model.py
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import randomize_
from model import (GPT, GPTConfig, GPTScalar, KVCache, left_pad, logprobs_from_logits, mask_after_eos,
                   sample_from_logits)

V = 50          # vocabulary of the tiny test models
EOS = 1         # end of sequence
PAD = V         # padding on purpose outside the vocabulary: it must never be looked up unmasked


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def make_config(**kw):
    base = dict(block_size=64, vocab_size=V, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    base.update(kw)
    return GPTConfig(**base)


def make_gpt(seed=0, eos_bias=0.0, **kw):
    """A tiny random GPT in eval mode. eos_bias > 0 raises EOS's logit by about that much at every position
    (through ln_f's bias along EOS's embedding, which is also its lm_head row), so sequences stop at random
    but plausible places and the model still depends on its input."""
    model = randomize_(GPT(make_config(**kw)), seed)
    if eos_bias:
        with torch.no_grad():
            w = model.transformer.wte.weight[EOS]
            model.transformer.ln_f.bias += eos_bias * w / w.norm() ** 2
    return model


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (n,), generator=g).tolist() for n in lengths]  # no EOS inside prompts


# ----------------------------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("padded", [False, True])
def test_explicit_and_fused_attention_agree(padded):
    explicit = make_gpt(attn_impl="explicit")
    fused = GPT(make_config(attn_impl="sdpa")).eval()
    fused.load_state_dict(explicit.state_dict())
    assert explicit.transformer.h[0].attn.attn_impl == "explicit" and fused.transformer.h[0].attn.attn_impl == "sdpa"
    idx, mask = left_pad(random_prompts([12, 5, 9, 1]), PAD) if padded else (torch.randint(0, V, (4, 12)), None)
    a, _ = explicit(idx, attention_mask=mask)
    b, _ = fused(idx, attention_mask=mask)
    keep = mask if padded else torch.ones(idx.shape, dtype=torch.bool)
    close(a[keep], b[keep])
    assert a[keep].std() > 0.5, "logits too flat for the comparison to mean anything"


def test_unknown_attn_impl_raises():
    model = GPT(make_config(attn_impl="flash-please"))
    with pytest.raises(ValueError, match="attn_impl"):
        model(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("attn_impl", ["explicit", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_causal_mask(attn_impl, padded):
    model = make_gpt(attn_impl=attn_impl)
    B, T, j = 3, 12, 7
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, :3] = False
        mask[2, :6] = False
        idx[~mask] = PAD
    idx2 = idx.clone()
    idx2[:, j] = (idx[:, j] + 1) % V  # change one future token (real in every row)
    a, _ = model(idx, attention_mask=mask)
    b, _ = model(idx2, attention_mask=mask)
    close(a[:, :j], b[:, :j], atol=1e-6)  # the past never sees it
    later = (a[:, j:] - b[:, j:]).abs().amax(-1)  # (B, T - j)
    assert (later > 1e-3).all(), f"positions >= {j} should read the changed token, max diffs {later}"


# ----------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("attn_impl", ["explicit", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_cache_matches_full_forward(attn_impl, padded, chunk):
    model = make_gpt(attn_impl=attn_impl)
    B, T, Tp = 3, 14, 5
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, T, dtype=torch.bool)
    if padded:  # left padding inside the prefilled prompt
        mask[1, :2] = False
        mask[2, :4] = False
        idx[~mask] = PAD
    full, _ = model(idx, attention_mask=mask if padded else None)  # (B, T, V)

    cache = KVCache(model.config, B, T, "cpu", torch.float32)
    steps = [model.lm_head(model.hidden(idx[:, :Tp], mask[:, :Tp], kv_cache=cache))]  # prefill
    for t in range(Tp, T, chunk):  # then `chunk` new tokens at a time
        steps.append(model(idx[:, t:t + chunk], kv_cache=cache)[0])
    cached = torch.cat(steps, 1)  # (B, T, V)
    assert cache.pos == T
    close(cached[mask], full[mask])
    with pytest.raises(AssertionError, match="KV cache full"):
        cache.append(0, cache.k[0, :, :, :1], cache.v[0, :, :, :1])


# ----------------------------------------------------------------------------------------------------------------
# left padding (RLHF_DETAILS #2)


def test_left_pad():
    idx, mask = left_pad([[5, 6, 7], [8], []], PAD)
    assert idx.tolist() == [[5, 6, 7], [PAD, PAD, 8], [PAD, PAD, PAD]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False] * 3]


@pytest.mark.parametrize("attn_impl", ["explicit", "sdpa"])
def test_left_padding_invariance(attn_impl):
    prompts = random_prompts([9, 4, 6, 9])
    idx, mask = left_pad(prompts, PAD)  # PAD = vocab_size: a lookup would fail, so it must be masked
    model = make_gpt(attn_impl=attn_impl)
    logits, _ = model(idx, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone, _ = model(torch.tensor([p]))
        close(logits[i][mask[i]], alone[0])

    # whatever sits under the padding changes nothing at real tokens
    junk = idx.masked_fill(~mask, 0) + torch.randint(0, V, idx.shape) * (~mask)
    logits2, _ = model(junk, attention_mask=mask)
    close(logits2[mask], logits[mask], atol=1e-6)

    # the scalar head (reward model / critic) inherits the same invariance
    rm = GPTScalar(make_config(attn_impl=attn_impl))
    randomize_(rm.gpt, 3)
    values = rm(idx, attention_mask=mask)  # (B, T)
    assert values.shape == idx.shape
    for i, p in enumerate(prompts):
        close(values[i][mask[i]], rm(torch.tensor([p]))[0])
    assert values[mask].std() > 0.05


def test_gptscalar_from_gpt_copies_the_trunk():
    gpt = make_gpt()
    rm = GPTScalar.from_gpt(gpt)
    idx = torch.randint(0, V, (2, 7))
    close(rm.gpt.hidden(idx), gpt.hidden(idx), atol=0)
    close(rm(idx), rm.head(gpt.hidden(idx)).squeeze(-1), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# generate


@torch.no_grad()
def stepwise_logprobs(model, prompts, s, temperature):
    """The slow reference for RLHF_DETAILS #4 and #5: for each row on its own, with no padding at all, feed the
    unpadded prompt + the response prefix y_<t and read log_softmax(logits / T) of y_t at the last position, one
    forward pass per token; also the exact entropy of that distribution. Returns per row the (n,) log-probs and
    entropies of its n real response tokens (up to and including the first EOS)."""
    out = []
    for p, r, m in zip(prompts, s.responses.tolist(), s.response_mask.tolist()):
        y = [tok for tok, keep in zip(r, m) if keep]
        lps, ents = [], []
        for t in range(len(y)):
            logits, _ = model(torch.tensor([p + y[:t]]))                     # (1, len(p) + t, V)
            logp = F.log_softmax(logits[0, -1].double() / temperature, -1)   # (V,) the next token's distribution
            lps.append(logp[y[t]].item())
            ents.append(-(logp.exp() * logp).sum().item())
        out.append((torch.tensor(lps), torch.tensor(ents)))
    return out


def check_eos_structure(s, max_new_tokens):
    """Each row: response_mask 1 up to and including the first EOS, then 0 with PAD tokens and log-prob 0."""
    Tn = s.responses.size(1)
    assert s.tokens.shape == (len(s.prompt_mask), s.prompt_mask.size(1) + Tn)
    ends = []
    for r, m, lp in zip(s.responses.tolist(), s.response_mask.tolist(), s.logprobs.tolist()):
        if EOS in r:
            e = r.index(EOS) + 1
            assert m == [1] * e + [0] * (Tn - e), (r, m)
            assert r[e:] == [PAD] * (Tn - e), r
            assert all(x == 0.0 for x in lp[e:]) and all(x < 0.0 for x in lp[:e]), lp
            ends.append(e)
        else:
            assert Tn == max_new_tokens and m == [1] * Tn and PAD not in r, (r, m)
            ends.append(None)
    return ends


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_and_response_logprobs_match_a_stepwise_loop(use_cache, temperature):
    """The sampler's own log-probs, and C.response_logprobs on the batch as train_ppo.rollout builds it
    (left-padded prompts, responses cut at EOS and right-padded, one attention mask), both equal the slow
    one-sequence-at-a-time decoding loop: the off-by-one (#5), the temperature (#4) and the padding (#2) at once."""
    import ppo
    import common as C
    model = make_gpt(eos_bias=3.0)
    prompts = random_prompts([7, 3, 5, 1, 6, 4, 2, 7])
    s = model.generate(prompts, max_new_tokens=12, pad_id=PAD, eos_id=EOS, temperature=temperature,
                       generator=torch.Generator().manual_seed(0), use_cache=use_cache)
    ends = check_eos_structure(s, 12)
    assert any(e is not None and e < s.responses.size(1) for e in ends), "no row stopped early: EOS untested"
    assert None in ends, "every row stopped: a response cut at the length limit is untested"

    # the batch exactly as train_ppo.rollout builds it
    Tp = s.prompt_mask.size(1)
    responses, response_mask, _ = ppo.truncate_at_eos(s.responses, EOS, PAD)              # (B, Tn)
    tokens = torch.cat([s.tokens[:, :Tp], responses], 1)                                  # (B, Tp + Tn)
    attn_mask = torch.cat([s.prompt_mask.bool(), response_mask], 1)                       # (B, Tp + Tn)
    with torch.no_grad():
        lp, ent = C.response_logprobs(model, tokens, attn_mask, responses, response_mask, Tp, temperature,
                                              with_entropy=True)                          # (B, Tn) each
    assert lp.shape == ent.shape == responses.shape
    for i, (ref_lp, ref_ent) in enumerate(stepwise_logprobs(model, prompts, s, temperature)):
        n = len(ref_lp)
        assert n == int(response_mask[i].sum()), f"row {i}: {n} real tokens in the loop, mask says otherwise"
        close(lp[i, :n].double(), ref_lp.double())
        close(s.logprobs[i, :n].double(), ref_lp.double())
        close(ent[i, :n].double(), ref_ent.double())
    # log-probs of sampled tokens at T ≠ 1 differ from those at T = 1: the loop above really checks the temperature
    if temperature != 1.0:
        with torch.no_grad():
            lp1 = C.response_logprobs(model, tokens, attn_mask, responses, response_mask, Tp, 1.0)
        assert (lp1 - lp)[response_mask].abs().max() > 1e-2


def test_generate_stops_each_row_at_its_first_eos():
    model = make_gpt(eos_bias=3.0)
    s = model.generate(random_prompts([4] * 16, seed=1), max_new_tokens=16, pad_id=PAD, eos_id=EOS,
                       generator=torch.Generator().manual_seed(1))
    ends = check_eos_structure(s, 16)
    stopped = [e for e in ends if e is not None]
    assert len(set(stopped)) >= 3, f"want several different stopping points, got {ends}"

    # when every row has stopped, sampling ends there: Tn is the latest first-EOS
    model = make_gpt(eos_bias=6.0)
    s = model.generate(random_prompts([4] * 6, seed=2), max_new_tokens=40, pad_id=PAD, eos_id=EOS,
                       generator=torch.Generator().manual_seed(2))
    ends = check_eos_structure(s, 40)
    assert None not in ends and s.responses.size(1) == max(ends) < 40, ends


def test_generate_without_eos_runs_max_new_tokens():
    model = make_gpt(eos_bias=6.0)  # EOS is sampled often, and must be ignored
    for use_cache in (True, False):
        s = model.generate(random_prompts([3, 5]), max_new_tokens=20, pad_id=PAD, eos_id=None,
                           generator=torch.Generator().manual_seed(0), use_cache=use_cache)
        assert s.responses.shape == (2, 20) and s.tokens.shape == (2, 5 + 20)
        assert (s.response_mask == 1).all() and (s.logprobs < 0).all()
        assert (s.responses == EOS).any(), "EOS never sampled, the test proves nothing"
        assert s.prompt_mask.tolist() == [[0, 0, 1, 1, 1], [1] * 5]


def test_cached_and_uncached_sampling_agree():
    model = make_gpt(eos_bias=3.0)
    prompts = random_prompts([6, 2, 4, 6, 3])
    kw = dict(max_new_tokens=15, pad_id=PAD, eos_id=EOS, temperature=1.0)
    a = model.generate(prompts, generator=torch.Generator().manual_seed(5), use_cache=True, **kw)
    b = model.generate(prompts, generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.response_mask, b.response_mask)
    close(a.logprobs, b.logprobs)
    assert (a.response_mask == 0).any(), "no EOS sampled: padding after EOS untested"



def test_finished_rows_leave_the_cached_batch(monkeypatch):
    """With the KV cache, rows that have sampled EOS are dropped from the batch (and their cache) as they finish;
    the samples and log-probs are those of the uncached reference, which keeps every row to the end."""
    import model as model_module
    sizes = []
    keep_rows = model_module.KVCache.keep_rows

    def spy(cache, rows):
        sizes.append((cache.k.size(1), len(rows)))
        keep_rows(cache, rows)
    monkeypatch.setattr(model_module.KVCache, "keep_rows", spy)
    model = make_gpt(eos_bias=3.0)
    prompts = random_prompts([4, 6, 2, 5, 3, 6, 1, 4, 5, 2, 6, 3, 4, 5, 2, 3], seed=3)
    kw = dict(max_new_tokens=20, pad_id=PAD, eos_id=EOS, temperature=1.0)
    a = model.generate(prompts, generator=torch.Generator().manual_seed(4), use_cache=True, **kw)
    assert sizes and sizes[0][0] == 16 and all(kept < before for before, kept in sizes), sizes
    b = model.generate(prompts, generator=torch.Generator().manual_seed(4), use_cache=False, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.response_mask, b.response_mask)
    close(a.logprobs, b.logprobs)
    check_eos_structure(a, 20)

def test_same_seed_same_samples():
    model = make_gpt()
    prompts = random_prompts([3, 5])
    kw = dict(max_new_tokens=10, pad_id=PAD, eos_id=EOS)
    a = model.generate(prompts, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(prompts, generator=torch.Generator().manual_seed(7), **kw)
    c = model.generate(prompts, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_generate_padding_invariance():
    """The same prompt with 0 or 3 left PADs gets the same sample and log-probs (RLHF_DETAILS #2)."""
    model = make_gpt(eos_bias=2.0)
    p = random_prompts([5])[0]
    kw = dict(max_new_tokens=12, pad_id=PAD, eos_id=EOS)
    alone = model.generate([p], generator=torch.Generator().manual_seed(3), **kw)
    as_tensor = model.generate(torch.tensor([p]), generator=torch.Generator().manual_seed(3), **kw)
    padded = model.generate(torch.tensor([[PAD] * 3 + p]), prompt_mask=torch.tensor([[0] * 3 + [1] * 5]),
                            generator=torch.Generator().manual_seed(3), **kw)
    for s in (as_tensor, padded):
        assert torch.equal(s.responses, alone.responses) and torch.equal(s.response_mask, alone.response_mask)
        close(s.logprobs, alone.logprobs)
    assert padded.prompt_mask.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]


def test_greedy_and_top_k_1():
    model = make_gpt()
    prompts = random_prompts([4, 2, 6])
    kw = dict(max_new_tokens=10, pad_id=PAD, eos_id=None)
    greedy = model.generate(prompts, temperature=0, **kw)
    logits, _ = model(greedy.tokens, attention_mask=torch.cat([greedy.prompt_mask, greedy.response_mask], 1))
    Tp = greedy.prompt_mask.size(1)
    assert torch.equal(greedy.responses, logits[:, Tp - 1:-1].argmax(-1))
    assert len(set(greedy.responses.flatten().tolist())) > 1
    top1 = model.generate(prompts, top_k=1, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(top1.responses, greedy.responses)
    close(top1.logprobs, torch.zeros_like(top1.logprobs))  # the only token left has probability 1


def test_generate_refuses_past_block_size():
    model = make_gpt(block_size=16)
    with pytest.raises(AssertionError, match="block_size"):
        model.generate(random_prompts([10]), max_new_tokens=7, pad_id=PAD)
    with pytest.raises(AssertionError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# sample_from_logits on a handmade distribution


PROBS = torch.tensor([0.05, 0.30, 0.10, 0.40, 0.15])  # sorted: 3 (.40), 1 (.30), 4 (.15), 2 (.10), 0 (.05)
N = 20000


def draw(**kw):
    logits = PROBS.log().expand(N, -1).contiguous()
    tok, lp = sample_from_logits(logits, generator=torch.Generator().manual_seed(0), **kw)
    freq = torch.bincount(tok, minlength=5).float() / N
    return tok, lp, freq


def expect(freq, lp, tok, kept):
    """Only `kept` tokens were drawn, in proportion to their renormalised probability, and lp is its log."""
    q = torch.zeros(5)
    q[kept] = PROBS[kept] / PROBS[kept].sum()
    assert (freq[[i for i in range(5) if i not in kept]] == 0).all(), f"sampled outside {kept}: {freq}"
    close(freq, q, atol=0.015)
    close(lp, q.log()[tok])


def test_sample_plain_and_temperature():
    tok, lp, freq = draw()
    expect(freq, lp, tok, [0, 1, 2, 3, 4])
    tok, lp, freq = draw(temperature=2.0)  # softmax(log p / 2) ∝ √p
    q = PROBS.sqrt() / PROBS.sqrt().sum()
    close(freq, q, atol=0.015)
    close(lp, q.log()[tok])


def test_sample_top_k():
    tok, lp, freq = draw(top_k=2)
    expect(freq, lp, tok, [3, 1])
    tok, lp, freq = draw(top_k=5)
    expect(freq, lp, tok, [0, 1, 2, 3, 4])


def test_sample_top_p():
    tok, lp, freq = draw(top_p=0.75)  # .40 + .30 = .70 < .75, so the .15 is needed too
    expect(freq, lp, tok, [3, 1, 4])
    tok, lp, freq = draw(top_p=0.3)  # the top token alone already reaches .3
    expect(freq, lp, tok, [3])
    tok, lp, freq = draw(top_p=0.9)
    expect(freq, lp, tok, [3, 1, 4, 2])


def test_sample_greedy_and_seed():
    logits = torch.randn(4, 9)
    tok, lp = sample_from_logits(logits, temperature=0)
    assert torch.equal(tok, logits.argmax(-1)) and (lp == 0).all()
    a = sample_from_logits(logits.repeat(50, 1), generator=torch.Generator().manual_seed(1))[0]
    b = sample_from_logits(logits.repeat(50, 1), generator=torch.Generator().manual_seed(1))[0]
    c = sample_from_logits(logits.repeat(50, 1), generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------------------
# GPT-2 equivalence, without a download


def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=64,
                                  activation_function="gelu_new", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                  bos_token_id=100, eos_token_id=100)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # O(1) weights (HF's init is nearly uniform), LayerNorm gains and biases included
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return hf


def test_gpt2_equivalence():
    hf = hf_gpt2()
    model = GPT.from_hf(hf).eval()
    assert model.config.n_layer == 2 and model.config.vocab_size == 101 and model.config.block_size == 64
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 101, (3, 20), generator=g)
    with torch.no_grad():
        ref = hf(idx).logits
        ours, _ = model(idx)
        assert ref.std() > 0.5
        close(ours, ref, atol=1e-4)

        # left padding: HF with the attention mask and position ids = cumsum − 1, real positions only
        mask = torch.ones(3, 20, dtype=torch.long)
        mask[1, :4] = 0
        mask[2, :11] = 0
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        ref = hf(idx, attention_mask=mask, position_ids=pos).logits
        padded = idx.masked_fill(mask == 0, 101)  # our PAD can even sit outside the vocabulary
        ours, _ = model(padded, attention_mask=mask)
        keep = mask.bool()
        close(ours[keep], ref[keep], atol=1e-4)


def test_bench_times_hugging_face_generate_on_the_same_network():
    """bench.py --hf=1 compares sampling speed with HF generate: the two must be one network with one stopping rule.
    With O(1) weights (HF's own init is nearly flat), ours and HF agree on the logits and greedy-decode the same
    tokens for exactly max_new_tokens (no EOS stop in either)."""
    pytest.importorskip("transformers")
    import bench
    _, hf = bench.hf_twin(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=101, block_size=64), "cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ours = GPT.from_hf(hf).eval()
    prompts = torch.randint(0, 99, (4, 7), generator=g)
    with torch.no_grad():
        ref = hf(prompts).logits
        assert ref.std() > 0.5
        close(ours(prompts)[0], ref, atol=1e-4)
        hf_out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=25,
                             min_new_tokens=25)[:, 7:]
    s = ours.generate(prompts, 25, pad_id=100, eos_id=None, temperature=0)
    assert hf_out.shape == (4, 25)
    assert torch.equal(s.responses, hf_out)


def test_gpt2_names_and_tying():
    hf = hf_gpt2()
    model = GPT.from_hf(hf)
    names = set(model.state_dict())
    for n in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
              "transformer.h.1.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.weight",
              "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.bias", "lm_head.weight"]:
        assert n in names, n
    hf_names = {k for k in hf.state_dict() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert names == hf_names
    assert model.lm_head.weight is model.transformer.wte.weight
    close(model.lm_head.weight, hf.lm_head.weight, atol=0)
    # Conv1D stores (in, out): our Linear must hold the transpose
    close(model.transformer.h[0].attn.c_attn.weight, hf.transformer.h[0].attn.c_attn.weight.t(), atol=0)
    with torch.no_grad():  # still one tensor after loading: an update through one name shows in the other
        model.lm_head.weight[0, 0] += 1.0
    assert model.transformer.wte.weight[0, 0] == model.lm_head.weight[0, 0]
    assert len(list(model.parameters())) == len(names) - 1


def test_from_pretrained_unknown_name():
    with pytest.raises(AssertionError, match="not-a-model"):
        GPT.from_pretrained("not-a-model")


# ----------------------------------------------------------------------------------------------------------------
# initialisation and optimizer


def test_init():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=128, vocab_size=512, n_layer=6, n_head=4, n_embd=256)
    model = GPT(cfg)
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    n_proj = 0
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - proj_std) < 0.05 * proj_std, (name, p.std().item(), proj_std)
            n_proj += 1
        elif p.dim() == 2:  # c_attn, c_fc, wte (= lm_head), wpe
            assert abs(p.std().item() - 0.02) < 0.05 * 0.02, (name, p.std().item())
        elif name.endswith(".bias"):
            assert (p == 0).all(), name
        else:  # LayerNorm gains
            assert (p == 1).all(), name
    assert n_proj == 2 * cfg.n_layer
    assert abs(model.transformer.wte.weight.mean().item()) < 1e-3

    lns = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(lns) == 2 * cfg.n_layer + 1 and all(m.eps == 1e-5 for m in lns)
    gelu = model.transformer.h[0].mlp.gelu
    x = torch.linspace(-4, 4, 101)
    tanh_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    close(gelu(x), tanh_gelu, atol=1e-6)
    assert (gelu(x) - F.gelu(x)).abs().max() > 1e-4  # and not the erf one

    rm = GPTScalar(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=4, n_embd=1024))
    head_std = 1 / math.sqrt(1024 + 1)
    assert abs(rm.head.weight.std().item() - head_std) < 0.1 * head_std, rm.head.weight.std().item()
    assert rm.head.weight.shape == (1, 1024) and (rm.head.bias == 0).all()


def test_configure_optimizers_groups():
    model = make_gpt()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-4, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decay["lr"] == 3e-4
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups (or twice in one)"
    params = dict(model.named_parameters())  # the tied wte/lm_head appears once
    assert set(ids) == {id(p) for p in params.values()}, "a parameter is missing from the optimizer"
    assert {id(p) for p in decay["params"]} == {id(p) for p in params.values() if p.dim() >= 2}
    assert ids.count(id(model.lm_head.weight)) == 1
    assert all(p.dim() < 2 for p in no_decay["params"]) and len(no_decay["params"]) > 0


# ----------------------------------------------------------------------------------------------------------------
# small helpers and the loss


def test_mask_after_eos():
    responses = torch.tensor([[5, EOS, 7, EOS],
                              [EOS, 3, 3, 3],
                              [4, 4, 4, 4],
                              [4, 4, 4, EOS]])
    assert mask_after_eos(responses, EOS).long().tolist() == [[1, 1, 0, 0],
                                                               [1, 0, 0, 0],
                                                               [1, 1, 1, 1],
                                                               [1, 1, 1, 1]]


def test_logprobs_from_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g) * 3
    tokens = torch.randint(0, 7, (2, 5), generator=g)
    manual = torch.empty(2, 5)
    for b in range(2):
        for t in range(5):
            row = logits[b, t]
            manual[b, t] = row[tokens[b, t]] - torch.log(torch.exp(row).sum())
    close(logprobs_from_logits(logits, tokens), manual)
    assert logprobs_from_logits(logits.bfloat16(), tokens).dtype == torch.float32


def test_loss_ignores_minus_one():
    model = make_gpt()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V, (2, 9), generator=g)
    targets = torch.randint(0, V, (2, 9), generator=g)
    targets[0, :4] = -1
    targets[1, 7:] = -1
    logits, loss = model(idx, targets)
    terms = [-F.log_softmax(logits[b, t], -1)[targets[b, t]] for b in range(2) for t in range(9) if targets[b, t] >= 0]
    close(loss, torch.stack(terms).mean())
    assert len(terms) == 2 * 9 - 4 - 2
    logits2, loss2, h = model(idx, targets, return_hidden=True)
    close(logits2, logits, atol=0)
    close(model.lm_head(h), logits, atol=0)
    assert model(idx)[1] is None


@pytest.mark.parametrize("chunk_bytes", [4 * 97 * 5, 32 << 20])  # 5 rows a chunk (ragged last chunk), or all at once
def test_head_logprobs_match_the_full_logits_path(chunk_bytes):
    """model.head_logprobs (chunked, its backward from the kept softmax) against the plain path through (B, T, V)
    logits: log_softmax(h·Wᵀ/T) gathered, its entropy, and both gradients by autograd, with masked rows left at 0."""
    from model import head_logprobs
    g = torch.Generator().manual_seed(0)
    B, T, C, V, temp = 3, 7, 16, 97, 0.7
    h = (torch.randn(B, T, C, generator=g, dtype=torch.float64) * 0.5).requires_grad_()  # logits of a few units
    W = torch.randn(V, C, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:], mask[2, 1:] = False, False
    w_out = torch.randn(B, T, generator=g, dtype=torch.float64)  # a weighting of the outputs to backprop through

    logits = (h @ W.t()) / temp                                                        # (B, T, V)
    ref_lp = torch.log_softmax(logits, -1).gather(-1, y[..., None]).squeeze(-1) * mask
    p = logits.softmax(-1)
    ref_ent = -(p * p.log()).sum(-1) * mask
    gh_ref, gw_ref = torch.autograd.grad((ref_lp * w_out).sum(), (h, W))

    lp, ent = head_logprobs(h, W, y, temp, with_entropy=True, mask=mask, max_chunk_bytes=chunk_bytes)
    close(lp.double(), ref_lp, atol=1e-5)
    close(ent.double(), ref_ent, atol=1e-5)
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    gh, gw = torch.autograd.grad((lp.double() * w_out).sum(), (h, W))
    close(gh, gh_ref, atol=1e-5)
    close(gw, gw_ref, atol=1e-5)
    assert gh[~mask].abs().max() == 0, "a masked row got a gradient"


def test_bench_ppo_responses_are_exactly_48_real_tokens_like_the_reference():
    """The reference harness samples exactly 48 tokens per response and counts all of them (pad outside the
    vocabulary, no stop token). bench.py's PPO iteration must do the same work: no response cut short by a sampled
    EOS, so 64 × 48 real tokens in the losses and a plain causal attention mask."""
    import bench
    out = bench.bench_ppo("cpu", iters=1, vocab=512)
    assert out["ppo_response_tokens"] == 64 * 48
