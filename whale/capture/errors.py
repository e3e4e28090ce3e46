"""CaptureError: why no front end could trace a forward, pointing at the line to change."""

from __future__ import annotations

import dataclasses
import inspect
import linecache
import os
import re
import sysconfig
import types

import torch
from torch import nn

__all__ = ["CaptureError", "FrontendFailure", "describe_failure", "exception_chain", "is_user_file", "is_whale_usage_error"]

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_WHALE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_PRIMITIVES_DIR = os.path.join(_WHALE_DIR, "primitives") + os.sep
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
# site-packages may sit inside the stdlib folder; code there (transformers) is user code here.
_PACKAGE_DIRS = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep for k in ("purelib", "platlib")})


@dataclasses.dataclass(frozen=True)
class FrontendFailure:
    """What one front end said, and where in the user's code it stopped."""

    frontend: str
    error: str  # "TypeName: first line of the message"
    location: str  # "file:line in function", or "" when no user frame was on the stack
    source: str  # the source line at location, stripped
    module_path: str | None  # innermost model module whose forward was running; None if unknown
    in_user_code: bool = True  # False: the tracer failed before running a line of forward

    def where(self) -> str:
        """``at file:line in fn, in module 'path'`` and the source line, as far as known."""
        parts = []
        if self.location:
            parts.append(f"at {self.location}")
        if self.module_path is not None:
            parts.append(f"in module {self.module_path!r}" if self.module_path else "in the root module")
        text = ", ".join(parts)
        if self.source:
            text += f"\n  > {self.source}"
        return text

    def describe(self) -> str:
        where = self.where().replace("\n", "\n    ")
        return f"  {self.frontend}: {self.error}" + (f"\n    {where}" if where else "")


class CaptureError(ValueError):
    """No front end could turn the model's forward into a graph.

    ``failures`` holds one :class:`FrontendFailure` per front end tried, in order.
    """

    def __init__(self, message: str, failures: tuple[FrontendFailure, ...] = ()) -> None:
        super().__init__(message)
        self.failures = failures

    @classmethod
    def from_failures(
        cls, model: nn.Module, failures: tuple[FrontendFailure, ...]
    ) -> CaptureError:
        tried = " and ".join(f.frontend for f in failures)
        lines = [f"capture({type(model).__name__}): {tried} could not trace forward()."]
        lines += [f.describe() for f in failures]
        if any(f.in_user_code and _data_dependent(f.error) for f in failures):
            lines.append(
                "Fix: make the marked line traceable (torch.where or torch.cond instead of Python "
                "control flow on tensor values, no .item()/.tolist() feeding an if)."
            )
        if any(f.error.startswith("CustomFunctionCall") for f in failures):
            lines.append(
                "Fix: apply the autograd.Function inside a submodule's forward (whale runs that "
                "module as one opaque call, its backward included), or make it a "
                "torch.library.custom_op with register_autograd, which a graph keeps."
            )
        if any(f.error.startswith("RandomDraw") for f in failures):
            lines.append(
                "Fix: where the draw is a value, draw it with torch (torch.rand(()) instead of "
                "random.random(): a graph keeps torch's draws as ops, drawn anew each step); where "
                "an if depends on it (LayerDrop), make the draw inside a submodule's forward (whale "
                "runs that module as one opaque call, drawing each step)."
            )
        lifted = next((m for f in failures for m in re.findall(r"model attribute: ([\w.]+)\.lifted_tensor", f.error)), None)
        if lifted is not None:
            lines.append(
                f"Fix: forward in {lifted!r} makes a tensor export cannot follow, most often an in-place "
                "write to a parameter's .data (Gemma 3n's AltUp clamps a weight's .data each forward): "
                "do it outside forward (after optimizer.step()), or turn it off in the model's config."
            )
        if any("Cache" in f.error for f in failures):
            lines.append(
                "The forward returns a cache object (transformers' use_cache=True): pass "
                "use_cache=False among the example's keyword inputs, or set "
                "model.config.use_cache = False; training needs no cache."
            )
        untried = [name for name in ("fx", "export") if name not in {f.frontend for f in failures}]
        if untried:
            lines.append(f"Or try capture(..., frontend={untried[0]!r}).")
        lines.append(
            "Without a graph, plain data parallel still works: replicate(), and module-level "
            "annotations (scopes around construction in __init__, wh.annotate(model, "
            "{name: ...})), need no graph; whale.capture.module_annotation_map(model) shows "
            "them. Pipeline stages (stage()/pipeline()), split() and Config(auto_parallel=True) "
            "need the graph."
        )
        return cls("\n".join(lines), failures)


def _data_dependent(error: str) -> bool:
    """Whether a tracer stopped on Python control flow over tensor values (the fix the message
    gives), not on something else in forward (a missing input, an unsupported op)."""
    return any(k in error for k in ("DataDependent", "data-dependent", "TraceError", "symbolically traced variables"))


def describe_failure(frontend: str, exc: BaseException, model: nn.Module) -> FrontendFailure:
    """Locate ``exc`` in the user's code: innermost non-torch frame and the module running there."""
    chain = exception_chain(exc)
    location = source = ""
    in_user_code = True
    for err in reversed(chain):  # the deepest cause is nearest to the construct
        found = _innermost_user_frame(err.__traceback__)
        if found is not None:
            code, lineno = found.tb_frame.f_code, found.tb_lineno
            location = f"{_short(code.co_filename)}:{lineno} in {code.co_name}"
            source = linecache.getline(code.co_filename, lineno).strip()
            break
    else:
        location, source = _forward_location(model)
        in_user_code = False
    module_path = None
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    for err in reversed(chain):
        for tb in reversed(_frames(err.__traceback__)):
            owner = tb.tb_frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names:
                module_path = names[id(owner)]
                break
        if module_path is not None:
            break
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(first) > 400:  # torch's lifted-tensor message names the module at about 330
        first = first[:397] + "..."
    return FrontendFailure(
        frontend, f"{type(exc).__name__}: {first}", location, source, module_path, in_user_code
    )


def is_whale_usage_error(exc: BaseException) -> bool:
    """A ValueError/TypeError raised by whale's own validation (e.g. a split in a split)."""
    if not isinstance(exc, (ValueError, TypeError)):
        return False
    frames = _frames(exc.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].tb_frame.f_code.co_filename).startswith(
        _PRIMITIVES_DIR
    )


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes (``__cause__``, else ``__context__``), outermost first, each once."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _frames(tb: types.TracebackType | None) -> list[types.TracebackType]:
    """The traceback entries, outermost first (each has tb_frame and tb_lineno)."""
    frames = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    return frames


def is_user_file(filename: str) -> bool:
    """Whether ``filename`` is the model's code: not torch's, whale's or the standard library's."""
    if filename.startswith("<"):  # fx-generated code, frozen modules
        return False
    path = os.path.abspath(filename)
    if path.startswith((_TORCH_DIR, _WHALE_DIR)):
        return False
    return not path.startswith(_STDLIB_DIR) or path.startswith(_PACKAGE_DIRS)


def _innermost_user_frame(tb: types.TracebackType | None) -> types.TracebackType | None:
    user = [t for t in _frames(tb) if is_user_file(t.tb_frame.f_code.co_filename)]
    return user[-1] if user else None


def _forward_location(model: nn.Module) -> tuple[str, str]:
    # The tracer failed before running any user line: point at the forward it could not enter.
    forward = inspect.unwrap(type(model).forward)  # past decorators such as transformers'
    try:
        filename = inspect.getsourcefile(forward)
        lines, lineno = inspect.getsourcelines(forward)
    except (OSError, TypeError):
        return "", ""
    # Point at the def, not at its decorators.
    lineno += next((i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "async def "))), 0)
    where = f"{_short(filename)}:{lineno}, entering {type(model).__name__}.forward"
    return where, linecache.getline(filename, lineno).strip()


def _short(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        return filename
    return rel if not rel.startswith("..") else filename
