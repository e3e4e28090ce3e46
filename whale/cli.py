"""The ``whale`` command: ``whale plan`` (dry run, no GPU) and ``whale build-ext``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .capture import capture, module_annotation_map
from .config import Config
from .planner.data_parallel import plan_data_parallel

__all__ = ["load_target", "main"]

_TARGET_FUNCTION = "whale_target"


def load_target(target: str) -> tuple[nn.Module, tuple]:
    """Import TARGET and call it for ``(model, example_inputs)``.

    TARGET is ``path/to/file.py`` (which defines ``whale_target()``), ``path/to/file.py:fn``,
    or ``package.module:fn``. The function takes no arguments and returns the model and a
    tuple of example inputs (one global batch).
    """
    where, _, fn_name = target.partition(":")
    fn_name = fn_name or _TARGET_FUNCTION
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"TARGET {target!r}: no file {path}")
        spec = importlib.util.spec_from_file_location(f"whale_target_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        # Registered before running, as dataclasses and pickling look modules up by name.
        sys.modules[spec.name] = module
        sys.path.insert(0, str(path.resolve().parent))
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise ValueError(f"TARGET {target!r}: importing {path} failed: {err!r}") from err
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(
                f"TARGET {target!r}: cannot import {where!r} ({err}); give a .py file or "
                "package.module:function"
            ) from err
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(
            f"TARGET {target!r}: {where} has no function {fn_name}() returning (model, example_inputs)"
        )
    result = fn()
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not isinstance(result[0], nn.Module)
    ):
        raise ValueError(
            f"TARGET {target!r}: {fn_name}() must return (model, example_inputs), got "
            f"{type(result).__name__}"
        )
    model, inputs = result
    return model, inputs if isinstance(inputs, tuple) else (inputs,)


def _plan(args: argparse.Namespace) -> int:
    model, inputs = load_target(args.target)
    captured = capture(model, inputs)
    weights = tuple(float(w) for w in args.row_weights.split(",")) if args.row_weights else None
    config = Config(num_micro_batch=args.micro_batches, row_weights=weights)
    rows0 = next(t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim())
    global_batch = args.global_batch or rows0
    plan = plan_data_parallel(
        module_annotation_map(model), args.world_size, config, example_rows=global_batch
    )
    if args.json:
        print(plan.to_json())
        return 0
    print(captured.summary())
    print()
    print(plan.table(global_batch))
    return 0


def _build_ext(args: argparse.Namespace) -> int:
    from .runtime import comm_ops

    path = comm_ops.build_extension(verbose=args.verbose)
    print(f"built {path}; backend now {comm_ops.backend()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whale", description="annotation-driven parallel training")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="dry run: print the plan for a model, no GPU needed")
    plan.add_argument("target", help="file.py (defining whale_target()) or module:function")
    plan.add_argument("--world-size", type=int, default=2, help="ranks in the job")
    plan.add_argument("--global-batch", type=int, default=None, help="rows per step (default: example's)")
    plan.add_argument("--micro-batches", type=int, default=1)
    plan.add_argument("--row-weights", default=None, help="relative speed per rank, e.g. 3,1")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(run=_plan)
    ext = sub.add_parser("build-ext", help="compile the C++/CUDA extension into torch's cache")
    ext.add_argument("--verbose", action="store_true")
    ext.set_defaults(run=_build_ext)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, NotImplementedError) as err:
        print(f"whale {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
