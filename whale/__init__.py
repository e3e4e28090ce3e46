"""whale: annotation-driven auto-parallel training for PyTorch.

Example::

    import whale as wh

    wh.init()
    model = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=(x,))
    loss = model.step(x, y)
"""

import gc as _gc

# Importing whale imports torch: tens of thousands of objects that all live on, which the cyclic
# collector would walk again and again for nothing while they are made (0.1-0.2 s of the
# import on a 2-core host). Collection resumes as it was once they are made.
_collecting = _gc.isenabled()
_gc.disable()
try:
    from .api import init, parallelize
    from .config import Config
    from .primitives import annotate, cluster, pipeline, replicate, split, stage
finally:
    # The objects made go straight to the oldest generation (freeze, then unfreeze: a move,
    # no walk), where the next full collection finds them, and the import's own garbage with
    # them, rather than the first young collection walking all 350,000 (0.15 s).
    _gc.freeze()
    _gc.unfreeze()
    if _collecting:
        _gc.enable()


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
