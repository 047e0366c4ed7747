"""What a resume finds on disk, and what it may do with it: no torch, no DeepSpeed, no process group.

A checkpoint is *complete* when its metadata file (the marker, written last)
exists and reads as albor's; it is *resumable* when its DeepSpeed state is also
still there, whole. Everything else albor left in ``ckpt/`` is *debris* (a
save that was cut short, a temporary file, the universal conversion of a
state that is gone): listed with the reason, removed by ``--resume``, never
loaded. Files and directories whose names albor never writes are left alone.
docs/checkpoints.md describes the layout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from albor.atomic_files import write_bytes_atomic
from albor.errors import ConfigError, DataError
from albor.run_files import CONFIG_FILE, finite_number

CKPT_DIR = "ckpt"
DEEPSPEED_DIR = "deepspeed"
METADATA_SUFFIX = ".metadata.json"
APR_SUFFIX = ".apr"
UNIVERSAL_SUFFIX = "_universal"
TMP_SUFFIX = ".tmp"
#: Each rank's own resume state inside ``ckpt/deepspeed/<tag>/`` (RNGs, data cursor), JSON.
RANK_STATE_FILE = "albor-rank-{rank}.json"

#: Checkpoint tags as albor.contract.CheckpointPoint names them.
_TAG = re.compile(r"epoch-(?P<epoch>\d{3,})|step-(?P<step>\d{7,})")
#: The keys of metadata["run"]: what a resumed run must share with the checkpoint.
RUN_KEYS = (
    "model", "seq_length", "lr_max", "lr_min", "warmup_steps", "total_steps", "steps_per_epoch",
    "global_batch", "seed", "dataset_fingerprint", "vocab_multiple",
)
#: Run fields newer than some checkpoints, and the value a checkpoint without one had: albor padded
#: no vocabulary before vocab_multiple existed (DeepSpeed's state holds the padded shapes).
_RUN_DEFAULTS: dict[str, Any] = {"vocab_multiple": 1}
_REQUIRED_KEYS = ("kind", "tag", "step", "epoch", "world_size", "run", "resume")
#: The flag that sets each run field (global_batch and the dataset get their own advice).
_FLAG = {
    "model": "--model", "seq_length": "--seq-length", "lr_max": "--lr-max", "lr_min": "--lr-min",
    "warmup_steps": "--warmup-steps", "total_steps": "--total-steps", "steps_per_epoch": "--steps-per-epoch",
    "seed": "--seed", "vocab_multiple": "--vocab-multiple",
}


def rank_state_path(ds_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its RNG states and data cursor for the DeepSpeed state in ``ds_dir``."""
    return Path(ds_dir) / RANK_STATE_FILE.format(rank=rank)


@dataclasses.dataclass(frozen=True)
class CheckpointOnDisk:
    """A complete checkpoint as found on disk (its metadata parsed and checked)."""

    tag: str
    kind: str  # "epoch" | "preemption"
    step: int  # optimizer steps completed when it was taken: the step a resumed run starts at
    epoch: int  # the epoch of the last completed step
    metadata_path: Path
    ds_dir: Path  # ckpt/deepspeed/<tag>; may be gone (pruned) for a complete, not resumable one
    metadata: dict[str, Any] = dataclasses.field(repr=False, compare=False)
    apr_path: Path | None = None  # the epoch's model file, when there is one

    @property
    def world_size(self) -> int:
        """The world size that wrote it; a resume on another one goes through the universal checkpoint."""
        return int(self.metadata["world_size"])

    @property
    def universal_dir(self) -> Path:
        """Where DeepSpeed's universal conversion of this state goes (ckpt/deepspeed/<tag>_universal)."""
        return self.ds_dir.with_name(self.tag + UNIVERSAL_SUFFIX)

    @property
    def run(self) -> dict[str, Any]:
        return self.metadata["run"]

    @property
    def loop_state(self) -> dict[str, Any]:
        """PretrainLoop.state_dict() as it was when the checkpoint was taken."""
        return self.metadata["resume"]

    def describe(self) -> str:
        return f"{self.tag} ({self.kind} checkpoint at step {self.step}, epoch {self.epoch}, world size {self.world_size})"


@dataclasses.dataclass(frozen=True)
class Debris:
    """Something albor wrote in ckpt/ that belongs to no complete checkpoint, and why it is debris."""

    path: Path
    reason: str


@dataclasses.dataclass(frozen=True)
class ScanResult:
    resumable: list[CheckpointOnDisk]  # by step, oldest first
    complete_not_resumable: list[CheckpointOnDisk]  # epoch checkpoints whose DeepSpeed state was pruned
    debris: list[Debris]

    @property
    def newest(self) -> CheckpointOnDisk | None:
        return self.resumable[-1] if self.resumable else None


def _tag_of(name: str, suffix: str) -> str | None:
    if not name.endswith(suffix):
        return None
    tag = name[: len(name) - len(suffix)] if suffix else name
    return tag if _TAG.fullmatch(tag) else None


def _metadata_problem(meta: Any, tag: str) -> str | None:
    """Why a parsed metadata file is not albor's marker for ``tag``, or None."""
    if not isinstance(meta, dict):
        return f"is not a JSON object (a {type(meta).__name__})"
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        return f"lacks {', '.join(missing)}"
    match = _TAG.fullmatch(tag)
    kind = "epoch" if match and match["epoch"] is not None else "preemption"

    def whole(key: str, minimum: int) -> bool:
        value = meta[key]
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    if meta["tag"] != tag:
        return f"names tag {meta['tag']!r}, not its own {tag!r}"
    if meta["kind"] != kind:
        return f"has kind {meta['kind']!r}, but a {tag} checkpoint is a {kind} checkpoint"
    for key, minimum in (("step", 0), ("epoch", 0), ("world_size", 1)):
        if not whole(key, minimum):
            return f"has {key} {meta[key]!r}, not a whole number >= {minimum}"
    if kind == "epoch" and meta["epoch"] != int(match["epoch"]):
        return f"has epoch {meta['epoch']}, not the {int(match['epoch'])} its tag says"
    if kind == "preemption" and meta["step"] != int(match["step"]):
        return f"has step {meta['step']}, not the {int(match['step'])} its tag says"
    if not isinstance(meta["run"], dict) or (
        lacking := [k for k in RUN_KEYS if k not in meta["run"] and k not in _RUN_DEFAULTS]
    ):
        return "has no run record" if not isinstance(meta["run"], dict) else f"has a run record without {', '.join(lacking)}"
    resume = meta["resume"]
    if not isinstance(resume, dict) or resume.get("next_step") != meta["step"]:
        return "has a resume state that does not continue at its own step"
    return None


def _read_metadata(path: Path, tag: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        meta = json.loads(path.read_text())
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        return None, f"is not valid JSON ({e})"
    problem = _metadata_problem(meta, tag)
    return (None, problem) if problem else (meta, None)


def scan_checkpoints(run_dir: Path) -> ScanResult:
    """Classify everything albor wrote in ``run_dir/ckpt``; reads only, removes nothing."""
    ckpt = Path(run_dir) / CKPT_DIR
    if not ckpt.is_dir():
        return ScanResult([], [], [])
    debris: list[Debris] = []
    metas: dict[str, CheckpointOnDisk] = {}
    unreadable: dict[str, str] = {}  # tag -> why its metadata does not count
    legacy: set[str] = set()  # epochs written before checkpoints carried a resume state
    complete_legacy: list[CheckpointOnDisk] = []  # their step is unknown: -1
    aprs: dict[str, Path] = {}
    for p in sorted(ckpt.iterdir()):
        if (tag := _tag_of(p.name, METADATA_SUFFIX)) is not None and p.is_file():
            meta, problem = _read_metadata(p, tag)
            if meta is None and _is_pre_resume_epoch(p):
                legacy.add(tag)  # an older albor's complete epoch: not resumable, and never albor's to delete
                legacy_meta = json.loads(p.read_text())
                complete_legacy.append(CheckpointOnDisk(
                    tag, "epoch", -1, int(legacy_meta["epoch"]), p, ckpt / DEEPSPEED_DIR / tag, legacy_meta,
                    apr_path=ckpt / f"{tag}{APR_SUFFIX}" if (ckpt / f"{tag}{APR_SUFFIX}").is_file() else None,
                ))
            elif meta is None:
                unreadable[tag] = problem
                debris.append(Debris(p, f"metadata that {problem}"))
            else:
                metas[tag] = CheckpointOnDisk(
                    tag, meta["kind"], meta["step"], meta["epoch"], p, ckpt / DEEPSPEED_DIR / tag, meta
                )
        elif (tag := _tag_of(p.name, APR_SUFFIX)) is not None and p.is_file():
            aprs[tag] = p
    states, universals = _deepspeed_dirs(ckpt / DEEPSPEED_DIR)

    def unfinished(tag: str) -> str:
        return f"whose metadata {unreadable[tag]}" if tag in unreadable else "without metadata: a save that did not finish"

    resumable: list[CheckpointOnDisk] = []
    complete_only: list[CheckpointOnDisk] = []
    for tag, found in metas.items():
        if found.kind == "epoch" and tag in aprs:
            found = dataclasses.replace(found, apr_path=aprs[tag])
        lacking = _missing_rank_files(found) if tag in states else None
        if lacking == []:
            resumable.append(found)
            continue
        if lacking:  # the marker comes after every rank's files: a removal or a copy since was cut short
            why = f"DeepSpeed state of {tag} without {', '.join(lacking)} (a removal or copy was cut short)"
            debris.append(Debris(found.ds_dir, why))
        if found.kind == "epoch":
            complete_only.append(found)  # an epoch's .apr and metadata are kept for good
        else:  # pruning a preemption checkpoint removes its metadata too: this pruning was cut short
            debris.append(Debris(found.metadata_path, f"preemption checkpoint {tag} whose DeepSpeed state is gone (pruned)"))
    for tag, p in aprs.items():
        if tag in legacy:
            continue
        if tag not in metas:
            debris.append(Debris(p, f"model file of {tag}, {unfinished(tag)}"))
        elif metas[tag].kind != "epoch":
            debris.append(Debris(p, f"model file of {tag}, which is a preemption checkpoint: those have no model file"))
    debris += [Debris(p, f"DeepSpeed state of {tag}, {unfinished(tag)}") for tag, p in states.items()
               if tag not in metas and tag not in legacy]
    usable = {c.tag for c in resumable}
    debris += [Debris(p, f"universal conversion of {tag}, which is not resumable")
               for tag, p in universals.items() if tag not in usable]
    debris += _temporary_files(ckpt, {d.path for d in debris})
    return ScanResult(sorted(resumable, key=_age), complete_legacy + sorted(complete_only, key=_age), debris)


def _is_pre_resume_epoch(path: Path) -> bool:
    """An epoch's metadata as albor wrote it before checkpoints were resumable: the contract's fields, no resume state."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and "resume" not in meta and {"epoch", "val_loss", "optimizer_state_sha"} <= set(meta)


def _deepspeed_dirs(ds_root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(tag -> DeepSpeed state directory, tag -> its universal conversion); other entries are DeepSpeed's own."""
    states: dict[str, Path] = {}
    universals: dict[str, Path] = {}
    if ds_root.is_dir():
        for p in sorted(ds_root.iterdir()):
            if not p.is_dir():
                continue  # latest, DeepSpeed's recovery scripts
            if _tag_of(p.name, "") is not None:
                states[p.name] = p
            elif (tag := _tag_of(p.name, UNIVERSAL_SUFFIX)) is not None:
                universals[tag] = p
    return states, universals


def _missing_rank_files(found: CheckpointOnDisk) -> list[str]:
    """The per-rank state files of ``found`` that are not in its DeepSpeed directory."""
    paths = (rank_state_path(found.ds_dir, r) for r in range(found.world_size))
    return [p.name for p in paths if not p.is_file()]


def _temporary_files(ckpt: Path, listed: set[Path]) -> list[Debris]:
    """Leftovers of atomic writes (``*.tmp``), except those inside something already listed."""
    out: list[Debris] = []
    for p in sorted(ckpt.rglob("*" + TMP_SUFFIX)):  # sorted: a directory comes before what it holds
        if any((ckpt / q) in listed or q.name.endswith(TMP_SUFFIX) for q in p.relative_to(ckpt).parents):
            continue
        out.append(Debris(p, "temporary file of a write that did not finish"))
        listed.add(p)
    return out


def _age(c: CheckpointOnDisk) -> tuple[int, bool]:
    # At one step an epoch checkpoint counts as the newer: the same state, plus the .apr.
    return c.step, c.kind == "epoch"


def best_epoch(checkpoints: Sequence[CheckpointOnDisk]) -> CheckpointOnDisk | None:
    """The epoch checkpoint with the lowest finite val_loss, the earliest on a tie (as the loop counts "best")."""
    scored = [c for c in checkpoints if c.kind == "epoch" and finite_number(c.metadata.get("val_loss"))]
    return min(scored, key=lambda c: (c.metadata["val_loss"], c.epoch), default=None)


def remove_debris(debris: Sequence[Debris], log: logging.Logger) -> None:
    """Warn a line per item naming it and why, then remove it.

    A removal that fails stops the resume (exit 2): a half-written state left in
    place could be mixed into the next save under the same tag.
    """
    for item in debris:
        log.warning("removing %s: %s", item.path, item.reason)
        try:
            if item.path.is_dir() and not item.path.is_symlink():
                shutil.rmtree(item.path)
            else:
                item.path.unlink(missing_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot remove {item.path} ({e.strerror}): remove it by hand, then resume again") from None


def _candidates(run_dir: Path, text: str) -> list[Path]:
    """The paths ``--resume TEXT`` may mean: the path as given, then (a bare name) a name in the run's ckpt/."""
    out = [Path(text)]
    if "/" not in text:
        ckpt = Path(run_dir) / CKPT_DIR
        out += [ckpt / text, ckpt / f"{text}{METADATA_SUFFIX}", ckpt / f"{text}{APR_SUFFIX}", ckpt / DEEPSPEED_DIR / text]
    return out


def resume_target_exists(run_dir: Path, text: str) -> bool:
    """Whether ``--resume TEXT`` names something on disk (the config's check; find_resume_point says if it is resumable)."""
    return any(p.exists() for p in _candidates(run_dir, text))


def _tag_named_by(run_dir: Path, text: str) -> tuple[str | None, str]:
    """(the checkpoint tag ``text`` names, or None with why not)."""
    ckpt = (Path(run_dir) / CKPT_DIR).resolve()
    for p in _candidates(run_dir, text):
        if not p.exists():
            continue
        p = p.resolve()
        if p.is_file() and p.parent == ckpt:
            tag = _tag_of(p.name, METADATA_SUFFIX) or _tag_of(p.name, APR_SUFFIX)
        elif p.is_dir() and p.parent == ckpt / DEEPSPEED_DIR:
            tag = _tag_of(p.name, "") or _tag_of(p.name, UNIVERSAL_SUFFIX)
        else:
            owner = p.parent.parent if p.parent.name == DEEPSPEED_DIR else p.parent
            if owner.name == CKPT_DIR and owner != ckpt:
                return None, f"is a checkpoint of the run in {owner.parent}, not of {run_dir}: pass --output-dir {owner.parent}"
            return None, f"is not a checkpoint of the run in {run_dir}"
        if tag is None:
            return None, "is not a checkpoint's metadata, .apr, DeepSpeed directory or tag"
        return tag, ""
    if _TAG.fullmatch(text):
        return text, ""
    return None, "does not exist"


def find_resume_point(run_dir: Path, resume: str, *, scan: ScanResult | None = None) -> CheckpointOnDisk | None:
    """The checkpoint ``--resume`` asks for: ``auto`` -> the newest resumable one, or None to start fresh.

    A PATH may be a checkpoint's metadata file, an epoch's ``.apr``, its DeepSpeed
    tag directory, or its tag. Raises ConfigError (exit 2) naming what is wrong
    and listing the resumable checkpoints.
    """
    scan = scan if scan is not None else scan_checkpoints(run_dir)
    where = Path(run_dir) / CKPT_DIR
    if scan.resumable:
        listing = f"resumable checkpoints in {where}: " + ", ".join(f"{c.tag} (step {c.step})" for c in scan.resumable)
    else:
        listing = f"there is no resumable checkpoint in {where}"
    if resume == "auto":
        if scan.resumable or not scan.complete_not_resumable:
            return scan.newest
        last = scan.complete_not_resumable[-1]
        # Starting over would drop every metrics row and overwrite the epochs' model files: refuse.
        raise ConfigError(
            f"--resume auto: {run_dir} holds a run whose checkpoints have no DeepSpeed state left "
            f"(newest: {last.tag}{f', step {last.step}' if last.step >= 0 else ''}), so it cannot be continued: "
            "start a new run from its model "
            f"with --init-from {last.apr_path or last.metadata_path} --output-dir NEW_DIR"
        )
    tag, why = _tag_named_by(run_dir, resume)
    if tag is not None:
        for c in scan.resumable:
            if c.tag == tag:
                return c
        for c in scan.complete_not_resumable:
            if c.tag == tag:
                hint = f" (start a new run from its model with --init-from {c.apr_path})" if c.apr_path else ""
                why = f"is checkpoint {tag}, whose DeepSpeed state was pruned{hint}"
                break
        else:
            debris = [d for d in scan.debris if d.path.name in (tag, tag + METADATA_SUFFIX, tag + APR_SUFFIX)]
            why = f"is {tag}, not a complete checkpoint: {debris[0].reason}" if debris else f"names no checkpoint {tag}"
    raise ConfigError(f"--resume {resume}: {why}; {listing}")


def run_fields(config: Any, *, global_batch: int, dataset_fingerprint: str) -> dict[str, Any]:
    """metadata["run"] for a run of ``config`` (a PretrainConfig): what a resume of it must match."""
    given = {"global_batch": global_batch, "dataset_fingerprint": dataset_fingerprint}
    return {k: given[k] if k in given else getattr(config, k) for k in RUN_KEYS}


def check_compatible(
    ckpt: CheckpointOnDisk, run: Mapping[str, Any], *, world_size: int, gradient_accumulation: int = 1
) -> None:
    """Refuse a resume whose run differs from the checkpoint's, naming every differing value and its fix.

    ``run`` holds :data:`RUN_KEYS` for the resuming run. The world size may
    differ (the state is resharded) as long as the global batch is the same.
    ConfigError (exit 2) for flags; DataError (exit 3) when only the dataset differs.
    """
    saved = {**_RUN_DEFAULTS, **ckpt.run}
    problems: list[str] = []
    for key in RUN_KEYS:
        if key in ("global_batch", "dataset_fingerprint") or run[key] == saved[key]:
            continue
        problems.append(f"{key} is {run[key]} but the checkpoint's is {saved[key]}: pass {_FLAG[key]} {saved[key]}")
    if run["global_batch"] != saved["global_batch"]:
        n, per_micro = saved["global_batch"], world_size * gradient_accumulation
        accumulation = f" and gradient accumulation {gradient_accumulation}" if gradient_accumulation != 1 else ""
        fix = (f"with {world_size} rank(s){accumulation} pass --batch-size {n // per_micro}" if n % per_micro == 0
               else f"{n} is not a multiple of {world_size} rank(s) x gradient accumulation {gradient_accumulation}: "
                    "run on a world size that divides it")
        problems.append(
            f"global_batch is {run['global_batch']} but the checkpoint's is {n}: "
            f"keep micro-batch x gradient accumulation x world size = {n}: {fix}"
        )
    data_differs = run["dataset_fingerprint"] != saved["dataset_fingerprint"]
    if data_differs:
        problems.append(
            f"the dataset differs (fingerprint {run['dataset_fingerprint']}, the checkpoint's {saved['dataset_fingerprint']}): "
            f"pass the --dataset and --tokenizer the run started with (see {ckpt.metadata_path.parent.parent / CONFIG_FILE})"
        )
    if problems:
        message = f"cannot resume from {ckpt.tag} in {ckpt.metadata_path.parent}: " + "; ".join(problems)
        raise (DataError if data_differs and len(problems) == 1 else ConfigError)(message)


def truncate_metrics(path: Path, *, keep_below_step: int) -> int:
    """Keep only metrics.jsonl rows with step < ``keep_below_step``; return how many rows were dropped.

    The rows an interrupted run wrote after its checkpoint are dropped, so the
    resumed run writes each step once. A torn tail (a run killed mid-write: no
    newline, or bytes that are not JSON) is dropped too; an unreadable row in
    the middle is refused (exit 2) rather than guessed about. The rewrite is
    atomic; kept rows keep their exact bytes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    steps: list[int | None] = []
    for raw in lines:
        try:
            row = json.loads(raw)
            steps.append(row["step"] if isinstance(row, dict) and type(row.get("step")) is int else None)
        except (UnicodeDecodeError, ValueError):
            steps.append(None)
    good = max((i for i, s in enumerate(steps) if s is not None), default=-1)
    bad = [i for i, s in enumerate(steps[:good]) if s is None]
    if bad:
        raise ConfigError(
            f"{path} line {bad[0] + 1} is not a metrics row: the run directory is damaged; fix or remove that line, then resume"
        )
    kept = [raw for raw, s in zip(lines[: good + 1], steps) if s < keep_below_step]
    dropped = len(lines) - len(kept) + (1 if torn else 0)
    if dropped:
        write_bytes_atomic(path, b"".join(raw + b"\n" for raw in kept))
    return dropped


def launcher_command(world_size: int, local_world_size: int) -> str:
    """How to start albor pretrain on this many ranks again (a rank cannot see its launcher's command line).

    One rank: ``albor pretrain``. One node: the deepspeed launcher with that many
    ranks. Several nodes: the deepspeed launcher with a hostfile the user fills in.
    """
    if world_size <= 1:
        return "albor pretrain"
    if local_world_size >= world_size:
        return f"deepspeed --num_gpus {world_size} --module albor.pretrain"
    return "deepspeed --hostfile HOSTFILE --module albor.pretrain"


def _without(argv: Sequence[str], flags: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True  # and its value
        elif not any(arg.startswith(f + "=") for f in flags):
            out.append(arg)
    return out


def resume_command(
    run_dir: Path, *, argv: Sequence[str] | None = None, cwd: Path | None = None, launcher: str = "albor pretrain"
) -> str:
    """The one line a user runs to continue this run: the same arguments, from the same directory, with --resume auto.

    ``argv`` is pretrain's own arguments as it was invoked (``pretrain.invoked_argv()``);
    without them the run's config.yaml stands in. ``--resume``/``--init-from`` are
    replaced by ``--resume auto`` (the newest checkpoint is what a user means after
    a preemption), ``--dry-run`` and the launcher's ``--local_rank`` are dropped.
    The ``cd`` is there because relative paths, on the command line and in a
    config file, were relative to that directory.
    """
    if argv is None:
        args = ["--config", str(Path(run_dir) / CONFIG_FILE)]
    else:
        args = [a for a in _without(argv, ("--resume", "--init-from", "--local_rank", "--local-rank")) if a != "--dry-run"]
    args += ["--resume", "auto"]
    return f"cd {shlex.quote(str(cwd if cwd is not None else Path.cwd()))} && {launcher} {shlex.join(args)}"
