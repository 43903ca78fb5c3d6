"""tinyshakespeare: plain text for language-model pretraining (train_sft.py's .txt mode) and for smoke runs.

Karpathy's 1.1 MB of Shakespeare (40,000 lines, 65 ASCII characters; char-rnn's input.txt, the file nanoGPT's
shakespeare_char uses). The last --val_fraction of the text is held out, cut at a line boundary, so no line is split
between the two files; train.txt + val.txt is the input byte for byte.

Reads https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt, or --src=PATH.
Writes <out_dir>/train.txt and <out_dir>/val.txt (atomically) and prints characters, lines and GPT-2 tokens.

  python data/shakespeare/prepare.py                                              # download
  python data/shakespeare/prepare.py --src=../shared/data/tinyshakespeare/input.txt
  python train_sft.py --data=data/shakespeare/train.txt --val_data=data/shakespeare/val.txt --tokenizer=gpt2
"""
import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # run as a script from anywhere: the repo's tokenizer.py must be importable

import common as C  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # the file as char-rnn serves it


def fetch(url, timeout) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except (urllib.error.URLError, OSError) as e:  # HTTPError is a URLError; timeouts and resets are OSErrors
        reason = getattr(e, "reason", None) or e
        C.fail(f"could not download {url} ({reason}). With no internet, pass a local copy: --src=path/to/input.txt")


def split_at_line(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): val is the last ~val_fraction of the characters, starting at the beginning of a line."""
    target = int(len(text) * (1 - val_fraction))
    cut = text.rfind("\n", 0, target) + 1  # just after the last newline before the target; 0 if there is none
    return text[:cut], text[cut:]


def write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:  # newline="": write "\n" as is, on every platform
        f.write(text)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one


def main(argv=None):
    p = C.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="", help="local copy of input.txt; empty = download it from --url")
    p.add_argument("--url", default=URL, help="where to download input.txt from when --src is empty")
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)),
                   help="folder for train.txt and val.txt (default: this script's folder)")
    p.add_argument("--val_fraction", type=C.number(float, 0, 1, lo_open=True, hi_open=True), default=0.1, help="share of the characters held out (the end)")
    p.add_argument("--timeout", type=C.positive, default=30.0, help="download timeout in seconds")
    args = p.parse_args(argv)

    if args.src:
        if not os.path.isfile(args.src):
            C.fail(f"--src={args.src}: no such file")
        with open(args.src, "rb") as f:
            raw = f.read()
        origin = args.src
    else:
        print(f"downloading {args.url}")
        raw = fetch(args.url, args.timeout)
        origin = args.url
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        C.fail(f"{origin}: not UTF-8 text ({e})")
    if not text.strip():
        C.fail(f"{origin}: empty")
    digest = hashlib.sha256(raw).hexdigest()
    note = "the known tinyshakespeare" if digest == SHA256 else f"not the known tinyshakespeare {SHA256[:12]}…"
    print(f"read {origin}: {len(raw):,} bytes, sha256 {digest[:12]}… ({note})")

    train, val = split_at_line(text, args.val_fraction)
    if not train or not val:
        C.fail(f"{origin}: too few lines to hold out {args.val_fraction:.0%} at a line boundary")

    os.makedirs(args.out_dir, exist_ok=True)
    tok = get_tokenizer("gpt2")
    for name, part in (("train", train), ("val", val)):
        path = os.path.join(args.out_dir, f"{name}.txt")
        write_text(path, part)
        print(f"{path}: {len(part):,} characters, {part.count(chr(10)):,} lines, "
              f"{len(tok.encode(part)):,} GPT-2 tokens")


if __name__ == "__main__":
    main()
