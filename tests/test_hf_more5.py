"""A fifth set of architectures whale was not written against (tests/hf_more_models5.py): each
equals the local model on 2 gloo ranks under a strategy that meets what it adds (loss,
gradients by name, parameters after an AdamW step; tolerances of tests/equivalence.py: fp32,
only the order of additions differs; state dicts round-trip as tests/test_hf_pipeline.py
checks), or is refused with a message that says what is wrong and what to do.

Found by running the 16 of them under data parallel, a split of the whole model, a 2-stage
pipeline, ZeRO 3, an uneven 1F1B pipeline and a checkpointed layer (96 cases; the suite keeps
one case for each fix), and fixed:

* DBRX's experts loop over the experts some token was routed to, JetMoE's split their rows by
  counts read from the routing, Longformer's attention branches on whether any token is
  global: export failed, so no pipeline and no split were possible. Capture now makes the
  module that stops export (or whose sizes are known only at run time) one opaque call that
  runs its own forward, and pipelines cut around it.
* Switch Transformers hung under ZeRO 3: a unit was reduced once all its parameters had
  gradients, so a rank whose tokens reached no expert of a layer reduced it at the end of
  backward, after the others had moved on, and the collectives paired up wrongly. Units are now
  reduced in an order every rank shares, and a container inside a unit (the experts) is not a
  unit of its own.
* BigBird's ``unsqueeze_`` on a value split() had gathered failed: the gather returned a view,
  which autograd does not let a model modify in place. It returns a tensor of its own.
* GraniteMoE takes ``use_cache`` only through ``**kwargs``, so capture could not set it and
  export refused the cache the model returned. Capture turns ``config.use_cache`` off while it
  runs.
* Mamba2's split refusal said its depthwise convolution weight (c, 1, k) "stacks c matrices"
  of experts: it now names the convolution.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tests.hf_cases import whole_split_refusal
from tests.test_hf_more2 import _check_trainable

CASES = "tests.hf_more_cases"
_OPAQUE = "could not trace every module"


@pytest.mark.parametrize(
    "name, kwargs",
    [
        # the experts' loop captured as one opaque call a layer: 7 rows in a 1F1B pipeline
        ("dbrx", {"stage_boundaries": ["transformer.blocks.1"], "num_micro_batch": 4, "schedule": "1f1b", "rows": 7}),
        # experts whose row counts are known at run time only: a 2-stage pipeline
        ("jetmoe", {"stage_boundaries": ["model.layers.1"], "num_micro_batch": 2}),
        # the attention branching on a tensor's value: a 2-stage pipeline
        ("longformer", {"stage_boundaries": ["longformer.encoder.layer.1"], "num_micro_batch": 2}),
        # top-1 routing with an expert capacity: ZeRO 3, each rank's tokens reach other experts
        # (transformers skips its attention mask under export and then indexes None: the
        # encoder and decoder are opaque calls)
        ("switch_transformers", {"zero_stage": 3}),
        # use_cache only through **kwargs: 7 rows in a 1F1B pipeline
        ("granitemoe", {"stage_boundaries": ["model.layers.1"], "num_micro_batch": 4, "schedule": "1f1b", "rows": 7}),
        # block-sparse attention, an in-place unsqueeze of a gathered value: the whole model split
        ("big_bird", {"split": ("",)}),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_equals_local(world2, name, kwargs):
    outs = world2.run(f"{CASES}:equivalence_warnings", name, about=_OPAQUE, **kwargs)
    _check_trainable(outs)
    told = [w for w in outs[0]["warnings"] if _OPAQUE in w]
    if name in ("dbrx", "jetmoe", "longformer", "switch_transformers"):
        assert len(told) == 1 and "as one opaque node" in told[0], outs[0]["warnings"]
    else:
        assert told == [], outs[0]["warnings"]


def test_a_depthwise_convolutions_refusal_names_the_convolution():
    message = whole_split_refusal("mamba2")
    assert "(aten.conv1d.default) at 'backbone.layers.0.mixer'" in message, message
    assert "whale does not shard convolutions" in message and "stacks" not in message, message
