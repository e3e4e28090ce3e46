"""Where checkpoints live on disk, and how a save becomes visible all at once.

A checkpoint root holds one directory per saved step, ``step-00000120``, each a DCP checkpoint
(``.metadata`` and one or more ``__<rank>_<n>.distcp`` files). A save writes into a hidden
``.tmp-step-...`` directory beside them and renames it into place after every rank's data and
the metadata are written: a crash mid-save leaves only the hidden directory, which loading
ignores and the next save removes, and the previous checkpoints stay as they were.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

__all__ = ["checkpoint_dirs", "commit", "latest", "make_temp", "remove_stale", "resolve", "step_dir"]

_STEP = re.compile(r"^step-(\d+)$")
_TEMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def checkpoint_dirs(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP.match(child.name)
        if m and (child / ".metadata").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (None: there is none).

    Example::

        path = wh.checkpoint.latest("ckpt")  # ckpt/step-00000120, for format_utils.dcp_to_torch_save
    """
    found = checkpoint_dirs(root)
    return found[-1][1] if found else None


def resolve(path: str | os.PathLike, step: int | None) -> Path:
    """The checkpoint to load: ``path`` itself where it is one (it holds ``.metadata``), else the
    newest (or the ``step``) under the root ``path``. Raises FileNotFoundError naming what is there."""
    path = Path(path)
    if step is None and (path / ".metadata").is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the directory does not exist")
    found = checkpoint_dirs(path)
    if step is not None:
        for s, p in found:
            if s == step:
                return p
        raise FileNotFoundError(
            f"no checkpoint of step {step} under {path}; it holds steps {[s for s, _ in found] or 'none'}"
        )
    if not found:
        listed = sorted(c.name for c in path.iterdir())[:8] if path.is_dir() else []
        raise FileNotFoundError(
            f"no checkpoint under {path}: it holds no step-* directory with a .metadata file "
            f"(found {listed}); save one with wh.checkpoint.save({str(path)!r}, program, optimizer, step=n)"
        )
    return found[-1][1]


def remove_stale(root: Path) -> None:
    """Remove what interrupted saves left under ``root`` (hidden temporary directories)."""
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith((_TEMP_PREFIX, _OLD_PREFIX)) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def make_temp(root: Path, step: int) -> Path:
    """A fresh hidden directory under ``root`` to save step ``step`` into."""
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    temp = root / f"{_TEMP_PREFIX}step-{step:08d}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    return temp


def commit(temp: Path, final: Path) -> None:
    """Make the finished ``temp`` the checkpoint ``final`` in one rename (an older checkpoint of
    the same step is moved aside first and removed after)."""
    _fsync_dir(temp)
    old = None
    if final.exists():
        old = final.with_name(f"{_OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(temp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
