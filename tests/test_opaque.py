"""A model export cannot trace, every strategy: tests.models.RoutedLM loops over the experts its
rows were routed to, so capture makes each RoutedExperts one opaque call (tests/test_capture.py)
and the strategies that need a graph cut and run around it. On 2 gloo ranks, each rank's rows
reach other experts; loss, gradients by name (None where the local model has none) and
parameters after an AdamW step equal the local model's, with the tolerances of
tests/equivalence.py (fp32, only the order of additions differs)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

CASES = "tests.dp_cases"


@pytest.mark.parametrize(
    "config",
    [
        {"stage_boundaries": ["blocks.1"], "num_micro_batch": 2},  # GPipe-free default: 1F1B
        {"stage_boundaries": ["blocks.2"], "num_micro_batch": 4, "schedule": "gpipe"},
        # Each unit gathered and reduced in an order every rank shares, whichever experts its
        # rows reached (a unit per expert, or reducing a unit once its parameters all have
        # gradients, paired different collectives across ranks and hung).
        {"zero_stage": 3},
        {"activation_checkpointing": ["blocks.1"]},
    ],
    ids=["pipeline", "gpipe-uneven", "zero3", "checkpointed"],
)
def test_a_model_with_an_opaque_call_equals_the_local_model(world2, config):
    _check(world2.run(f"{CASES}:routed_lm", **config))


@pytest.mark.parametrize(
    "config",
    [
        # The stack runs in its stage as itself, so the Function's backward gets its layers'
        # gradients (a graph of its forward ran under no_grad: no gradient, a stage that hung).
        {"stage_boundaries": ["block"], "num_micro_batch": 2},
        # The backward runs the layers' children, not the layers: each gathers its unit.
        {"zero_stage": 3},
    ],
    ids=["pipeline", "zero3"],
)
def test_a_custom_autograd_function_equals_the_local_model(world2, config):
    _check(world2.run(f"{CASES}:reversible_lm", **config))


def _check(outs) -> None:
    for out in outs:
        assert_close(torch.tensor(out["loss"]), torch.tensor(out["ref_loss"]), rtol=1e-6, atol=0)
        for step, (grads, ref) in enumerate(zip(out["grads"], out["ref_grads"])):
            held = set(grads)  # a pipeline rank holds its stage's parameters
            assert held and held <= set(ref), step
            for n in held:
                if ref[n] is None:
                    assert grads[n] is None, f"step {step} grad {n}"
                else:
                    assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6, msg=f"step {step} grad {n}")
        unused = [n for n, g in out["ref_grads"][0].items() if g is None]
        assert unused == [] or all(n.startswith("blocks.") for n in unused)
        for n, p in out["ref_params"][0].items():
            assert_close(out["params"][0][n], p, rtol=0, atol=5e-4, msg=n)


def test_zero3_cuts_nested_blocks_into_units_only_where_the_graph_runs_them_all():
    """ZeRO 3 gathers a unit at a time. A container inside a unit becomes units of its own
    only where the captured graph runs each of its children on every rank (a Swin stage's
    blocks); RoutedLM's experts, inside an opaque call, stay in their block's unit."""
    import warnings

    from torch import nn

    from tests.models import RoutedLM
    from whale.capture import capture
    from whale.rewrite.build import always_run_containers
    from whale.runtime.zero.sharded_params import unit_modules

    class Stages(nn.Module):  # two stages of two blocks, as a hierarchical vision model
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(2))

        def forward(self, x):
            for stage in self.stages:
                x = stage(x)
            return x

    model = Stages()
    always = always_run_containers(model, capture(model, torch.randn(2, 4)))
    assert always == {"stages", "stages.0", "stages.1"}
    assert sorted(n for n, _ in unit_modules(model, always)) == ["", "stages.0", "stages.0.0", "stages.0.1", "stages.1",
                                                                "stages.1.0", "stages.1.1"]
    assert [n for n, _ in unit_modules(model)] == ["", "stages.0", "stages.1"]  # no graph: the outer ones
    routed = RoutedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        always = always_run_containers(routed, capture(routed, torch.randint(0, 32, (4, 6))))
    assert always == {"blocks"}
    assert [n for n, _ in unit_modules(routed, always)] == ["", "blocks.0", "blocks.1", "blocks.2"]


def test_an_opaque_call_whose_caller_branches_on_being_traced_moves_to_the_caller():
    """LongT5's stack builds its default attention mask only when not traced
    (``is_torchdynamo_compiling()``), and its attention is an opaque call: the traced call passes
    other tensors than the recorded eager one, and the graph ran the attention without the
    mask (a crash at LongT5's shapes, other numbers here). The caller becomes the opaque call,
    and the graph computes what the model does, exactly."""
    import warnings

    from torch import nn
    from torch.utils._pytree import tree_leaves

    from whale.capture import CaptureError, capture

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, mask=None):
            h = self.lin(x)
            if (h > 100).any():  # data-dependent: export stops, an opaque call
                h = h.clamp(max=100)
            return h if mask is None else h * mask.unsqueeze(-1)

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = Attention()

        def forward(self, x):
            mask = None if torch.compiler.is_compiling() else torch.full(x.shape[:2], 0.5)
            return self.attention(x, mask)

    model = nn.Sequential(nn.Linear(8, 8), Stack(), nn.Linear(8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = capture(model, torch.randn(4, 3, 8))
    assert [n.module_path for n in c.nodes if "opaque" in str(n.target)] == ["1"]
    assert any("the code calling '1.attention' (Attention) takes another branch when traced" in str(w.message) for w in caught)
    x = torch.randn(5, 3, 8)
    got = c.unflatten_output(tree_leaves(c.graph_module(*c.flatten_inputs((x,), {}))))
    assert_close(got, model(x), rtol=0, atol=0)
    # In the root's own forward nothing can take the call in: capture says why.
    with pytest.raises(CaptureError, match=r"OpaqueCallMismatch: the code calling 'attention' \(Attention\) takes another branch"):
        capture(model[1], torch.randn(4, 3, 8))
