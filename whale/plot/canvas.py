"""What every picture shares: matplotlib loaded on demand, and a file written whole or not at all.

matplotlib is an optional extra (``pip install 'whale[plot]'``): nothing here imports it until a
picture is drawn. Figures are ``matplotlib.figure.Figure`` objects rendered by the Agg canvas,
never through ``pyplot``, so no display is needed and no global backend state changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = [
    "MISSING_MATPLOTLIB",
    "PICTURE_FORMATS",
    "check_target",
    "new_figure",
    "require_matplotlib",
    "save_figure",
]

MISSING_MATPLOTLIB = "pictures need matplotlib: pip install 'whale[plot]'"

PICTURE_FORMATS = ("png", "svg", "pdf")
"""Suffixes a picture may have: formats matplotlib writes without extra packages."""


def require_matplotlib() -> None:
    """Raise the install hint now if matplotlib is missing (before a long search, say).

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(MISSING_MATPLOTLIB) from err


def new_figure(width: float, height: float) -> Any:
    """A ``Figure`` of ``width`` x ``height`` inches on the Agg canvas (no display, no pyplot).

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def check_target(
    path: str | os.PathLike,
    *,
    formats: tuple[str, ...] = PICTURE_FORMATS,
    what: str = "the picture",
) -> Path:
    """``path`` as a ``Path`` if ``what`` can be written there: checked before any drawing.

    Args:
        path: the file to write.
        formats: the suffixes allowed (the suffix picks the format); empty: any name.
        what: what is written, for the messages.

    Raises:
        ValueError: the name has no allowed suffix, names a folder, lies in a folder that does
            not exist, or may not be written; the message names the path and the fix.
    """
    target = Path(path)
    where = f"cannot write {what} to {os.fspath(path)!r}"
    if target.is_dir():
        raise ValueError(f"{where}: it is a folder; name a file in it")
    if formats and target.suffix.lower().lstrip(".") not in formats:
        raise ValueError(
            f"{where}: end the name with {' or '.join('.' + f for f in formats)}"
        )
    folder = target.parent
    if not folder.is_dir():
        raise ValueError(
            f"{where}: the folder {os.fspath(folder)!r} does not exist; create it first"
        )
    writable = os.access(folder, os.W_OK | os.X_OK)
    if not writable or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{where}: no permission to write there")
    return target


def save_figure(figure: Any, path: str | os.PathLike) -> Path:
    """Write ``figure`` to ``path`` through a temporary file and a rename, so that a failed
    write leaves neither a half-written picture nor the temporary file.

    Raises:
        ValueError: the path cannot be written (:func:`check_target`, or the write fails).
    """
    target = check_target(path)
    fmt = target.suffix.lower().lstrip(".")
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        figure.savefig(tmp, format=fmt, dpi=figure.dpi)
        os.replace(tmp, target)
    except OSError as err:
        raise ValueError(
            f"cannot write the picture to {os.fspath(path)!r}: {err.strerror or err}"
        ) from err
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
