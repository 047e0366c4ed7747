"""All-or-nothing dataset directories: build beside the target, then swap it in.

Used by ``albor prepare-data`` for ``--output``, by ``albor export`` for
``--hf`` (both through :func:`publish`) and by a run for its raw-corpus cache. A failure at any point leaves the target as it was, and
removes again the directories that were created on the way to it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from albor.atomic_files import current_umask
from albor.errors import ConfigError


def make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories this call created, outermost first."""
    missing: list[Path] = []
    p = Path(path)
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # another rank made it in the meantime: not ours to remove
            if not d.is_dir():
                raise
            continue
        except BaseException:
            remove_dirs(created)
            raise
        created.append(d)
    return created


def remove_dirs(created: list[Path]) -> None:
    """Remove the directories :func:`make_dirs` created, innermost first, where they are empty again."""
    for d in reversed(list(dict.fromkeys(created))):
        try:
            d.rmdir()
        except FileNotFoundError:
            continue  # already removed (by another rank that created it again)
        except OSError:
            return  # someone else put something there: keep it and everything above it


def build_into(output: Path, build: Callable[[Path], Any]) -> None:
    """Run ``build(directory)`` on a fresh directory beside ``output``, then put that directory at ``output``.

    ``output.parent`` must exist. An existing ``output`` is replaced only once
    the new one is complete; on any failure it is left untouched.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.staging-", dir=output.parent))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700; datasets are for the whole team
        build(staging)
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, old / output.name)
            try:
                os.replace(staging, output)
            except BaseException:
                os.replace(old / output.name, output)  # put the earlier one back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(output: Path, build: Callable[[Path], Any], *, flag: str) -> None:
    """:func:`build_into` ``output``, making its parent directories first; on failure, the ones made go again.

    So ``output``, and the path to it, stay as they were: an earlier one stays
    usable, and a new path does not appear. A parent that cannot be made or
    written in is a ConfigError naming ``flag`` (the option that named ``output``).
    """
    try:
        created = make_dirs(output.parent)
    except OSError as e:
        raise ConfigError(
            f"{flag} {output} cannot be created ({e.strerror or e}); choose a directory you can write"
        ) from None
    try:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=f".{output.name}.probe-", dir=output.parent))
        except OSError as e:
            raise ConfigError(
                f"{flag} {output}: cannot write in {output.parent} ({e.strerror or e}); choose a directory you can write"
            ) from None
        build_into(output, build)
    except BaseException:
        remove_dirs(created)
        raise
