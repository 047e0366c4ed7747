"""The ``albor`` console script: one word per command, each command's own parser behind it."""

from __future__ import annotations

import importlib
import sys

#: command -> (module whose ``main(argv) -> int`` runs it, what it does)
COMMANDS = {
    "pretrain": ("albor.pretrain", "train a model under the contract (same as python -m albor.pretrain)"),
    "prepare-data": ("albor.data.prepare", "tokenize a corpus, or the built-in python-stdlib corpus, into shards"),
    "report": ("albor.report", "draw a run's report.png and print its summary"),
    "export": ("albor.export_hf", "write a run's model as a Hugging Face transformers directory"),
    "status": ("albor.status_cmd", "print a run's status; finalise it if its ranks are gone"),
    "verify-data": ("albor.verify_data", "check every shard of a prepared dataset in full (sha256, token ids)"),
}

USAGE = f"usage: albor {{{','.join(COMMANDS)}}} ...\n\n" + "".join(
    f"  {name:<13} {what}\n" for name, (_, what) in COMMANDS.items()
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"albor: error: unknown command {command!r}: use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # Imported on demand: `albor report` must not pay for torch and DeepSpeed.
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
