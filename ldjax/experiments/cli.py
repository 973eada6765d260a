"""``ldjax`` command line: ``ldjax mnist | lm | squeeze | analyze | reproduce ...``.

Each subcommand lives in its own module and is imported only when used.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "mnist": (
        "ldjax.experiments.mnist.cli",
        "the MNIST warm-up: per-step and accumulated influence, eNTK",
    ),
    "lm": (
        "ldjax.experiments.lm.cli",
        "the small transformer LM: pretrain, sft, dpo, pipeline, one-step",
    ),
    "squeeze": (
        "ldjax.experiments.squeeze.cli",
        "the squeezing effect on the reference toy and random draws",
    ),
    "analyze": (
        "ldjax.experiments.analyze.cli",
        "batch influence of every training example on every probe (mnist | lm)",
    ),
    "reproduce": (
        "ldjax.experiments.reproduce.cli",
        "the paper's LM claims in one run, with a claims table",
    ),
}


def _usage() -> str:
    lines = [
        "usage: ldjax COMMAND [options]   (ldjax COMMAND --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ldjax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    rc = module.main(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
