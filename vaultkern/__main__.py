"""Command line: ``python -m vaultkern <command> [options]``.

Each command lives in its own module and exposes ``main(argv) -> int``.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "info": ("vaultkern.info", "versions and available backends"),
    "plan": ("vaultkern.privacy.plan", "noise multiplier and epsilon for a training plan"),
    "train": ("vaultkern.run.cli", "DP training of the reference decoder"),
    "finetune": ("vaultkern.run.finetune", "DP fine-tuning of a local Hugging Face model"),
    "audit": ("vaultkern.audit", "privacy audit of a training run"),
    "generate": ("vaultkern.generate", "sample text from a trained run"),
    "bench": ("vaultkern.benchmark", "benchmark against Opacus and non-private training"),
}


def usage() -> str:
    lines = ["usage: python -m vaultkern <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`python -m vaultkern <command> --help` explains each command's options.")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
