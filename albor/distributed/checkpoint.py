"""Checkpoints of a DeepSpeed run: epoch checkpoints (with the ``.apr``) and preemption checkpoints.

Every rank calls :meth:`Checkpointer.save` at the same step (DeepSpeed's save
is collective). In order:

1. epoch points only: the fp32 master weights are gathered from the ZeRO
   partitions to rank 0, which writes them as the ``.apr``;
2. every rank joins DeepSpeed's save of its own optimizer partition and
   flushes the files to disk (DeepSpeed does not);
3. every rank writes its own ``albor-rank-R.json``: its RNG states and its
   data cursor, as JSON;
4. vote 1: every rank learns whether every rank's files are written;
5. rank 0 writes DeepSpeed's ``latest``, then the metadata JSON: the marker
   that makes the checkpoint complete;
6. vote 2: every rank learns whether the marker was written.

Any failure makes every rank raise :class:`CheckpointError` together, and
rank 0 removes what this point wrote (earlier checkpoints untouched, ``latest``
restored). Then rank 0 prunes: the DeepSpeed states of the newest
:data:`KEEP_DEEPSPEED_STATES` complete checkpoints stay. docs/checkpoints.md
describes the layout.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from albor.apr import write_apr
from albor.atomic_files import write_json_atomic, write_text_atomic
from albor.contract import CheckpointPoint
from albor.data.loader import TrainLoader
from albor.distributed.compat import checkpoint_writes_through, zero_master_groups
from albor.distributed.process_group import DistEnv
from albor.errors import DataError
from albor.loop import CheckpointError
from albor.model import ModelConfig, real_rows, to_hf_state_dict
from albor.model.config import to_apr_metadata
from albor.resume_plan import rank_state_path

log = logging.getLogger("albor")

#: DeepSpeed states kept on disk (each is ~12 bytes a parameter); every .apr and epoch metadata is kept.
KEEP_DEEPSPEED_STATES = 2
#: The tags albor gives its checkpoints (``CheckpointPoint``): anything else in ckpt/ is not albor's.
TAG_PATTERN = re.compile(r"epoch-\d{3,}|step-\d{7,}")
RANK_STATE_FORMAT = "albor-rank-state-v1"


def apr_metadata(cfg: ModelConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """An epoch's ``.apr`` metadata: the architecture (albor.model.config.to_apr_metadata), then ``extra``."""
    return {**to_apr_metadata(cfg), **extra}


# --- the fp32 master weights ------------------------------------------------------------


def fp32_master_state_dict(engine, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The model's fp32 master weights under Hugging Face names, on rank 0 (CPU tensors); None elsewhere.

    Collective: every rank must call it. Each param group's partitions are
    gathered to rank 0 and cut per parameter at DeepSpeed's own offsets, so
    the result equals DeepSpeed's ``zero_to_fp32`` consolidation bit for bit,
    whatever the module's dtype (bf16 on GPU), but for a padded vocabulary
    (``vocab_multiple``): the names and shapes are :func:`albor.model.to_hf_state_dict`'s,
    so the tied ``lm_head.weight`` is left out and the vocabulary tensors hold
    the real ``vocab_size`` rows (``zero_to_fp32``'s first rows).
    """
    masters: dict[int, torch.Tensor] = {}  # id(parameter) -> its fp32 master weights
    for group in zero_master_groups(engine.optimizer):
        flat = group.partition.detach()
        whole = _gather_to_main(flat, env)
        if whole is None:
            continue
        for param, offset in group.params:
            masters[id(param)] = whole[offset:offset + param.numel()].view(param.shape)
    if not env.is_main:
        return None
    module = engine.module
    params = dict(module.named_parameters(remove_duplicate=False))
    out = {}
    for name in to_hf_state_dict(module):
        if name not in params or id(params[name]) not in masters:
            raise RuntimeError(f"{name} has no fp32 master weights in the ZeRO optimizer (a buffer or a frozen "
                               "parameter); the .apr cannot hold it")
        out[name] = real_rows(module, name, masters[id(params[name])])
    return out


def _gather_to_main(flat: torch.Tensor, env: DistEnv) -> torch.Tensor | None:
    """Every rank's ``flat`` (all the same size), concatenated in rank order, on rank 0's CPU; None elsewhere."""
    if env.world_size == 1:
        return flat.to("cpu", copy=True)
    whole = torch.empty(env.world_size * flat.numel(), dtype=flat.dtype, device=flat.device) if env.is_main else None
    # Straight into the one buffer's slices: no concatenation, no second copy of the model.
    dist.gather(flat, list(whole.split(flat.numel())) if whole is not None else None, dst=0)
    return whole.cpu() if whole is not None else None


# --- each rank's own state: RNGs and the data cursor --------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def capture_rank_state(env: DistEnv, loader: TrainLoader, tag: str) -> dict[str, Any]:
    """This rank's RNG states (Python, NumPy's global, torch CPU, CUDA of its device) and data cursor, JSON-able.

    DeepSpeed saves no RNG state, and its ``client_state`` keeps rank 0's
    values only: a value that may differ between ranks goes here.
    """
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = None
    if env.device.type == "cuda":
        cuda = {"device": env.device.index, "state": _b64(torch.cuda.get_rng_state(env.device))}
    return {
        "format": RANK_STATE_FORMAT,
        "tag": tag,
        "rank": env.rank,
        "world_size": env.world_size,
        "python_random": [version, list(internal), gauss],
        "numpy_random": {"bit_generator": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                         "cached_gaussian": float(cached)},
        "torch_cpu": _b64(torch.get_rng_state()),
        "cuda": cuda,
        "data_cursor": loader.state_dict(),
    }


@dataclasses.dataclass(frozen=True)
class RankState:
    """One rank's saved state, read back and checked (:func:`read_rank_state`)."""

    path: Path
    rank: int  # the rank that wrote it
    world_size: int  # the world size it was written under
    python_random: tuple
    numpy_random: tuple
    torch_cpu: torch.Tensor
    cuda: torch.Tensor | None
    data_cursor: dict[str, Any]

    def apply_rngs(self, device: torch.device) -> None:
        """Set this process's RNGs to the saved ones (CUDA only when both sides ran on CUDA)."""
        random.setstate(self.python_random)
        np.random.set_state(self.numpy_random)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None and device.type == "cuda":
            torch.cuda.set_rng_state(self.cuda, device)


def read_rank_state(path: Path, tag: str) -> RankState:
    """Read and check an ``albor-rank-R.json``; :class:`DataError` (exit 3) if it is missing or damaged.

    Plain JSON: nothing in it can run code.
    """
    path = Path(path)

    def bad(why: str) -> DataError:
        return DataError(f"{path}: {why}; this checkpoint cannot be resumed exactly: resume from an earlier one "
                         "(--resume PATH) or start a new run")

    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise bad("missing (every rank writes its own file at every checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"unreadable ({type(e).__name__}: {e})") from None
    try:
        if raw["format"] != RANK_STATE_FORMAT:
            raise bad(f"format {raw['format']!r}, expected {RANK_STATE_FORMAT!r}")
        if raw["tag"] != tag:
            raise bad(f"belongs to checkpoint {raw['tag']!r}, not {tag!r}")
        version, internal, gauss = raw["python_random"]
        numpy_state = raw["numpy_random"]
        key = np.asarray(numpy_state["key"], dtype=np.uint32)
        torch_cpu = torch.frombuffer(bytearray(base64.b64decode(raw["torch_cpu"], validate=True)), dtype=torch.uint8)
        cuda = raw["cuda"]
        cuda_state = None if cuda is None else torch.frombuffer(
            bytearray(base64.b64decode(cuda["state"], validate=True)), dtype=torch.uint8)
        state = RankState(
            path=path,
            rank=int(raw["rank"]),
            world_size=int(raw["world_size"]),
            python_random=(int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss)),
            numpy_random=(str(numpy_state["bit_generator"]), key, int(numpy_state["pos"]),
                          int(numpy_state["has_gauss"]), float(numpy_state["cached_gaussian"])),
            torch_cpu=torch_cpu,
            cuda=cuda_state,
            data_cursor=dict(raw["data_cursor"]),
        )
    except DataError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # a field missing, of the wrong type, or not base64
        raise bad(f"malformed ({type(e).__name__}: {e})") from None
    # Checked here, before anything is loaded, rather than by the setters half-way through a resume.
    if len(state.python_random[1]) != len(random.getstate()[1]) or key.shape != (624,):
        raise bad("malformed (a Python or NumPy RNG state of the wrong size)")
    if state.torch_cpu.numel() != torch.get_rng_state().numel():
        raise bad(f"malformed (a torch RNG state of {state.torch_cpu.numel()} bytes, expected "
                  f"{torch.get_rng_state().numel()})")
    return state


# --- complete checkpoints and pruning ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SavedCheckpoint:
    """A complete checkpoint: its metadata marker exists and reads back."""

    tag: str
    kind: str  # "epoch" | "preemption"
    step: int
    metadata_path: Path
    metadata: dict[str, Any]


def complete_checkpoints(ckpt_dir: Path) -> list[SavedCheckpoint]:
    """Every complete checkpoint under ``ckpt_dir``, oldest first by step (never by name).

    At one step an epoch checkpoint counts as newer than a preemption one.
    A marker that cannot be read is skipped with a warning.
    """
    found = []
    for path in Path(ckpt_dir).glob("*.metadata.json"):
        tag = path.name.removesuffix(".metadata.json")
        if not TAG_PATTERN.fullmatch(tag):
            continue
        try:
            metadata = json.loads(path.read_text())
            step = int(metadata["step"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            log.warning("%s cannot be read (%s: %s); left alone", path, type(e).__name__, e)
            continue
        kind = "epoch" if tag.startswith("epoch-") else "preemption"
        found.append(SavedCheckpoint(tag, kind, step, path, metadata))
    return sorted(found, key=lambda c: (c.step, c.kind == "epoch", c.tag))


def prune(ckpt_dir: Path, keep: int = KEEP_DEEPSPEED_STATES) -> None:
    """Remove the DeepSpeed states (and their universal conversions) of all but the newest ``keep`` checkpoints.

    A pruned preemption checkpoint loses its metadata too (it has nothing
    else); an epoch checkpoint keeps its ``.apr`` and metadata forever.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the newest DeepSpeed state must stay")
    ds_dir = Path(ckpt_dir) / "deepspeed"
    for old in complete_checkpoints(ckpt_dir)[:-keep]:
        if old.kind == "preemption":  # first, so an interrupted prune leaves debris, never a marker without state
            old.metadata_path.unlink(missing_ok=True)
        for path in (ds_dir / old.tag, ds_dir / f"{old.tag}_universal"):
            shutil.rmtree(path, ignore_errors=True)


# --- the writer ---------------------------------------------------------------------------


class Checkpointer:
    """The loop's checkpoint writer for a DeepSpeed run (:class:`albor.loop.CheckpointWriter`)."""

    def __init__(self, engine, env: DistEnv, model_cfg: ModelConfig, loader: TrainLoader, run_dir: Path, *, seed: int):
        self.engine = engine
        self.env = env
        self.model_cfg = model_cfg
        self.loader = loader  # the data cursor comes from the loader itself, on every rank
        self.ckpt_dir = Path(run_dir) / "ckpt"
        self.ds_dir = self.ckpt_dir / "deepspeed"
        self.seed = seed

    def save(self, point: CheckpointPoint, metadata: Mapping[str, Any]) -> None:
        """Write the checkpoint at ``point``, ``metadata`` last; on any failure every rank raises CheckpointError."""
        marker = _marker(point, metadata)  # a caller's mistake: raised before any collective, on every rank alike
        started = time.perf_counter()
        tag = point.tag
        latest = self.ds_dir / "latest"
        previous_latest: str | None = None
        errors: list[str] = []
        marker_written = False
        with self.env.startup_timeout():  # writing GBs can outlast the step timeout
            if self.env.is_main:
                try:
                    previous_latest = latest.read_text() if latest.is_file() else None
                except OSError as e:
                    errors.append(f"reading {latest}: {e}")
                # A conversion left from an earlier state under this tag would be resumed instead of this one.
                _record(errors, lambda: shutil.rmtree(self.ds_dir / f"{tag}_universal", ignore_errors=True))
            try:
                if point.apr_path is not None:
                    self._write_apr(point, errors)
                # Every rank joins DeepSpeed's collective save, even after a local failure. The save
                # runs collectives (barriers, a tag check) between its file writes: a write that
                # raised on one rank would skip the rest and leave its peers in a barrier until the
                # timeout. Recorded instead, every rank finishes the same collectives and votes.
                with checkpoint_writes_through(self.engine, lambda write: _record(errors, write)):
                    _record(errors, lambda: self.engine.save_checkpoint(
                        str(self.ds_dir), tag=tag, save_latest=False,
                        # What is the same on every rank: DeepSpeed keeps rank 0's client_state only.
                        client_state={"epoch": point.epoch, "seed": self.seed, "step": point.step},
                    ))
                _record(errors, lambda: _sync_own_deepspeed_files(self.ds_dir / tag, self.env.rank))
                _record(errors, lambda: write_json_atomic(
                    rank_state_path(self.ds_dir / tag, self.env.rank), capture_rank_state(self.env, self.loader, tag)
                ))
                failed = self.env.ranks_where(bool(errors))  # vote 1: every rank's files are written
                if not failed and self.env.is_main:
                    _record(errors, lambda: write_text_atomic(latest, tag))
                    if not errors:
                        _record(errors, lambda: write_json_atomic(point.metadata_path, marker))
                        marker_written = not errors
                if not failed:
                    failed = self.env.ranks_where(bool(errors))  # vote 2: the marker is written
            except BaseException:
                # A peer died mid-save. Before the marker, nothing of this point may look complete;
                # after it, every file of the point was written and voted on, and it stays.
                if self.env.is_main and not marker_written:
                    self._undo(point, previous_latest)
                raise
        if failed:
            error = "; ".join(errors) or "see that rank's log"
            if errors:
                log.error("rank %d: checkpoint %s failed: %s", self.env.rank, tag, error)
            if self.env.is_main:
                self._undo(point, previous_latest)
            raise CheckpointError(f"writing {tag} failed on rank(s) {', '.join(map(str, failed))}: {error}")
        if self.env.is_main:
            log.info("checkpoint %s (step %d) written in %.1f s", tag, point.step, time.perf_counter() - started)
            if (problem := _attempt(lambda: prune(self.ckpt_dir, KEEP_DEEPSPEED_STATES))) is not None:
                log.warning("pruning old DeepSpeed states after %s: %s", tag, problem)  # the checkpoint is good

    def _write_apr(self, point: CheckpointPoint, errors: list[str]) -> None:
        """The fp32 master weights, gathered (every rank), written by rank 0 as ``point.apr_path``."""
        weights: list[dict[str, torch.Tensor] | None] = []
        _record(errors, lambda: weights.append(fp32_master_state_dict(self.engine, self.env)))
        if self.env.is_main and not errors:
            _record(errors, lambda: point.apr_path.parent.mkdir(parents=True, exist_ok=True))
            if not errors:
                _record(errors, lambda: write_apr(
                    point.apr_path, weights[0], apr_metadata(self.model_cfg, {"epoch": point.epoch})
                ))

    def _undo(self, point: CheckpointPoint, previous_latest: str | None) -> None:
        """Remove this point's files, so no half-written checkpoint looks complete."""
        latest = self.ds_dir / "latest"
        for undo in (
            lambda: point.metadata_path.unlink(missing_ok=True),
            lambda: point.apr_path.unlink(missing_ok=True) if point.apr_path is not None else None,
            lambda: shutil.rmtree(self.ds_dir / point.tag, ignore_errors=True),
            (lambda: write_text_atomic(latest, previous_latest)) if previous_latest is not None
            else (lambda: latest.unlink(missing_ok=True)),
        ):
            if (problem := _attempt(undo)) is not None:  # the run stops anyway: report, go on undoing
                log.error("cleaning up the failed checkpoint %s: %s", point.tag, problem)


def _sync_own_deepspeed_files(tag_dir: Path, rank: int) -> None:
    """Flush to disk the files DeepSpeed just wrote for this rank (its save does not), and their directory.

    The marker vouches for them: after a crash of the machine, not just of the
    process, a complete checkpoint must still be whole.
    """
    own = {f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for prefix in ("", "bf16_")}
    if rank == 0:
        own.add("mp_rank_00_model_states.pt")
    for path in tag_dir.iterdir():
        if path.name in own:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(tag_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _marker(point: CheckpointPoint, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata to write, with the point's identity; a conflicting value is the caller's bug."""
    identity = {"kind": point.kind, "tag": point.tag, "step": point.step, "epoch": point.epoch}
    clash = {k: (metadata[k], v) for k, v in identity.items() if k in metadata and metadata[k] != v}
    if clash:
        raise ValueError(f"checkpoint metadata contradicts its point {point.tag}: {clash}")
    return {**metadata, **identity}


def _attempt(action) -> str | None:
    """Run ``action``; the error as text instead of an exception (a vote follows)."""
    try:
        action()
        return None
    except Exception as e:  # disk full, permissions, a failed collective…
        return f"{type(e).__name__}: {e}"


def _record(errors: list[str], action) -> None:
    if (problem := _attempt(action)) is not None:
        errors.append(problem)

