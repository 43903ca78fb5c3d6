"""
Talk to any stage's checkpoint.

  SFT, PPO or DPO checkpoint: generate answers to one prompt (--prompt), to a file of prompts (--prompts_file: .txt one
  per line, or prompt JSONL), or chat interactively (--chat=1): a multi-turn conversation whose history is kept
  within the model's context, oldest turns dropped first. Reads lines from stdin, so it can be driven by a pipe.
  Reward-model checkpoint: print the (normalised) score of --response for --prompt.

  python sample.py --ckpt=out/ppo/ckpt.pt --prompt="Can you tell me about cats?"
  python sample.py --ckpt=out/sft/ckpt.pt --chat=1 --temperature=0.7 --top_p=0.9
  python sample.py --ckpt=out/rm/ckpt.pt --prompt="Tell me about cats." --response="Cats are soft."
"""

import argparse
import json
import os
import sys

import torch

import common as C


def load_policy(ckpt_path, device):
    """(GPT, tokenizer, stage) from an SFT, PPO or DPO checkpoint; (GPTScalar, tokenizer, 'rm') from a reward model's."""
    from model import GPT, GPTConfig
    from tokenizer import Tokenizer
    ck = C.load_checkpoint(ckpt_path, "--ckpt", kinds=("sft", "rm", "ppo", "dpo"))
    stage = ck["stage"]
    tok = Tokenizer.from_dict(ck["tokenizer"])
    if stage == "rm":
        import reward
        if not C.is_complete(ck):
            C.fail(f"--ckpt {ckpt_path} is an unfinished reward model's checkpoint (no normalisation μ, σ yet): "
                   "finish its run with --resume=1, or pass the final checkpoint")
        rm, mu, sigma = reward.load_reward_model(ck, device)
        rm.mu, rm.sigma = mu, sigma
        return rm, tok, stage
    model = GPT(GPTConfig(**{**ck["model_args"], "dropout": 0.0}))
    model.load_state_dict(ck["policy"] if stage == "ppo" else ck["model"])
    return model.to(device).eval(), tok, stage


def reply(model, tok, messages, args, gen, device):
    """One sampled assistant turn for a conversation that ends with the user."""
    from tokenizer import render_prompt
    ids = render_prompt(tok, messages, max_tokens=model.config.block_size - args.max_new_tokens)
    (text, eos), = C.sample_texts(model, tok, [ids], args.max_new_tokens, gen, args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, device=device)
    return text, eos


def main(argv=None):
    p = C.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/ppo/ckpt.pt", help="checkpoint of any stage")
    p.add_argument("--prompt", default="", help="one user message")
    p.add_argument("--prompts_file", default="", help=".txt (one prompt per line) or prompt JSONL")
    p.add_argument("--chat", type=C.flag01, default=0, help="1: interactive multi-turn chat on stdin")
    p.add_argument("--response", default="", help="reward model: the response to score")
    p.add_argument("--num_samples", type=C.count(), default=1, help="answers per prompt")
    p.add_argument("--max_new_tokens", type=C.count(), default=64, help="response length limit")
    p.add_argument("--temperature", type=C.nonneg, default=0.7, help="sampling temperature T ≥ 0 (0 = greedy)")
    p.add_argument("--top_k", type=C.count(), default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top_p", type=C.number(float, 0, 1, lo_open=True), default=None, help="nucleus sampling: the smallest set of tokens with probability ≥ p")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = C.get_device(args.device)
    model, tok, stage = load_policy(args.ckpt, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    if stage == "rm":
        if not (args.prompt and args.response):
            C.fail("a reward-model checkpoint scores a response: give --prompt and --response")
        import reward
        from tokenizer import render_chat
        ids, _ = render_chat(tok, [{"role": "user", "content": args.prompt},
                                   {"role": "assistant", "content": args.response}])
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            raw = reward.score(model, x, torch.ones_like(x)).item()
        print(f"score {reward.normalize(raw, model.mu, model.sigma):+.3f} (normalised; raw {raw:+.3f})")
        return

    if args.chat:
        messages = []
        interactive = sys.stdin.isatty()
        print("chat: type a message, an empty line or Ctrl-D to stop", file=sys.stderr)
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line or not line.strip():
                break
            messages.append({"role": "user", "content": line.strip()})
            text, eos = reply(model, tok, messages, args, gen, device)
            print(f"assistant> {text}" + ("" if eos else " [no EOS: hit --max_new_tokens]"), flush=True)
            messages.append({"role": "assistant", "content": text})
        return

    prompts = []
    if args.prompt:
        prompts.append(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            C.fail(f"--prompts_file={args.prompts_file}: no such file")
        if args.prompts_file.endswith((".jsonl", ".jsonl.gz")):
            from data.formats import DataError, load_prompts
            try:
                prompts += [m for m in load_prompts(args.prompts_file)]
            except DataError as e:
                C.fail(str(e))
        else:
            try:
                with open(args.prompts_file, encoding="utf-8") as f:
                    prompts += [line.strip() for line in f if line.strip()]
            except UnicodeDecodeError as e:
                C.fail(f"--prompts_file={args.prompts_file}: not UTF-8 text (byte offset {e.start}): a binary file?")
    if not prompts:
        C.fail("nothing to do: give --prompt, --prompts_file or --chat=1")
    for prompt in prompts:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        for _ in range(args.num_samples):
            text, eos = reply(model, tok, messages, args, gen, device)
            print(json.dumps({"prompt": messages[-1]["content"], "response": text, "eos": eos}))


if __name__ == "__main__":
    main()
