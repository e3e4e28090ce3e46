"""Training and evaluation mode in captured graphs.

``torch.export`` (and fx, for ``F.dropout(x, training=self.training)``) records the mode the
model was in at capture as a constant: ``aten.batch_norm(..., training=True, ...)``,
``aten.dropout(x, p, train=True)``, and BatchNorm's ``num_batches_tracked += 1`` beside it. A
program built from such a graph kept normalizing by batch statistics (and moving its running
statistics and count) and dropping activations after ``eval()``, where the local model uses its
running statistics and drops nothing.

:func:`follow_train_mode` replaces each such constant that was True by the ``training`` flag of
a stateless child module, read when the graph runs (and the count's 1 by 1 or 0); ``module.train(mode)`` sets that flag as it
sets every child's, so the graph follows ``train()`` and ``eval()`` as the local model does. A
constant that was False at capture (a module the user holds in eval mode while training) stays
False, as it does in the local model.

Example::

    stage_module = follow_train_mode(stage_module)  # a GraphModule; then stage_module.eval() works
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..capture.graph import NODE_INFO_KEY

__all__ = ["TrainMode", "follow_train_mode"]

_aten = torch.ops.aten

# target -> (position, keyword) of its training flag
_MODE_ARGS = {
    _aten.batch_norm.default: (5, "training"),
    _aten.dropout.default: (2, "train"),
    _aten.feature_dropout.default: (2, "train"),
    _aten.alpha_dropout.default: (2, "train"),
    _aten.feature_alpha_dropout.default: (2, "train"),
    _aten.native_dropout.default: (2, "train"),
    F.batch_norm: (5, "training"),
    F.dropout: (2, "training"),
    F.dropout1d: (2, "training"),
    F.dropout2d: (2, "training"),
    F.dropout3d: (2, "training"),
    F.alpha_dropout: (2, "training"),
    F.feature_alpha_dropout: (2, "training"),
}

_MODE_ATTR = "_whale_train_mode"


class TrainMode(nn.Module):
    """No parameters or buffers: its ``training`` flag is its graph module's (``train()`` sets it)."""


def _training(mode: nn.Module) -> bool:
    return mode.training


def _one_if_training(mode: nn.Module) -> int:
    return int(mode.training)


def _counts_batches(node: fx.Node) -> bool:
    """BatchNorm's ``num_batches_tracked += 1``, which export records beside the op when training."""
    if node.op != "call_function" or node.target not in (_aten.add_.Tensor, _aten.add.Tensor) or len(node.args) < 2:
        return False
    buf = node.args[0]
    return isinstance(buf, fx.Node) and buf.op == "get_attr" and buf.target.endswith(".num_batches_tracked")


def follow_train_mode(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` (modified in place) with every training flag captured as True read from the
    module's mode instead; ``gm`` unchanged when it has none."""
    graph = gm.graph
    flagged = []
    for node in graph.nodes:
        spec = _MODE_ARGS.get(node.target) if node.op == "call_function" else None
        if spec is None:
            continue
        pos, key = spec
        value = node.args[pos] if len(node.args) > pos else node.kwargs.get(key)
        if value is True:
            flagged.append((node, pos, key))
    counted = [node for node in graph.nodes if _counts_batches(node) and node.args[1] == 1]
    if not flagged and not counted:
        return gm
    if not hasattr(gm, _MODE_ATTR):
        gm.add_submodule(_MODE_ATTR, TrainMode())
    getattr(gm, _MODE_ATTR).train(gm.training)
    for node, pos, key in [*flagged, *((n, 1, "other") for n in counted)]:
        # One flag per use, placed just before it: a pipeline stage never receives it from another.
        with graph.inserting_before(node):
            mode = graph.get_attr(_MODE_ATTR)
            flag = graph.call_function(_training if pos != 1 else _one_if_training, (mode,))
        if NODE_INFO_KEY in node.meta:  # the same module path: a checkpointed region keeps it
            mode.meta[NODE_INFO_KEY] = flag.meta[NODE_INFO_KEY] = node.meta[NODE_INFO_KEY]
        if len(node.args) > pos:
            node.args = (*node.args[:pos], flag, *node.args[pos + 1 :])
        else:
            node.kwargs = {**node.kwargs, key: flag}
    gm.recompile()
    return gm
