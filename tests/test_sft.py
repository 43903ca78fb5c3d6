"""SFT learning signal: a tiny GPT overfits one conversation, then greedy decoding reproduces it, EOS included."""
import torch

from model import GPT, GPTConfig
from tokenizer import Tokenizer, render_chat, render_prompt
from common import ChatData


def test_sft_overfits_one_example_and_greedy_reproduces_it():
    torch.manual_seed(0)
    text = "\n\nHuman: Tell me about cats.\n\nAssistant: Cats are soft. Cats like to nap in the sun.\n" * 20
    tok = Tokenizer.train(text, 300)
    conv = [{"role": "user", "content": "Tell me about cats."},
            {"role": "assistant", "content": "Cats are soft. Cats like to nap in the sun. Enjoy!"}]
    data = ChatData([conv], tok, 64, "test")
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32))
    opt = model.configure_optimizers(0.0, 3e-3)
    for step in range(150):
        x, y = data.batch(4, step, 0, "cpu")
        _, loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"one example should be memorised, loss is {loss.item():.4f}"

    # the loss covered only the assistant's tokens, and EOS is one of them
    ids, mask = render_chat(tok, conv)
    assert ids[-1] == tok.eos_id and mask[-1] == 1 and mask[0] == 0

    prompt = render_prompt(tok, conv[:1])
    out = model.eval().generate([prompt], 40, pad_id=tok.pad_id, eos_id=tok.eos_id, temperature=0)
    n = int(out.response_mask.sum())
    response = out.responses[0, :n].tolist()
    assert response[-1] == tok.eos_id, "greedy decoding must end with EOS"
    assert tok.decode(response[:-1]) == " " + conv[1]["content"]
    assert ids == prompt + response  # the whole rendered conversation, token for token
