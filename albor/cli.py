"""The ``albor`` console script: ``albor pretrain …`` and ``albor prepare-data …``."""

from __future__ import annotations

import sys

USAGE = """usage: albor {pretrain,prepare-data} ...

  pretrain      train a model under the contract (same as python -m albor.pretrain)
  prepare-data  tokenize a corpus, or the built-in python-stdlib corpus, into shards
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "pretrain":
        from albor.pretrain import main as run
    elif command == "prepare-data":
        from albor.data.prepare import main as run
    else:
        print(f"albor: error: unknown command {command!r}: use pretrain or prepare-data", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
