"""
The GPT: one decoder-only transformer, exactly GPT-2's architecture, in one readable file.

Every stage of the pipeline uses it: the SFT policy (`GPT`), the reward model and the PPO critic (`GPTScalar`,
the same trunk with an n_embd -> 1 head), and the frozen reference. PPO spends most of its time sampling from it,
so it has a KV cache, and it is correct on left-padded batches of prompts of different lengths.

Reads nothing and writes nothing by itself; `GPT.from_pretrained("gpt2")` loads OpenAI's weights through the
optional `transformers` package. Try it:  python -c "from model import GPT, GPTConfig; print(GPT(GPTConfig()))"

References:
  Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2);
  Vaswani et al. 2017, "Attention Is All You Need"; Karpathy's minGPT / nanoGPT (names and layout).
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 256      # the longest sequence (positions) the model can read
    vocab_size: int = 512      # number of token ids, special tokens included
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0       # GPT-2 pretrained with 0.1; for fine-tuning and RL we want 0 (RLHF_DETAILS #6)
    bias: bool = True          # GPT-2 has biases in every Linear and LayerNorm
    attn_impl: str = "sdpa"    # "sdpa": fused F.scaled_dot_product_attention; "explicit": the equation, written out


# ----------------------------------------------------------------------------------------------------------------
# The transformer


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}"
        # one Linear makes query, key and value for all heads at once (GPT-2's c_attn)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl

    def forward(self, x, mask=None, kv_cache=None, layer=0):
        """x: (B, T, C). mask: None (plain causal) or bool (B, 1, T, S), True where query t may read key s.
        With a kv_cache, the keys are the cached ones followed by this call's T new ones (S = cache.pos + T)."""
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)           # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)                      # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)                      # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)                      # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)                       # (B, nh, S, hs) each
        S = k.size(2)
        dropout_p = self.dropout if self.training else 0.0

        if self.attn_impl == "explicit":
            # Attention(Q, K, V) = softmax(Q·Kᵀ/√d_k + M) · V, M = −∞ where a query may not look   (Vaswani et al. 2017)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, S)
            if mask is None:  # causal: query t (at absolute position S−T+t) sees keys 0..S−T+t
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # (T, S)
            att = att.masked_fill(~mask, float("-inf"))               # (B, nh, T, S)
            att = F.softmax(att, dim=-1)                              # (B, nh, T, S)
            att = self.attn_dropout(att)
            y = att @ v                                               # (B, nh, T, hs)
        elif self.attn_impl == "sdpa":
            # the same equation, fused (flash / memory-efficient kernels where available)
            causal = mask is None and S == T
            if mask is None and S != T:  # cached decoding without padding: every cached key is in the past
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)  # (B, nh, T, hs)
        else:
            raise ValueError(f"GPTConfig.attn_impl must be 'sdpa' or 'explicit', got {self.attn_impl!r}")

        y = y.transpose(1, 2).contiguous().view(B, T, C)              # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))                     # (B, T, C)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU is the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))    # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2 moved LayerNorm to the input)."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), mask, kv_cache, layer)      # (B, T, C)
        x = x + self.mlp(self.ln_2(x))                              # (B, T, C)
        return x


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so that decoding one new token costs one
    token's worth of work instead of re-reading the whole prefix. Pre-allocated for `max_len` positions.
    `mask` remembers which cached positions are real tokens (left padding is not)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.empty(shape, device=device, dtype=dtype)      # (L, B, nh, max_len, hs)
        self.v = torch.empty(shape, device=device, dtype=dtype)      # (L, B, nh, max_len, hs)
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.pos = 0  # number of positions filled

    def append(self, layer, k, v):
        T = k.size(2)
        assert self.pos + T <= self.k.size(3), f"KV cache full: {self.pos} + {T} > {self.k.size(3)} positions"
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]  # (B, nh, S, hs) each

    def keep_rows(self, rows):
        """Drop every batch row not in `rows` (a 1-D index): finished sequences stop costing work."""
        self.k, self.v, self.mask = self.k[:, rows], self.v[:, rows], self.mask[rows]


@dataclass
class Sample:
    """What `GPT.generate` returns. Prompts are left-padded to a common length Tp, responses right-padded to Tn."""
    tokens: torch.Tensor          # (B, Tp + Tn) prompt followed by response, PAD where masked
    prompt_mask: torch.Tensor     # (B, Tp) 1 at real prompt tokens
    response_mask: torch.Tensor   # (B, Tn) 1 at generated tokens up to and including the first EOS
    logprobs: torch.Tensor        # (B, Tn) the sampler's own log π(y_t | s_t) of each token (0 where masked)

    @property
    def responses(self):
        return self.tokens[:, self.prompt_mask.size(1):]               # (B, Tn)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),      # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),      # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output projection is the input embedding (Press & Wolf 2017; GPT-2 does it)
        self.transformer.wte.weight = self.lm_head.weight
        # GPT-2's initialisation: N(0, 0.02) everywhere, biases 0, and the projections that write into the
        # residual stream scaled by 1/√(2·n_layer), since each block adds two of them to it
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without the position embeddings (the token embeddings are the output
        layer too, so they count)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    # ------------------------------------------------------------------------------------------------------------
    # forward

    def hidden(self, idx, attention_mask=None, position_ids=None, kv_cache=None):
        """The trunk: token ids (B, T) -> final hidden states (B, T, C), after ln_f.

        attention_mask (B, T): 1 at real tokens, 0 at padding. Left-padded batches need it together with
        position ids = cumsum(mask) − 1 (computed here when not given), so that each real token sees the same
        keys and the same position as it would alone (RLHF_DETAILS #2). Padding may use an id outside the
        vocabulary (GPT-2 has no PAD token); masked positions are looked up as token 0 and never attended to.
        """
        B, T = idx.size()
        past = kv_cache.pos if kv_cache is not None else 0
        assert past + T <= self.config.block_size, \
            f"sequence of {past + T} tokens is longer than block_size={self.config.block_size}"
        mask = None
        if attention_mask is not None or kv_cache is not None:
            if attention_mask is None:
                attention_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            attention_mask = attention_mask.bool()                                     # (B, T)
            idx = idx.masked_fill(~attention_mask, 0)                                  # (B, T)
            if kv_cache is not None:
                kv_cache.mask[:, past:past + T] = attention_mask
                key_mask = kv_cache.mask[:, :past + T]                                 # (B, S)
            else:
                key_mask = attention_mask                                              # (B, S), S = T
            if position_ids is None:
                # position = number of real tokens before this one (so padding never shifts positions)
                position_ids = (key_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, T)
            if not bool(attention_mask.all()) or kv_cache is not None:
                S = past + T
                q_pos = torch.arange(past, S, device=idx.device)                       # (T,)
                k_pos = torch.arange(S, device=idx.device)                             # (S,)
                causal = k_pos[None, :] <= q_pos[:, None]                              # (T, S)
                # a query may read real keys in its past, and always itself, so that a row of padding
                # attends to something and stays finite (its output is never used)
                mask = causal[None] & (key_mask[:, None, :] | (k_pos[None, :] == q_pos[:, None])[None])  # (B, T, S)
                mask = mask[:, None]                                                   # (B, 1, T, S)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=idx.device)[None]      # (1, T)

        tok_emb = self.transformer.wte(idx)                                            # (B, T, C)
        pos_emb = self.transformer.wpe(position_ids)                                   # (B or 1, T, C)
        x = self.transformer.drop(tok_emb + pos_emb)                                   # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, kv_cache, i)                                            # (B, T, C)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)                                                # (B, T, C)

    def forward(self, idx, targets=None, attention_mask=None, position_ids=None, kv_cache=None,
                return_hidden=False):
        """Logits at every position (B, T, V); with targets (B, T) (−1 = ignore) also the mean cross-entropy
        loss of next-token prediction: L = −(1/N) Σ log p_θ(x_{t+1} | x_≤t) over the targets that are not −1.
        Returns (logits, loss), or (logits, loss, hidden) with return_hidden=True."""
        h = self.hidden(idx, attention_mask, position_ids, kv_cache)                  # (B, T, C)
        logits = self.lm_head(h)                                                       # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return (logits, loss, h) if return_hidden else (logits, loss)

    # ------------------------------------------------------------------------------------------------------------
    # sampling

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, pad_id, eos_id=None, temperature=1.0, top_k=None, top_p=None,
                 generator=None, prompt_mask=None, use_cache=True):
        """Sample continuations of a batch of prompts.

        prompts: a list of token-id lists (left-padded here), or a (B, Tp) tensor already left-padded with
        `prompt_mask`. Each sequence stops at its first EOS (kept); after it come PADs with response_mask 0.
        eos_id=None never stops early (every response is exactly max_new_tokens long).
        temperature=0 is greedy. top_k / top_p filter the distribution (for demos: PPO must sample from
        softmax(logits/T) itself, RLHF_DETAILS #3). use_cache=False recomputes the whole prefix each step
        (the slow reference, kept for tests and the benchmark). Returns a `Sample`.
        """
        device = self.transformer.wte.weight.device
        if isinstance(prompts, torch.Tensor):
            idx = prompts.to(device)                                                   # (B, Tp)
            pmask = (torch.ones_like(idx, dtype=torch.bool) if prompt_mask is None
                     else prompt_mask.to(device).bool())                               # (B, Tp)
        else:
            idx, pmask = left_pad(prompts, pad_id, device)                             # (B, Tp) each
        B, Tp = idx.size()
        assert Tp + max_new_tokens <= self.config.block_size, (
            f"prompt ({Tp}) + max_new_tokens ({max_new_tokens}) exceeds block_size={self.config.block_size}")

        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, Tn)
        logprobs = torch.zeros(B, max_new_tokens, device=device)                       # (B, Tn)
        done = torch.zeros(B, dtype=torch.bool, device=device)                         # (B,) finished rows
        cache = KVCache(self.config, B, Tp + max_new_tokens, device, self.transformer.wte.weight.dtype) \
            if use_cache else None
        rows = torch.arange(B, device=device)  # the rows still in the batch (with the cache, finished ones leave)
        n_steps = 0
        for t in range(max_new_tokens):
            if use_cache:
                # the prompt once (prefill), then one token at a time; only the last position needs logits.
                # A finished row's PAD is fed as padding (mask 0), so it may lie outside the vocabulary.
                x, m = (idx, pmask) if t == 0 else (out[rows, t - 1:t], ~done[rows, None])
                h = self.hidden(x, m, kv_cache=cache)[:, -1]                           # (b, C)
            else:
                seq = torch.cat([idx, out[:, :t]], 1)                                  # (B, Tp + t)
                alive = mask_after_eos(out[:, :t], eos_id) if eos_id is not None else torch.ones_like(out[:, :t])
                m = torch.cat([pmask, alive.bool()], 1)                                # (B, Tp + t)
                h = self.hidden(seq, m)[:, -1]                                         # (B, C)
            logits = self.lm_head(h).float()                                           # (b, V)
            # one uniform per original row and step, used or not, so the draws do not depend on which rows left
            u = torch.rand(B, 1, generator=generator, device=device)                   # (B, 1)
            tok, lp = sample_from_logits(logits, temperature, top_k, top_p, u=u[rows])  # (b,), (b,)
            finished = done[rows]                                                      # (b,)
            out[rows, t] = torch.where(finished, pad_id, tok)
            logprobs[rows, t] = torch.where(finished, 0.0, lp)
            n_steps = t + 1
            if eos_id is not None:
                done[rows] = finished | (tok == eos_id)
                n_left = int((~done[rows]).sum())
                if n_left == 0:
                    break
                if use_cache and 4 * n_left <= 3 * len(rows):  # a quarter has finished: drop those rows
                    keep = (~done[rows]).nonzero().squeeze(1)                          # (n_left,)
                    cache.keep_rows(keep)
                    rows = rows[keep]
        out, logprobs = out[:, :n_steps], logprobs[:, :n_steps]                        # (B, Tn)
        if eos_id is None:
            response_mask = torch.ones_like(out, dtype=torch.bool)                     # (B, Tn)
        else:
            response_mask = mask_after_eos(out, eos_id)                                # (B, Tn)
        return Sample(torch.cat([idx, out], 1), pmask.long(), response_mask.long(), logprobs)

    # ------------------------------------------------------------------------------------------------------------
    # training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), eps=1e-8, device_type="cpu"):
        """AdamW with weight decay on matrices and embeddings only (biases and LayerNorm gains are not decayed),
        fused when this torch has it."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # the fused kernel (one launch for all parameters) exists for CUDA and, in recent torch, for CPU
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **({"fused": True} if fused else {}))

    # ------------------------------------------------------------------------------------------------------------
    # GPT-2 weights

    @classmethod
    def from_pretrained(cls, model_type, dropout=0.0):
        """OpenAI's GPT-2 ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") through Hugging Face transformers."""
        assert model_type in {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}, f"unknown GPT-2 model {model_type!r}"
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as e:
            raise ImportError(f"loading {model_type} needs the optional package transformers: "
                              "pip install transformers (or train from scratch with --init_from=scratch)") from e
        return cls.from_hf(GPT2LMHeadModel.from_pretrained(model_type), dropout=dropout)

    @classmethod
    def from_hf(cls, hf_model, dropout=0.0):
        """Copy the weights of a transformers GPT2LMHeadModel (downloaded or built locally) into our GPT."""
        c = hf_model.config
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                           n_embd=c.n_embd, dropout=dropout, bias=True)
        model = cls(config)
        sd, sd_hf = model.state_dict(), hf_model.state_dict()
        keys = [k for k in sd_hf if not k.endswith((".attn.bias", ".attn.masked_bias"))]  # buffers, not weights
        assert set(keys) == set(sd), f"parameter names differ: {sorted(set(keys) ^ set(sd))[:6]}"
        # OpenAI's checkpoints use Conv1D layers, which store (in, out): transpose them into our Linear (out, in)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k in keys:
                w = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
                assert w.shape == sd[k].shape, f"{k}: shape {tuple(w.shape)} vs ours {tuple(sd[k].shape)}"
                sd[k].copy_(w)
        return model


class GPTScalar(nn.Module):
    """The reward model and the critic: GPT's trunk with an n_embd -> 1 head instead of the vocabulary.
    `forward` returns one scalar per position (B, T); the reward model reads it at the last real token
    (reward.py), the critic at every response position (train_ppo.py)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt = GPT(config)  # its lm_head is tied to wte, so it adds no parameters and is never used here
        self.head = nn.Linear(config.n_embd, 1)
        # head init N(0, 1/√(d+1)), bias 0 (Stiennon et al. 2020; RLHF_DETAILS #10)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_gpt(cls, gpt, dropout=None):
        """A scalar-head model whose trunk is a copy of `gpt` (the SFT policy), optionally with another dropout."""
        config = gpt.config if dropout is None else GPTConfig(**{**gpt.config.__dict__, "dropout": dropout})
        model = cls(config)
        model.gpt.load_state_dict(gpt.state_dict())
        return model.to(gpt.transformer.wte.weight.device)

    def forward(self, idx, attention_mask=None, position_ids=None):
        h = self.gpt.hidden(idx, attention_mask, position_ids)                        # (B, T, C)
        return self.head(h).squeeze(-1)                                                # (B, T)


# ----------------------------------------------------------------------------------------------------------------
# small functions shared by the stages


def left_pad(seqs, pad_id, device=None):
    """List of token-id lists -> (B, T) left-padded ids and the (B, T) bool mask of real tokens."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)                        # (B, T)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)                                 # (B, T)
    for i, s in enumerate(seqs):
        if len(s):
            idx[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = True
    return idx.to(device), mask.to(device)


def right_pad(seqs, pad_id=0, device=None):
    """List of token-id lists -> (B, T) right-padded ids and the (B, T) long mask of real tokens. Right padding
    needs no attention mask in a causal model: every real token comes before the padding."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)                        # (B, T)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)                                 # (B, T)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return idx.to(device), mask.to(device)


def mask_after_eos(responses, eos_id):
    """1 at every response token up to and including the first EOS, 0 after it (RLHF_DETAILS #7)."""
    is_eos = (responses == eos_id).long()                                              # (B, Tn)
    eos_before = is_eos.cumsum(1) - is_eos                                             # (B, Tn) EOS strictly before t
    return eos_before == 0                                                             # (B, Tn)


def sample_from_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None, u=None):
    """One token per row from softmax(logits / T), optionally restricted to the top-k tokens or the smallest set
    of tokens whose probability reaches top_p (nucleus). Returns the tokens and their log-probabilities under
    the distribution actually sampled from. temperature=0 means greedy (log-prob 0). u: optional (B, 1)
    uniforms in [0, 1) to sample with (default: drawn from `generator`)."""
    if temperature == 0:
        return logits.argmax(-1), torch.zeros(logits.size(0), device=logits.device)
    if temperature != 1.0:  # x / 1 == x exactly: at T = 1 skip a pass over (B, V) (1 ms a step at 50k tokens)
        logits = logits / temperature                                                  # (B, V)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                         # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))                       # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)             # (B, V) each
        cum = sorted_logits.softmax(-1).cumsum(-1)                                     # (B, V)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already reaches p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)           # (B, V)
        logits = logits.masked_fill(drop, float("-inf"))                               # (B, V)
    logp = F.log_softmax(logits, dim=-1)                                               # (B, V)
    # inverse-CDF sampling: the first token whose cumulative probability exceeds u ~ U(0, 1). Same distribution
    # as torch.multinomial, several times cheaper on CPU for one draw per row.
    if u is None:
        u = torch.rand(logits.size(0), 1, generator=generator, device=logits.device)  # (B, 1)
    cdf = logp.exp().cumsum(-1)                                                        # (B, V)
    tok = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp(max=logits.size(-1) - 1)  # (B,)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)                              # (B,), (B,)


def logprobs_from_logits(logits, tokens):
    """log p(token) at each position: log_softmax over the vocabulary, gathered. logits (B, T, V), tokens (B, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, T)


# log π(y) = z_y − logsumexp(z),  H = −Σ_a π(a) log π(a),  z = h·Wᵀ / T                     (the LM head, by chunks)
class HeadLogprobs(torch.autograd.Function):
    """Log-probs (and exact entropy) of given tokens straight from the final hidden states and the LM head's
    weight, a chunk of rows at a time: no (N, V) logits or log-softmax tensor is ever made (at GPT-2's 50k vocabulary
    each would be 150 MB per minibatch), and h is scaled by 1/T before the matmul (a pass over (k, C), not (k, V)).
    When a gradient is needed the softmax is kept for the backward, made in place of each chunk's log-softmax:
    d log π(y)/dz = onehot(y) − softmax(z), times 1/T. Same numbers as logprobs_from_logits(lm_head(h) / T), to
    fp32 rounding."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk, with_entropy, keep):
        """keep: a backward will follow (grad mode on, an input that requires grad), so keep the softmax."""
        N = h.size(0)                                                                  # h (N, C), weight (V, C)
        lp = torch.empty(N, device=h.device)                                           # (N,)
        ent = torch.empty(N, device=h.device) if with_entropy else None                # (N,)
        probs = []
        for s in range(0, N, chunk):
            rows = slice(s, s + chunk)
            z = ((h[rows] * (1.0 / temperature)) @ weight.t()).float()                 # (k, V) logits / T
            # z − logsumexp(z) in one fused kernel: half the time of logsumexp followed by a subtraction
            logp = torch.log_softmax(z, dim=-1)                                        # (k, V)
            del z
            lp[rows] = logp.gather(1, targets[rows, None]).squeeze(1)
            if with_entropy or keep:
                # in place of log p, unless the entropy below still needs it
                p = logp.exp() if with_entropy else logp.exp_()                        # (k, V) softmax
                if with_entropy:  # H = −Σ p·log p
                    ent[rows] = -torch.linalg.vecdot(p, logp)
                if keep:
                    probs.append(p)
        ctx.save_for_backward(h, weight, targets)
        ctx.temperature, ctx.chunk, ctx.probs = temperature, chunk, probs
        if with_entropy:
            ctx.mark_non_differentiable(ent)  # logged, never in a loss
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        h, weight, targets = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, device=weight.device) if ctx.needs_input_grad[1] else None  # (V, C)
        w32 = weight.float()
        for c, s in enumerate(range(0, h.size(0), chunk)):
            rows = slice(s, s + chunk)
            hc, g = h[rows], grad_lp[rows].float() / T                                 # (k, C), (k,)
            # dL/dz = g · (onehot(y) − softmax(z)) / T, built in place of the kept softmax
            gz = ctx.probs[c].mul_(-g[:, None]).scatter_add_(1, targets[rows, None], g[:, None])  # (k, V)
            if grad_h is not None:
                grad_h[rows] = (gz @ w32).to(h.dtype)                                  # (k, C)
            if grad_w is not None:
                grad_w.addmm_(gz.t(), hc.float())                                      # (V, C)
        ctx.probs = None
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None


def head_logprobs(h, weight, tokens, temperature=1.0, with_entropy=False, mask=None, max_chunk_bytes=32 << 20):
    """log π(token) (B, T) from hidden states h (B, T, C) and the LM head's weight (V, C), through HeadLogprobs;
    with_entropy: also the exact per-token entropy (B, T). mask (B, T): only those rows are computed (0 elsewhere),
    so padding after a response's end costs nothing."""
    B, T, C = h.size()
    mask = torch.ones(B, T, dtype=torch.bool, device=h.device) if mask is None else mask.bool()
    chunk = max(1, max_chunk_bytes // (4 * weight.size(0)))  # rows whose fp32 logits fit the budget
    keep = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)  # in no_grad: keep nothing
    lp_real, ent_real = HeadLogprobs.apply(h[mask], weight, tokens[mask], temperature, chunk, with_entropy, keep)
    lp = torch.zeros(B, T, device=h.device).masked_scatter(mask, lp_real)              # (B, T)
    if not with_entropy:
        return lp
    return lp, torch.zeros(B, T, device=h.device).masked_scatter(mask, ent_real)       # (B, T) each
