"""whale: annotation-driven auto-parallel training for PyTorch.

Example::

    import whale as wh

    wh.init()
    model = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,))
    loss = model.step(x, y)
"""

from .api import init, parallelize
from .config import Config
from .primitives import annotate, cluster, pipeline, replicate, split, stage


def __getattr__(name: str):
    # whale.checkpoint loads torch.distributed.checkpoint (about a second of import): only
    # when first used, so `whale plan` and `import whale` do not pay for it.
    if name == "checkpoint":
        from .runtime.state import checkpoint

        globals()["checkpoint"] = checkpoint
        return checkpoint
    raise AttributeError(f"module 'whale' has no attribute {name!r}")


__all__ = [
    "Config",
    "annotate",
    "checkpoint",
    "cluster",
    "init",
    "parallelize",
    "pipeline",
    "replicate",
    "split",
    "stage",
]
__version__ = "0.1.0"
