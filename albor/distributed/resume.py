"""Resuming a DeepSpeed run from one of its checkpoints: the engine, then each rank's RNGs and data cursor.

On the world size the checkpoint was saved with, DeepSpeed loads its own
files as they are. On another one the optimizer state must be resharded:
rank 0 converts the tag once into DeepSpeed's universal format
(``<tag>_universal`` beside it), and the engine, built with
``ds_config["checkpoint"] = {"load_universal": True}`` (see
:func:`needs_universal`), loads that.

Trusted checkpoints only: DeepSpeed's files are Python pickles, and loading a
pickle can run any code it names. albor's own files (the metadata and each
rank's ``albor-rank-R.json``) are JSON.

A load that raises leaves the engine half-loaded (the module is overwritten
before the optimizer state), so every failure here ends in an error raised on
every rank together, and the run must not train on.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from albor.data.loader import TrainLoader
from albor.distributed.checkpoint import RankState, read_rank_state
from albor.distributed.compat import convert_to_universal, zero_master_groups
from albor.distributed.process_group import DistEnv
from albor.errors import AlborError, DataError
from albor.model import load_hf_state_dict, padded_rows
from albor.resume_plan import UNIVERSAL_SUFFIX, rank_state_path

log = logging.getLogger("albor")

_MODEL_STATES = "mp_rank_00_model_states.pt"
#: One rank's ZeRO optimizer partition (``bf16_`` when saved by a bf16 engine).
_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


def needs_universal(saved_world_size: int, world_size: int) -> bool:
    """Whether resuming on ``world_size`` goes through the universal format.

    When true, the engine that resumes must be built with
    ``ds_config["checkpoint"] = {"load_universal": True}``; when false, without
    it (DeepSpeed then refuses its native tags).
    """
    return saved_world_size != world_size


def universal_tag(env: DistEnv, ds_dir: Path, tag: str) -> str:
    """The tag of ``tag``'s universal conversion; rank 0 makes it unless it exists. Collective.

    The conversion is written under ``<tag>_universal.tmp`` and renamed when
    done, so ``<tag>_universal`` exists only complete. The other ranks wait in
    the vote that follows, under the start-up timeout.
    """
    ds_dir = Path(ds_dir)
    name = tag + UNIVERSAL_SUFFIX
    error: AlborError | None = None
    if env.is_main and not (ds_dir / name).is_dir():
        started = time.perf_counter()
        tmp = ds_dir / f"{name}.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a conversion killed half-way
            convert_to_universal(ds_dir / tag, tmp)
            os.replace(tmp, ds_dir / name)
            log.info("converted %s for a new world size in %.1f s", ds_dir / tag, time.perf_counter() - started)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = DataError(
                f"converting {ds_dir / tag} to DeepSpeed's universal format for a new world size failed "
                f"({type(e).__name__}: {e}); resume on the world size it was saved with, or from another checkpoint"
            )
    with env.startup_timeout():
        _agree(env, error)
    return name


def restore(engine, env: DistEnv, ds_dir: Path, tag: str, *, saved_world_size: int, loader: TrainLoader) -> None:
    """Load checkpoint ``tag`` into ``engine``, then this rank's RNGs and ``loader``'s cursor. Collective.

    Same world size: DeepSpeed's own files, bit for bit. Another world size:
    through :func:`universal_tag`. Raises :class:`DataError` (exit 3) for a
    missing or damaged file, :class:`ConfigError` (exit 2) for a data cursor
    this run cannot continue (another batch layout), on every rank together;
    the engine may then be half-loaded and must not train.
    """
    ds_dir = Path(ds_dir)
    universal = needs_universal(saved_world_size, env.world_size)
    if universal != bool(engine.load_universal_checkpoint()):  # the caller's bug, the same on every rank
        raise RuntimeError(
            f"resuming {tag} (saved on {saved_world_size} ranks) on {env.world_size} needs an engine built "
            f"{'with' if universal else 'without'} ds_config['checkpoint']['load_universal']"
        )
    started = time.perf_counter()
    state: list[RankState] = []

    def check() -> None:
        # Everything this rank will read, before the engine is touched: a missing or damaged file
        # then fails here, on every rank together, and not half-way through DeepSpeed's load.
        _check_deepspeed_files(ds_dir, tag, saved_world_size, own_shard=None if universal else env.rank)
        state.append(_this_ranks_state(ds_dir, tag, env.rank, saved_world_size))
        loader.load_state_dict(state[0].data_cursor)

    with env.startup_timeout():
        _agree(env, _attempt(check, f"checking checkpoint {tag}"))
    load_tag = universal_tag(env, ds_dir, tag) if universal else tag

    def load() -> None:
        path, _ = engine.load_checkpoint(
            str(ds_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise DataError(f"DeepSpeed found no checkpoint {load_tag} in {ds_dir}")

    with env.startup_timeout():  # the slowest rank's read sets the pace of the vote
        _agree(env, _attempt(load, f"loading {ds_dir / load_tag}", half_loaded=True))
    state[0].apply_rngs(env.device)  # checked above: cannot fail
    log.info("rank %d resumed from %s in %.1f s", env.rank, ds_dir / load_tag, time.perf_counter() - started)


def load_fp32_masters(engine, env: DistEnv, weights: Mapping[str, torch.Tensor]) -> None:
    """Start a freshly built engine from fp32 ``weights`` (Hugging Face names, as an ``.apr`` holds them).

    For ``--init-from``: every rank passes the whole file's tensors; no
    collective. The module gets them in its own dtype and this rank's fp32
    master partition gets them exactly: under bf16, DeepSpeed builds the
    masters from the module, so weights loaded only before the build would
    start the run rounded to bf16. Names and shapes are checked first
    (:class:`ConfigError`, exit 2, before anything is copied). The file's
    vocabulary tensors hold the real rows; a padded model's extra rows get zeros.
    """
    module = engine.module
    with torch.no_grad():
        load_hf_state_dict(module, weights)  # checks, then the module (cast to its dtype)
        params = dict(module.named_parameters(remove_duplicate=False))
        source = {
            id(params[name]): padded_rows(module, name, tensor) for name, tensor in weights.items() if name in params
        }
        for group in zero_master_groups(engine.optimizer):
            size = group.partition.numel()
            first, last = env.rank * size, (env.rank + 1) * size  # this rank's share of the group's flat order
            for param, offset in group.params:
                lo, hi = max(first, offset), min(last, offset + param.numel())
                if lo < hi:
                    flat = source[id(param)].reshape(-1)
                    group.partition[lo - first:hi - first].copy_(flat[lo - offset:hi - offset])


def _this_ranks_state(ds_dir: Path, tag: str, rank: int, saved_world_size: int) -> RankState:
    """This rank's saved RNGs and cursor; a rank the saved run did not have takes rank 0's.

    That is exact for albor: every rank seeds torch alike (``torch.manual_seed(config.seed)``
    in ``albor.run_setup.build_run``) and then draws nothing (the model has no dropout, the
    loader keeps its own generator, DeepSpeed draws none), so every rank holds the same RNG
    states; and the cursor counts global batches, the same on every rank. A new rank whose
    saved peers disagree is warned about, since then it cannot be exact.
    """
    source = rank if rank < saved_world_size else 0
    state = read_rank_state(rank_state_path(Path(ds_dir) / tag, source), tag)
    if (state.rank, state.world_size) != (source, saved_world_size):
        raise DataError(
            f"{state.path}: written by rank {state.rank} of {state.world_size}, expected rank {source} of "
            f"{saved_world_size} (the checkpoint's metadata); this checkpoint is damaged: resume from an earlier one"
        )
    if source != rank:
        for other in range(1, saved_world_size):
            peer = read_rank_state(rank_state_path(Path(ds_dir) / tag, other), tag)
            if not _same_rngs(state, peer):
                log.warning("rank %d takes rank 0's RNG states, but saved rank %d's differed: the continuation "
                            "is not exact if anything draws random numbers", rank, other)
                break
    return state


def _same_rngs(a: RankState, b: RankState) -> bool:
    return (
        a.python_random == b.python_random
        and a.numpy_random[0] == b.numpy_random[0]
        and (a.numpy_random[1] == b.numpy_random[1]).all()
        and a.numpy_random[2:] == b.numpy_random[2:]
        and torch.equal(a.torch_cpu, b.torch_cpu)
    )


def _check_deepspeed_files(ds_dir: Path, tag: str, saved_world_size: int, *, own_shard: int | None) -> None:
    """DeepSpeed's files of ``tag`` are there: the model states and one optimizer shard per saved rank."""
    tag_dir = ds_dir / tag

    def missing(what: str) -> DataError:
        return DataError(f"{what}; this checkpoint is incomplete: resume from another one (--resume PATH)")

    if not tag_dir.is_dir():
        raise missing(f"{tag_dir} is missing")
    if not (tag_dir / _MODEL_STATES).is_file():
        raise missing(f"{tag_dir / _MODEL_STATES} is missing")
    shards = {
        int(m.group(1)): p for p in tag_dir.iterdir() if (m := _SHARD.fullmatch(p.name))
    }
    if sorted(shards) != list(range(saved_world_size)):
        raise missing(f"{tag_dir} holds optimizer shards of ranks {sorted(shards)}, the checkpoint was saved on "
                      f"{saved_world_size}")
    if own_shard is not None and not shards[own_shard].is_file():
        raise missing(f"{shards[own_shard]} is not a file")


def _attempt(action: Callable[[], None], what: str, *, half_loaded: bool = False) -> AlborError | None:
    """Run ``action``; its failure as an :class:`AlborError` (a vote follows) instead of an exception."""
    try:
        action()
        return None
    except AlborError as e:
        return e
    except Exception as e:  # DeepSpeed's AssertionError for a missing tag, a truncated pickle, a shape mismatch…
        after = "; the engine is half-loaded and this run stops" if half_loaded else ""
        return DataError(f"{what} failed ({type(e).__name__}: {e}){after}; resume from another checkpoint "
                         "(--resume PATH) or start a new run")


def _agree(env: DistEnv, error: AlborError | None) -> None:
    """One vote: if any rank failed, every rank raises, with the highest exit code any rank met."""
    env.raise_together(error, "resuming")
