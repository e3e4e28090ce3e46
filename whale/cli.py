"""The ``whale`` command: ``whale plan`` (dry run, no GPU), ``whale profile``, ``whale build-ext``.

``whale plan TARGET --cluster SPEC --global-batch N [--json] [--explain]`` captures the model
TARGET returns (on fake tensors: a model built on ``torch.device("meta")`` allocates nothing),
searches data, tensor and pipeline degrees, stages, micro-batches, schedule and rows for the
cluster, and prints the plan. Without ``--cluster`` the cluster is ``--world-size`` devices of
this host's type with this host's memory. Annotations and the pin flags fix choices; the search
makes the rest. ``--picture plan.png`` draws the plan on the cluster; ``--trace step.json``
writes its simulated pipeline step as a Chrome trace (``--trace-picture`` draws it);
``--out plan.json`` writes the plan with the model and devices it is for, which
``Config(plan="plan.json")`` executes as written.

``whale profile [--out FILE] [--cluster-out FILE]`` measures the devices (and, under torchrun,
the links) into a profile file for ``--profiles``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .api import speed_sizes
from .capture import capture, module_annotation_map, split_example_inputs
from .config import Config
from .ir.cluster_spec import check_device_count, load_cluster, parse_cluster
from .ir.device_catalog import known_device_names, load_profiles, save_profiles
from .planner.cost.predict import CostOptions
from .planner.search.auto import SearchSettings, auto_plan, local_cluster
from .planner.search.memory_options import ALL_OPTIONS
from .planner.search.pins import Pins
from .rewrite.build import tensor_parallel_check

__all__ = ["command", "load_target", "main"]

_TARGET_FUNCTION = "whale_target"


def load_target(target: str) -> tuple[nn.Module, tuple]:
    """Import TARGET and call it for ``(model, example_inputs)``.

    TARGET is ``path/to/file.py`` (which defines ``whale_target()``), ``path/to/file.py:fn``,
    or ``package.module:fn``. The function takes no arguments and returns the model and its
    example inputs (one global batch), as ``parallelize(example_inputs=...)`` takes them: a
    tensor, a tuple of forward's positional inputs, or a dict of its keyword inputs
    (``{"input_ids": x, "attention_mask": m}``, as a transformers model takes them).

    Raises:
        ValueError: the file or module cannot be imported, has no such function, the function
            fails, or it returns no batch of inputs.
        TypeError: it returns something other than ``(nn.Module, inputs)``.
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
            raise ValueError(
                f"TARGET {target!r}: importing {path} failed: {err!r}"
            ) from err
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:
            raise ValueError(
                f"TARGET {target!r}: cannot import {where!r} ({err!r}); give a .py file or "
                "package.module:function"
            ) from err
    fn = getattr(module, fn_name, None)
    if not callable(fn):  # a TARGET naming no function is a bad value, not a bad type
        raise ValueError(  # noqa: TRY004
            f"TARGET {target!r}: {where} has no function {fn_name}() returning (model, example_inputs)"
        )
    try:
        result = fn()
    except Exception as err:
        raise ValueError(f"TARGET {target!r}: {fn_name}() raised {err!r}") from err
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not isinstance(result[0], nn.Module)
    ):
        got = (
            type(result).__name__
            if not isinstance(result, tuple)
            else f"a tuple of {len(result)}"
        )
        if isinstance(result, tuple) and len(result) == 2:
            got = f"({type(result[0]).__name__}, {type(result[1]).__name__})"
        raise TypeError(
            f"TARGET {target!r}: {fn_name}() must return (model, example_inputs) with model an "
            f"nn.Module, got {got}"
        )
    model, inputs = result
    if not isinstance(inputs, (tuple, dict)):
        inputs = (inputs,)
    leaves = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    if not any(isinstance(t, torch.Tensor) and t.dim() for t in leaves):
        raise ValueError(
            f"TARGET {target!r}: {fn_name}() returned no tensor input with a batch dimension "
            f"(got {[type(t).__name__ for t in leaves]}); return one global batch of inputs"
        )
    return model, inputs


def _cluster(args: argparse.Namespace, profiles):
    if args.cluster is None:
        check_device_count(args.world_size, "--world-size asks for")
        return local_cluster(args.world_size)
    if args.cluster.startswith("@") or args.cluster.endswith(
        (".json", ".yaml", ".yml")
    ):
        return load_cluster(args.cluster.removeprefix("@"), profiles=profiles)
    return parse_cluster(args.cluster, profiles=profiles)


def _pins(args: argparse.Namespace) -> Pins:
    found, sources = {}, {}
    for flag, name in (
        ("tensor_parallel", "tensor_parallel"),
        ("pipeline_degree", "pipeline_degree"),
        ("stages", "num_stages"),
        ("micro_batches", "num_micro_batch"),
        ("schedule", "schedule"),
    ):
        value = getattr(args, flag)
        if value is not None:
            found[name], sources[name] = value, f"--{flag.replace('_', '-')} {value}"
    if args.row_weights:
        found["row_weights"] = _row_weights(args.row_weights)
        sources["row_weights"] = f"--row-weights {args.row_weights}"
    return Pins(**found, sources=sources)


def _row_weights(text: str) -> tuple[float, ...]:
    """``--row-weights 3,1``: positive finite numbers, one per data-parallel replica."""
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        weights = ()
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(
            f"--row-weights {text}: give positive finite numbers, one per data-parallel replica, "
            "comma-separated (e.g. 3,1)"
        )
    return weights


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before the search when an output file cannot be written or cannot be drawn."""
    from .plot.canvas import check_target, require_matplotlib

    if args.picture or args.trace_picture:
        require_matplotlib()
    if args.picture:
        check_target(args.picture, what="--picture")
    if args.trace:
        check_target(args.trace, formats=("json",), what="--trace")
    if args.trace_picture:
        check_target(args.trace_picture, what="--trace-picture")
    if args.out:
        check_target(args.out, formats=("json",), what="--out")


def _plan(args: argparse.Namespace) -> int:
    # Everything made so far (torch, whale, the arguments) lives until the command ends, as do
    # the model, its capture and the search's memos, and the search makes no cyclic garbage
    # (a collection after a 1,024-GPU plan finds none): the cyclic collector is paused for the
    # command, whose heap it would otherwise walk again and again (0.5-1.3 s of that plan, 2 MB
    # more at the peak). The heap made before is frozen, so that a collection the command
    # asks for skips it. Both undone at the end, for callers of main() in a process that goes on.
    gc.freeze()
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _plan_frozen(args)
    finally:
        gc.unfreeze()
        if collecting:
            gc.enable()


def _plan_frozen(args: argparse.Namespace) -> int:
    _check_outputs(args)
    profiles = load_profiles(args.profiles) if args.profiles else None
    cluster = _cluster(args, profiles)
    pins = _pins(args)  # bad pins fail before the model is captured
    model, inputs = load_target(args.target)
    positional, keywords = split_example_inputs(
        model, inputs, f"TARGET {args.target!r}"
    )
    captured = capture(model, positional, example_kwargs=keywords)
    scopes = dict(module_annotation_map(model))
    for node in captured.nodes:
        if len(node.annotations) > len(scopes.get(node.module_path, ())):
            scopes[f"{node.module_path}:{node.name}"] = node.annotations
    rows0 = next(
        t.shape[0]
        for t in (*positional, *keywords.values())
        if isinstance(t, torch.Tensor) and t.dim()
    )
    global_batch = args.global_batch if args.global_batch is not None else rows0
    options = CostOptions(
        dtype=args.dtype, precision=args.precision, optimizer=args.optimizer,
        memory_fraction=args.memory_fraction,
    )  # fmt: skip
    # As parallelize: tensor parallel only where the model has split() parts (the runtime shards
    # nothing else), unless --tensor-parallel asks for a what-if (the report then says so).
    settings = (
        SearchSettings(allow_tensor_parallel=False) if args.no_tensor_parallel else None
    )
    plan, report = auto_plan(
        captured, scopes, cluster.world_size, Config(auto_parallel=True), cluster=cluster,
        global_batch=global_batch, example_rows=rows0, options=options, settings=settings,
        extra_pins=pins, tensor_parallel_check=tensor_parallel_check(model, captured),
        memory_options=ALL_OPTIONS, module_paths={n for n, _ in model.named_modules()},
    )  # fmt: skip
    if (
        report.executable
    ):  # the sizes the runtime will use on tensor groups of mixed devices
        plan = speed_sizes(plan, cluster, model, captured)
        report = dataclasses.replace(report, plan=plan)
    if args.out:
        _save_plan(args, plan, report, model, cluster, global_batch)
    if args.json:
        if args.explain:
            print(
                json.dumps(
                    {"plan": json.loads(plan.to_json()), "report": report.to_dict()},
                    indent=2,
                )
            )
        else:
            print(plan.to_json())
    else:
        params = captured.total_param_bytes
        print(
            f"{type(model).__name__}: {len(captured.nodes)} graph nodes, {_bytes(params)} of "
            f"parameters as captured, global batch {global_batch} rows, {cluster.world_size} devices"
        )
        if args.cluster is None:
            memory = cluster.devices()[0].profile.memory_bytes
            print(
                f"no --cluster: this host's devices, {cluster}, {_bytes(memory)} of memory each"
            )
        print(report.table())
        if args.explain:
            print()
            print(report.explain())
    # After the plan is out: a picture that fails to draw does not hide the plan.
    sys.stdout.flush()
    timeline = None
    if args.trace or args.trace_picture:
        timeline = _simulated_step(
            plan, report, captured, rows0, cluster, global_batch, options
        )
    _write_outputs(args, plan, cluster, report, timeline)
    return 0


def _save_plan(args: argparse.Namespace, plan, report, model, cluster, global_batch) -> None:
    """``--out``: the plan, with what it was made for, for ``Config(plan=FILE)`` (written
    atomically: a temporary file renamed into place)."""
    from .planner.saved_plan import save_plan

    if not report.executable:
        raise ValueError(
            f"--out {args.out}: this plan shards layers outside the model's split() parts, which "
            "parallelize does not run (a what-if of --tensor-parallel); annotate them with split() "
            "or drop --tensor-parallel"
        )
    save_plan(args.out, plan, model, cluster=cluster, global_batch=global_batch)
    print(f"plan -> {args.out} (run it with Config(plan={args.out!r}))", file=sys.stderr)


def _bytes(n: int) -> str:
    """``1.25 GiB``, ``46.2 MiB``, ``38.0 KiB``: a small model's size reads as more than zero."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale / 10:
            return f"{n / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _simulated_step(plan, report, captured, rows0, cluster, global_batch, options):
    """The plan's simulated step on every rank: the report's, or (when the report was scored
    with other cost options than ``options``) the plan predicted again under ``options``."""
    if report.timeline is not None:
        return report.timeline
    from .planner.cost.model_profile import profile_model
    from .planner.cost.plan_cost import predict_plan

    profile = profile_model(captured, rows0, boundaries=plan.stage_boundaries)
    return predict_plan(plan, profile, cluster, global_batch, options).timeline


def _write_outputs(args: argparse.Namespace, plan, cluster, report, timeline) -> None:
    """The picture, the Chrome trace and its picture that the flags ask for."""
    if args.picture:
        from .plot import draw_plan

        draw_plan(args.picture, plan, cluster, report)
        print(f"plan picture -> {args.picture}", file=sys.stderr)
    if args.trace or args.trace_picture:
        from .ir.trace import save_chrome_trace
        from .plot import draw_timelines

        if args.trace:
            save_chrome_trace(args.trace, timeline)
            print(
                f"simulated step as a Chrome trace -> {args.trace} (open in ui.perfetto.dev)",
                file=sys.stderr,
            )
        if args.trace_picture:
            draw_timelines(args.trace_picture, timeline)
            print(f"simulated step picture -> {args.trace_picture}", file=sys.stderr)


def _profile(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from .ir.cluster_spec import cluster_to_dict
    from .planner.link_probe import profile_here
    from .plot.canvas import check_target

    # Before measuring (seconds to minutes): a file that cannot be written fails now.
    check_target(args.out, formats=(), what="--out")
    if args.cluster_out:
        check_target(args.cluster_out, formats=(), what="--cluster-out")

    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device, cluster, links = profile_here(quick=args.quick)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        save_profiles([device], args.out)
        rates = ", ".join(f"{d} {r / 1e12:.3g} TFLOP/s" for d, r in device.peak_flops)
        print(f"{device.name}: {rates}; memory {device.memory_bandwidth / 1e9:.3g} GB/s, "
              f"{device.memory_bytes / 2**30:.1f} GiB, times vary {device.jitter or 0:.0%} -> {args.out}")  # fmt: skip
        for name, fit in links.items():
            print(f"{name}: {fit.describe()} per link")
        if args.cluster_out and cluster is not None:
            with open(args.cluster_out, "w", encoding="utf-8") as file:
                json.dump(cluster_to_dict(cluster), file, indent=2)
            print(f"cluster {cluster} -> {args.cluster_out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _build_ext(args: argparse.Namespace) -> int:
    from .runtime import comm_ops

    path = comm_ops.build_extension(verbose=args.verbose)
    print(f"built {path}; backend now {comm_ops.backend()}")
    return 0


def _count_arg(text: str) -> int:
    """An argparse type: a whole number >= 1 (devices, rows, micro-batches, stages)."""
    try:
        value = int(text) if len(text) <= 30 else None
    except ValueError:
        value = None
    if value is None:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


_MAX_GLOBAL_BATCH = 2**24


def _rows_arg(text: str) -> int:
    """An argparse type: a global batch's rows, 1 to 2**24 (past any real batch; the search's
    time and memory grow with it, so a typo would otherwise run for minutes)."""
    value = _count_arg(text)
    if value > _MAX_GLOBAL_BATCH:
        raise argparse.ArgumentTypeError(
            f"{value:,} rows is more than whale plans for ({_MAX_GLOBAL_BATCH:,}); the global "
            "batch counts rows (sequences, images), not tokens"
        )
    return value


def _version() -> str:
    try:
        return importlib.metadata.version("whale")
    except (
        importlib.metadata.PackageNotFoundError
    ):  # a source tree on sys.path, not installed
        # The package is loaded already (this module is in it); cli may not import __init__.
        return getattr(sys.modules[__package__], "__version__", "unknown")


_PLAN_DESCRIPTION = """\
Dry run: capture the model TARGET returns, search data, tensor and pipeline parallel degrees,
stages, micro-batches, schedule and rows per replica for a cluster, and print the plan with
each device's work, memory and predicted time. No GPU is needed: the model may be built on
torch.device("meta"). Annotations in the model and the pin flags below fix choices; the
search makes the rest."""

_PLAN_EXAMPLES = """\
examples:
  whale plan examples/gpt.py --cluster "node0=2xA100-80GB,node1=2xT4" --global-batch 32 --explain
  whale plan examples/gpt.py --cluster "8xA100-80GB;net=100Gbps" --stages 4 --micro-batches 8
  whale plan my_model.py:build --cluster @cluster.json --out plan.json   # Config(plan="plan.json") runs it
  whale plan examples/gpt.py --cluster 4xT4 --picture plan.png --trace step.json
  whale plan examples/cnn.py --world-size 4        # 4 devices of this host, its real memory

cluster spec: [name=]<count>x<device>[+<count>x<device>...][(options)] per node, comma-separated,
  then optional ';net=<bandwidth>,lat=<time>' for the network between nodes.
known devices (datasheet figures; add others with --profiles, measured by `whale profile`):
  {devices}"""


def _plan_parser(sub) -> argparse.ArgumentParser:
    import textwrap

    devices = textwrap.fill(
        ", ".join(known_device_names()), width=92, subsequent_indent="  "
    )
    return sub.add_parser(
        "plan",
        help="dry run: search and print the plan for a model, no GPU needed",
        description=_PLAN_DESCRIPTION,
        epilog=_PLAN_EXAMPLES.format(devices=devices),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="whale", description="annotation-driven parallel training"
    )
    parser.add_argument("--version", action="version", version=f"whale {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = _plan_parser(sub)
    plan.add_argument(
        "target",
        help="file.py (defining whale_target()), file.py:fn or module:function",
    )
    plan.add_argument("--cluster", default=None,
                      help="e.g. 'node0=8xA100-80GB,node1=8xV100-32GB;net=100Gbps', or @cluster.json")  # fmt: skip
    plan.add_argument("--world-size", type=_count_arg, default=2,
                      help="without --cluster: this many devices of this host's type, with its memory")  # fmt: skip
    plan.add_argument(
        "--global-batch",
        type=_rows_arg,
        default=None,
        help="rows per step (default: example's)",
    )
    plan.add_argument(
        "--profiles",
        default=None,
        help="device profile file (whale profile) over datasheets",
    )
    plan.add_argument(
        "--dtype", default="fp32", help="compute dtype: fp32, tf32, bf16, fp16, fp8"
    )
    plan.add_argument(
        "--precision", default=None, help="fp32, mixed or half (default: from --dtype)"
    )
    plan.add_argument("--optimizer", default="adamw", help="adamw, sgd or sgd_momentum")
    plan.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="usable share of device memory",
    )
    plan.add_argument(
        "--micro-batches",
        type=_count_arg,
        default=None,
        help="pin the micro-batch count",
    )
    plan.add_argument(
        "--row-weights", default=None, help="pin rows per replica by weight, e.g. 3,1"
    )
    plan.add_argument(
        "--pipeline-degree",
        type=_count_arg,
        default=None,
        help="pin ranks per pipeline",
    )
    plan.add_argument(
        "--stages",
        type=_count_arg,
        default=None,
        help="pin the number of pipeline stages",
    )
    plan.add_argument(
        "--schedule", default=None, help="pin gpipe, 1f1b or interleaved_1f1b"
    )
    plan.add_argument(
        "--tensor-parallel",
        type=_count_arg,
        default=None,
        help="pin ranks per tensor-parallel group",
    )
    plan.add_argument("--no-tensor-parallel", action="store_true",
                      help="search data x pipeline plans only (tensor parallel is searched only where "
                           "the model has split() parts)")  # fmt: skip
    plan.add_argument(
        "--json",
        action="store_true",
        help="print the plan as JSON (Plan.from_json reads it)",
    )
    plan.add_argument("--out", default=None, metavar="FILE.json",
                      help="write the plan (with the model and devices it is for) for Config(plan=FILE)")  # fmt: skip
    plan.add_argument(
        "--explain",
        action="store_true",
        help="why this plan, and the best rejected ones",
    )
    plan.add_argument("--picture", default=None, metavar="FILE.png",
                      help="draw the plan: each device, what it runs, its memory (.png, .svg, .pdf)")  # fmt: skip
    plan.add_argument("--trace", default=None, metavar="FILE.json",
                      help="write the simulated pipeline step as a Chrome trace (ui.perfetto.dev)")  # fmt: skip
    plan.add_argument("--trace-picture", default=None, metavar="FILE.png",
                      help="draw the simulated pipeline step as a timeline per rank")  # fmt: skip
    plan.set_defaults(run=_plan)
    prof = sub.add_parser(
        "profile", help="measure this host's devices (and links under torchrun)"
    )
    prof.add_argument(
        "--out", default="whale_profile.json", help="profile file to write"
    )
    prof.add_argument(
        "--cluster-out",
        default=None,
        help="also write the job's cluster with measured links",
    )
    prof.add_argument(
        "--quick", action="store_true", help="small sizes: a first look in seconds"
    )
    prof.set_defaults(run=_profile)
    ext = sub.add_parser(
        "build-ext", help="compile the C++/CUDA extension into torch's cache"
    )
    ext.add_argument("--verbose", action="store_true")
    ext.set_defaults(run=_build_ext)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, NotImplementedError, ImportError) as err:
        print(f"whale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (
        OSError
    ) as err:  # a file named on the command line that cannot be read or written
        where = f"{err.filename}: " if err.filename else ""
        print(
            f"whale {args.command}: error: {where}{err.strerror or err}",
            file=sys.stderr,
        )
        return 2


def command() -> None:
    """The ``whale`` command (and ``python -m whale.cli``): :func:`main`, then exit. Frozen, the
    heap is skipped by the interpreter's last collection at exit, which otherwise walks all of it
    (0.6 s after a 1,024-GPU plan); streams are flushed and atexit handlers run as usual."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    command()
