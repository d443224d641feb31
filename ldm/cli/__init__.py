"""The `ldm` command (`ldm txt2img ...`, `ldm train ...`) and small pieces shared by the subcommands.

Each subcommand is a module here with `main(argv) -> exit code`; `scripts/<name>.py` call the same
functions, so `python scripts/txt2img.py ARGS` and `ldm txt2img ARGS` are one program. A subcommand
builds its parser with `argparse.ArgumentParser(prog=command_name(), ...)`, so its usage and errors
name it as it was run: `ldm txt2img` under the ldm command, `txt2img.py` as a script.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from contextvars import ContextVar
from typing import NoReturn

# subcommand -> (module in ldm.cli, one-line description)
COMMANDS = {
    "txt2img": ("txt2img", "generate images from a text prompt"),
    "img2img": ("img2img", "change an image: img2img, inpainting, outpainting"),
    "train": ("train", "fine-tune or train a model (U-Net, LoRA, from scratch) or its VAE"),
    "compare": ("compare_diffusers", "run ldm and diffusers side by side on the same weights"),
    "eval-shapes": ("eval_shapes", "score a model on the procedural shapes prompts"),
    "benchmark": ("benchmark", "speed and memory against diffusers"),
    "bench-train": ("bench_train", "training step throughput"),
    "package-demo": ("package_demo", "package a trained shapes model as the embedded demo model"),
    "make-tokenizer-assets": ("make_tokenizer_assets", "rebuild the shipped CLIP tokenizer files"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, examples kept as written; no '(default: None)' after a help that says it."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's own refusals (a non-number, an unknown flag, an invalid choice) as one line on stderr, exit 2,
    like every other refusal of the commands."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def fail(message: str) -> int:
    """Print `error: message` on stderr; the exit code of a refusal (2)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


_COMMAND_NAME: ContextVar[str | None] = ContextVar("ldm_command_name", default=None)


def command_name() -> str | None:
    """The program name for the running subcommand's parser: "ldm txt2img" under the ldm command,
    None (argparse's default: the script's file name) otherwise."""
    return _COMMAND_NAME.get()


def run(module: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the subcommand module `ldm.cli.<module>` with argv (default: sys.argv[1:]); its parser
    shows `prog` as the program name (default: the script's file name)."""
    token = _COMMAND_NAME.set(prog)
    try:
        return importlib.import_module(f"ldm.cli.{module}").main(argv)
    finally:
        _COMMAND_NAME.reset(token)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
        print("usage: ldm COMMAND [ARGS...]   (ldm COMMAND --help for its options)\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ldm._version import __version__

        print(f"ldm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run(COMMANDS[name][0], rest, prog=f"ldm {name}")
