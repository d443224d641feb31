"""Derive the CLIP tokenizer files shipped in ldm/assets/tokenizer/ from the BPE table
that OpenAI CLIP (and the `open_clip_torch` wheel) ship as `bpe_simple_vocab_16e6.txt.gz`.

The result is the tokenizer of openai/clip-vit-large-patch14 (the SD1.x text encoder;
SD2.x uses the same vocabulary): 49408 tokens, <|startoftext|> = 49406,
<|endoftext|> = 49407, model_max_length 77. `vocab.json` and `merges.txt` are
written byte for byte in the layout of the Hugging Face files (sorted one-line JSON,
"#version: 0.2" header, no trailing newline).

    pip download --no-deps open_clip_torch -d /tmp/oc
    python scripts/make_tokenizer_assets.py /tmp/oc/open_clip_torch-*.whl

The construction is the one of CLIP's SimpleTokenizer:
    vocab  = 256 byte characters (bytes_to_unicode order)
           + the same 256 with the end-of-word marker "</w>"
           + one token per merge (the two parts joined), in merge order
           + <|startoftext|>, <|endoftext|>
    merges = lines[1 : 49152 - 256 - 2 + 1] of the table (48894 merges)
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import zipfile
from pathlib import Path

from ldm.cli import command_name

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # 48894: CLIP's vocab is 49408 = 2 * 256 + 48894 + 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"

# The two JSON files of openai/clip-vit-large-patch14, in that repository's key order.
_ADDED = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True}
TOKENIZER_CONFIG = {
    "unk_token": {"content": EOS, **_ADDED, "__type": "AddedToken"},
    "bos_token": {"content": BOS, **_ADDED, "__type": "AddedToken"},
    "eos_token": {"content": EOS, **_ADDED, "__type": "AddedToken"},
    "pad_token": EOS,
    "add_prefix_space": False,
    "errors": "replace",
    "do_lower_case": True,
    "name_or_path": "openai/clip-vit-base-patch32",
    "model_max_length": 77,
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
}
SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": BOS, **_ADDED},
    "eos_token": {"content": EOS, **_ADDED},
    "unk_token": {"content": EOS, **_ADDED},
    "pad_token": EOS,
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from the 256 byte values to printable characters.

    Printable latin-1 bytes map to themselves; the other 68 bytes (controls, space,
    0x7f-0xa0, 0xad) map to chr(256 + n) in byte order. The dict order is the vocab order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values, code_points = printable[:], printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + n)
            n += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


def read_bpe_table(path: Path) -> str:
    """Text of bpe_simple_vocab_16e6.txt from the .txt.gz itself or from a wheel holding it."""
    if path.suffix == ".whl" or zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            names = [n for n in wheel.namelist() if n.endswith("/" + BPE_NAME) or n == BPE_NAME]
            if not names:
                raise ValueError(f"{path} holds no {BPE_NAME}; pass the open_clip_torch wheel or the .txt.gz")
            data = wheel.read(names[0])
    else:
        data = path.read_bytes()
    return gzip.decompress(data).decode("utf-8")


def build(table: str) -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merge lines "a b") exactly as CLIP's SimpleTokenizer builds them."""
    lines = table.split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"not a CLIP BPE table: expected {NUM_MERGES} 'a b' merge lines after the header")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(vocab) != 49408:
        raise ValueError(f"vocab has {len(vocab)} distinct tokens, expected 49408")
    return vocab, merges


def write_assets(vocab: dict[str, int], merges: list[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        # The HF files: vocab.json is one sorted line, merges.txt has no final newline.
        "vocab.json": json.dumps(vocab, sort_keys=True, ensure_ascii=False),
        "merges.txt": "\n".join(["#version: 0.2", *merges]),
        "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(SPECIAL_TOKENS_MAP, ensure_ascii=False),
    }
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text, encoding="utf-8", newline="")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=command_name(),
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("source", type=Path, help=f"open_clip_torch wheel (.whl) or {BPE_NAME}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        parser.error(
            f"{args.source} is not a file; get the wheel with `pip download --no-deps open_clip_torch -d /tmp/oc`"
        )
    try:
        vocab, merges = build(read_bpe_table(args.source))
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in write_assets(vocab, merges, args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
