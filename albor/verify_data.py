"""``albor verify-data DIR``: check every shard of a prepared dataset in full, in parallel.

No torch. Exit codes: 0 every shard is what index.json says; 3 some shard is
not (one line per bad shard on stderr, naming it, the expected and actual
sha256 and the fix) or the index itself is unusable; 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from albor.data.shards import index_path
from albor.data.verify import default_workers, verify_dataset
from albor.errors import ConfigError, ExitCode, UsageErrorParser, run_command

PROG = "albor verify-data"


def build_parser() -> argparse.ArgumentParser:
    p = UsageErrorParser(
        prog=PROG,
        description="Read every shard of a dataset made by `albor prepare-data` and check its sha256 and its "
        "largest token id against index.json. A run does the same once, in the background, during its first steps.",
        epilog="Exit codes: 0 the dataset is good, 1 internal error, 2 usage, 3 a bad shard (one line each) "
        "or an unusable index.json.",
    )
    p.add_argument("dataset", type=Path, metavar="DIR", help="the dataset directory (or its index.json)")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help="check every id is below N, a model's vocab_size (default: the index's vocab_size)")
    p.add_argument("--workers", type=int, metavar="N", help=f"threads reading shards (default: all cores, here {default_workers()})")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the process exit code."""

    def body() -> int:
        args = build_parser().parse_args(argv)
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers {args.workers} must be at least 1")
        if args.vocab_size is not None and args.vocab_size < 1:
            raise ConfigError(f"--vocab-size {args.vocab_size} must be at least 1")
        if not args.dataset.exists():
            raise ConfigError(f"{args.dataset} does not exist: pass the directory `albor prepare-data` wrote (or its index.json)")
        report = verify_dataset(args.dataset, vocab_size=args.vocab_size, workers=args.workers, progress=True)
        rate = report.bytes / 1e6 / report.seconds if report.seconds > 0 else float("inf")
        print(f"{PROG}: {report.index_path}: {report.shards} shard(s), {report.bytes / 1e6:,.1f} MB, "
              f"sha256 and largest token id checked on {report.workers} thread(s) in {report.seconds:.2f} s "
              f"({rate:,.0f} MB/s)")
        for problem in report.problems:
            print(f"{PROG}: error: {problem.message}", file=sys.stderr)
        if report.problems:
            print(f"{PROG}: {len(report.problems)} of {report.shards} shard(s) bad; a run on this dataset would "
                  f"stop with exit 3", file=sys.stderr)
            return int(ExitCode.DATA)
        print(f"{PROG}: ok: every shard matches {index_path(args.dataset)}")
        return int(ExitCode.OK)

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
