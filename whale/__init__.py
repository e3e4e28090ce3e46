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
from .runtime.state import checkpoint

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
