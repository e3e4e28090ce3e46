"""Random draws a traced graph would freeze (whale/capture/draws.py).

A tracer runs forward once, so a LayerDrop draw from Python's ``random`` or NumPy (MusicGen's
decoder, Wav2Vec2's adapter) would be kept in the graph at the value drawn while tracing: every
step would skip, or never skip, the same layers. Each test runs the captured graph against the
model at several seeds; both draw from the same generators, so they agree exactly (no
tolerance: the same ops on the same values).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from whale.capture import CaptureError, capture


class _PythonLayerDrop(nn.Module):
    """MusicGen's decoder: each layer skipped on ``random.uniform(0, 1) < p`` while training."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            if self.training and random.uniform(0, 1) < self.p:
                continue
            x = layer(x)
        return x


class _NumpyLayerDrop(_PythonLayerDrop):
    """Wav2Vec2's adapter: ``np.random.random() > p`` runs the layer."""

    def forward(self, x):
        for layer in self.layers:
            if not self.training or np.random.random() > self.p:
                x = layer(x)
        return x


class _TorchLayerDrop(_PythonLayerDrop):
    """transformers' usual LayerDrop: ``torch.rand([]) < p`` skips the layer."""

    def forward(self, x):
        for layer in self.layers:
            if self.training and torch.rand([]) < self.p:
                continue
            x = layer(x)
        return x


def _through_graph(c, x):
    return c.unflatten_output(tree_leaves(c.graph_module(*c.flatten_inputs((x,), {}))))


def _seed(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


@pytest.mark.parametrize("drop", [_PythonLayerDrop, _NumpyLayerDrop, _TorchLayerDrop])
def test_a_layerdrop_module_is_one_opaque_call_that_draws_each_step(drop, capfd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), drop(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"could not trace every module(?s:.*)'1' as one opaque node"):
        c = capture(model, torch.randn(4, 8))
    assert [n.module_path for n in c.nodes if "opaque" in str(n.target)] == ["1"]
    x = torch.randn(3, 8)
    outputs = []
    for s in range(6):
        _seed(s)
        got = _through_graph(c, x)
        _seed(s)
        torch.testing.assert_close(got, model(x), rtol=0, atol=0)
        outputs.append(got)
    # The draws differ from seed to seed: a frozen draw would give one output for all.
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])
    # torch's symbolic shapes logger ("Unable to find user code corresponding to {u0}") writes
    # to the stream it was made with on each export that stopped at the draw: held back.
    err = capfd.readouterr().err
    assert "Unable to find user code" not in err and "symbolic_shapes" not in err, err


@pytest.mark.parametrize("drop", [_PythonLayerDrop, _NumpyLayerDrop])
def test_a_draw_that_decides_nothing_leaves_the_graph_whole(drop):
    # MusicGen draws random.uniform(0, 1) and Wav2Vec2's adapter np.random.random() for every
    # layer, at layerdrop 0 too: no value they can take skips a layer, so fx keeps every layer.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), drop(p=0.0), nn.Linear(8, 2))
    c = capture(model, torch.randn(4, 8))
    assert c.frontend == "fx" and not [n for n in c.nodes if "opaque" in str(n.target)]
    assert {n.module_path for n in c.nodes} >= {"1.layers.0", "1.layers.1", "1.layers.2"}
    x = torch.randn(3, 8)
    torch.testing.assert_close(_through_graph(c, x), model(x), rtol=0, atol=0)


def test_draws_from_a_generator_forward_seeds_itself_stay_in_the_graph():
    # BigBird's random attention blocks: np.random.seed(seed), then a permutation, every
    # forward: the same draw every step, so the graph may keep it.
    class SeededBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            np.random.seed(7)
            order = torch.tensor(np.random.permutation(8))
            return self.fc(x)[:, order]

    model = nn.Sequential(SeededBlocks(), nn.Linear(8, 2))
    c = capture(model, torch.randn(4, 8))  # export: fx holds the permutation as a new attribute
    assert not [n for n in c.nodes if "opaque" in str(n.target)]
    x = torch.randn(3, 8)
    torch.testing.assert_close(_through_graph(c, x), model(x), rtol=0, atol=0)


def test_a_torch_draw_fx_would_run_once_is_kept_as_an_op():
    # fx runs torch.rand(8) for real while tracing (it takes no traced input) and would keep
    # the tensor as a constant; export records the op, drawn anew on every call.
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) + torch.rand(8)

    model = Noisy()
    c = capture(model, torch.randn(4, 8))
    assert c.frontend == "export"
    x = torch.randn(2, 8)
    for s in range(2):
        torch.manual_seed(s)
        got = _through_graph(c, x)
        torch.manual_seed(s)
        torch.testing.assert_close(got, model(x), rtol=0, atol=0)
    assert not torch.equal(_through_graph(c, x), _through_graph(c, x))

    class NoisyLike(Noisy):  # a draw from a traced input is an op for fx too
        def forward(self, x):
            return self.fc(x) + torch.rand_like(x)

    assert capture(NoisyLike(), torch.randn(4, 8), frontend="fx").frontend == "fx"


def test_a_draw_in_the_roots_own_forward_is_a_capture_error_with_the_fix():
    class Jitter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) * (1 + 0.1 * random.random())

    with pytest.raises(CaptureError) as info:
        capture(Jitter(), torch.randn(4, 8))
    message = str(info.value)
    assert "RandomDraw: forward draws random.random()" in message
    assert "self.fc(x) * (1 + 0.1 * random.random())" in message
    assert "Fix: where the draw is a value, draw it with torch (torch.rand(()) instead of random.random()" in message


def test_capture_leaves_every_generator_as_it_found_it():
    # Capture runs the model eagerly (the opaque call's recording): the draws after it are
    # the ones the same seed gives without capture.
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), _PythonLayerDrop(), _NumpyLayerDrop(), _TorchLayerDrop())
    x = torch.randn(4, 8)
    _seed(3)
    expected = (random.random(), np.random.random(), torch.rand(4))
    _seed(3)
    with pytest.warns(UserWarning):
        capture(model, x)
    got = (random.random(), np.random.random(), torch.rand(4))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_musicgen_layerdrop_draws_each_step_and_at_zero_keeps_the_graph_whole():
    t = pytest.importorskip("transformers")

    def musicgen(layerdrop: float):
        torch.manual_seed(0)
        cfg = t.MusicgenDecoderConfig(
            vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, num_codebooks=2,
            max_position_embeddings=16, layerdrop=layerdrop, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
        )  # fmt: skip
        return t.MusicgenForCausalLM(cfg)

    ids = torch.randint(0, 32, (4 * 2, 8))  # 4 rows of 2 codebooks
    whole = capture(musicgen(0.0), {"input_ids": ids})
    assert not [n for n in whole.nodes if "opaque" in str(n.target)]
    assert {"model.decoder.layers.0", "model.decoder.layers.1"} <= {n.module_path for n in whole.nodes}
    model = musicgen(0.5)
    with pytest.warns(UserWarning, match=r"MusicgenDecoder: RandomDraw: forward draws random.uniform\(\)"):
        c = capture(model, {"input_ids": ids})
    assert [n.module_path for n in c.nodes if "opaque" in str(n.target)] == ["model.decoder"]
    logits = []
    for s in range(4):
        random.seed(s)
        got = c.unflatten_output(tree_leaves(torch.fx.Interpreter(c.graph_module).run(*c.flatten_inputs((), {"input_ids": ids}))))
        random.seed(s)
        torch.testing.assert_close(got["logits"], model(input_ids=ids).logits, rtol=0, atol=0)
        logits.append(got["logits"])
    assert any(not torch.equal(logits[0], x) for x in logits[1:])
