"""``albor export --hf OUT_DIR (RUN_DIR | FILE.apr)``: a trained model as a Hugging Face model directory.

Everything is checked before anything is written: the flags, OUT_DIR, the
epoch, the tokenizer, then the model file whole (albor.export.model_file).
The directory is then built beside OUT_DIR and renamed into place
(albor.data.staging.publish): a failed export leaves nothing behind, and
an OUT_DIR replaced with ``--force`` stays as it was until the new one is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from albor.data.staging import publish
from albor.data.tokenizer import Tokenizer, load_tokenizer
from albor.errors import ConfigError, UsageErrorParser, run_command
from albor.export.hf_files import write_hf_model
from albor.export.model_file import ModelFile, choose_epoch, load_model_file
from albor.export.run_tokenizer import check_tokenizer_fits, run_tokenizer
from albor.resume_plan import CheckpointOnDisk
from albor.run_files import finite_number

PROG = "albor export"


def build_parser() -> argparse.ArgumentParser:
    p = UsageErrorParser(
        prog=PROG,
        description="Export a trained albor model for other tools. --hf writes a Hugging Face LlamaForCausalLM "
        "directory (config.json, model.safetensors, generation_config.json and the tokenizer files) that "
        "transformers' AutoModelForCausalLM and AutoTokenizer load offline.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 usage (a flag or path, an epoch the run does not have, "
        "a non-empty OUT_DIR without --force, a tokenizer that cannot be found), 3 data (a damaged or foreign "
        ".apr, a tokenizer that is not the run's, a failed write).",
    )
    p.add_argument(
        "source", type=Path, metavar="RUN_DIR|FILE.apr",
        help="a run directory (its best epoch: the lowest val_loss) or a model file",
    )
    p.add_argument("--hf", type=Path, metavar="OUT_DIR", required=True, help="the directory to write")
    p.add_argument("--epoch", type=int, metavar="N", help="export epoch N of RUN_DIR instead of the best one")
    p.add_argument(
        "--tokenizer", type=Path, metavar="DIR",
        help="directory with vocab.json + merges.txt; needed with FILE.apr, found from the run's dataset otherwise",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR (once the new export is complete)")
    return p


@dataclasses.dataclass(frozen=True)
class Exported:
    """What an export wrote, and from what."""

    out: Path
    source: Path
    model: ModelFile
    tokenizer: Tokenizer
    checkpoint: CheckpointOnDisk | None  # the run's epoch it came from; None for a model file given as it is

    def describe(self) -> str:
        m, chosen = self.model, self.checkpoint
        origin = str(m.path) if chosen is None else f"epoch {chosen.epoch} of run {self.source}"
        if chosen is not None and finite_number(val_loss := chosen.metadata.get("val_loss")):
            origin += f", val_loss {val_loss:.4f}"
        return (
            f"{self.out} ({origin}; {m.num_parameters() / 1e6:.2f}M parameters, {m.dtype_name}, "
            f"vocab {m.config.vocab_size}; tokenizer {self.tokenizer.directory})"
        )


def export_hf(
    source: Path, out: Path, *, epoch: int | None = None, tokenizer_dir: Path | None = None, force: bool = False
) -> Exported:
    """Check everything, then write the Hugging Face directory ``out`` all at once; AlborError naming the fix."""
    source, out = Path(source), Path(out)
    _check_source(source, epoch, tokenizer_dir)
    _check_out(out, force)
    # Cheap checks first: the tokenizer before reading (and checking) every byte of the model file.
    if source.is_dir():
        chosen = choose_epoch(source, epoch)
        tokenizer = run_tokenizer(source, chosen.metadata, tokenizer_dir)
        apr_path = chosen.apr_path
    else:
        chosen, tokenizer, apr_path = None, load_tokenizer(tokenizer_dir), source
    _check_not_inside(out, [source, tokenizer.directory])
    model = load_model_file(apr_path)
    check_tokenizer_fits(tokenizer, model.config)
    publish(out, lambda staging: write_hf_model(staging, model, tokenizer), flag="--hf")
    return Exported(out, source, model, tokenizer, chosen)


def _check_source(source: Path, epoch: int | None, tokenizer_dir: Path | None) -> None:
    if not source.exists():
        raise ConfigError(f"{source} does not exist; pass a run directory (--output-dir of albor pretrain) or a .apr file")
    if source.is_dir():
        return
    if epoch is not None:
        raise ConfigError(f"--epoch picks an epoch of a run directory; {source} is a model file: drop --epoch")
    if tokenizer_dir is None:
        raise ConfigError(
            f"{source} is a bare model file, which carries no tokenizer; pass --tokenizer DIR (the vocab.json + "
            "merges.txt it was trained with: the tokenizer/ of the run's dataset), or export the run directory"
        )


def _check_out(out: Path, force: bool) -> None:
    """Refuse an OUT_DIR that cannot be written, or would be overwritten without --force."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--hf {out} is a file; choose a new or empty directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--hf {out} is not empty; choose a new or empty directory, or pass --force to replace it")
    ancestor = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--hf {out} cannot be created in {ancestor}; choose a directory you can write")


def _check_not_inside(out: Path, inputs: list[Path]) -> None:
    """Replacing OUT_DIR must never delete what the export reads (a run, its dataset's tokenizer)."""
    for path in inputs:
        if out.exists() and path.resolve().is_relative_to(out.resolve()):
            raise ConfigError(f"{path} lies inside --hf {out}, which the export replaces; choose another --hf")


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the process exit code (a failed write leaves nothing behind)."""

    def body() -> int:
        args = build_parser().parse_args(argv)
        done = export_hf(args.source, args.hf, epoch=args.epoch, tokenizer_dir=args.tokenizer, force=args.force)
        print(f"{PROG}: wrote {done.describe()}")
        return 0

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
