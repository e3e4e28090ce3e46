"""``Config(offload="optimizer"|"params")``: the optimizer step layer by layer, each layer's
state (and parameters) fetched from the slower tier one layer ahead and written back behind.

The user builds a normal torch optimizer on ``program.parameters()`` and calls ``opt.step()``.
The program registers a global optimizer step pre-hook (``torch.optim.optimizer.
register_optimizer_step_pre_hook``); on the step of an optimizer holding its parameters the hook
runs the optimizer's own update once per layer (its param groups narrowed to that layer's
parameters, hyperparameters untouched), then lets the call itself run on empty groups (a
post-hook restores them). Before a layer's update a background thread has fetched it; after it,
the layer is written back and its resident copy dropped while the next layer updates.

Between steps ``optimizer.state[p]`` holds the tier's tensors themselves (CPU: views of the
file mapping; CUDA: pinned host tensors), so ``optimizer.state_dict()``, ``wh.checkpoint.save``
and ``load`` read and write them as usual; state that a load (or the first step) puts anywhere
else is moved into the tier after the layer's next update. With ZeRO, ``program.parameters()``
are the shards and the state offloaded is the shard's.

Layers are the parameters' module paths up to the first numeric index (``blocks.3``,
``model.layers.0``); parameters outside any indexed container form one layer per top module
(``embed``, ``lm_head``), in the order ``program.named_parameters()`` gives them.
"""

from __future__ import annotations

import ctypes
import re
import weakref
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .tier import TierBlock, resident_of

__all__ = ["OFFLOAD_MODES", "Offload", "layer_key"]

OFFLOAD_MODES = ("none", "optimizer", "params")
_INDEX = re.compile(r"^((?:.*?\.)??\d+)(\.|$)")
_STASH = "_whale_offload_groups"


def layer_key(name: str) -> str:
    """The layer a parameter belongs to: its path up to the first numeric index, else its top module."""
    match = _INDEX.match(name)
    if match:
        return match.group(1)
    return name.split(".", 1)[0]


class Offload:
    """The offload of one program's parameters (``mode``: ``"optimizer"`` or ``"params"``)."""

    def __init__(
        self, named: Iterable[tuple[str, nn.Parameter]], mode: str, directory: str,
        modules: Iterable[nn.Module] = (),
    ) -> None:
        named = list(named)
        if mode not in OFFLOAD_MODES[1:]:
            raise ValueError(f"offload mode {mode!r}: choose one of {OFFLOAD_MODES}")
        self.mode = mode
        self.directory = directory
        keys: dict[str, int] = {}
        self.layers: list[list[nn.Parameter]] = []
        self.layer_of: dict[int, int] = {}
        for name, p in named:
            index = keys.setdefault(layer_key(name), len(keys))
            if index == len(self.layers):
                self.layers.append([])
            self.layers[index].append(p)
            self.layer_of[id(p)] = index
        self.layer_names = list(keys)
        devices = {p.device for _, p in named}
        self.device = devices.pop() if len(devices) == 1 else torch.device("cpu")
        self.pinned = self.device.type == "cuda"
        if self.pinned and mode == "params":
            raise NotImplementedError(
                "Config(offload='params') runs on CPU devices (memory-mapped tier) only in this "
                "version; use offload='optimizer' on GPUs"
            )
        self._copy_stream = torch.cuda.Stream(self.device) if self.pinned else None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="whale-offload")
        # Per optimizer, per layer: the block holding its state and the (param, key) of each view.
        self._state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._params: list[TierBlock | None] = [None] * len(self.layers)
        if mode == "params":
            for i, layer in enumerate(self.layers):
                block = TierBlock([p.detach() for p in layer], directory, pinned=False)
                for p, view in zip(layer, block.views):
                    p.data = view
                block.release()
                self._params[i] = block
        me = weakref.ref(self)
        self._hooks = [
            register_optimizer_step_pre_hook(lambda opt, args, kwargs: _call(me, "_pre_step", opt, args, kwargs)),
            register_optimizer_step_post_hook(lambda opt, args, kwargs: _call(me, "_post_step", opt, args, kwargs)),
        ]
        if mode == "params":
            self._hooks += self._param_hooks(me, list(modules))
        self._adopted = False
        self.on_layer: Any = None  # called with each layer's index after its update (measurements)
        self._closed = False
        weakref.finalize(self, _shutdown, self._worker, self._hooks)

    # ---- hooks ---------------------------------------------------------------------------

    def _pre_step(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        held = opt.__dict__.get(_STASH)
        if held is not None and held[0] is args:
            return  # another program's offload stepped this optimizer in this very call
        _restore(opt)  # a stash left by a call that raised before its post-hook
        params = [p for g in opt.param_groups for p in g["params"]]
        ours = [id(p) in self.layer_of for p in params]
        if not any(ours) or self._closed:
            return
        if not all(ours):
            raise ValueError(
                f"Config(offload={self.mode!r}): the optimizer holds {ours.count(False)} parameter(s) "
                "that are not the parallelized program's; build it on program.parameters()"
            )
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:  # args[0]: opt
            raise ValueError(
                f"Config(offload={self.mode!r}) steps the optimizer layer by layer and cannot "
                "re-evaluate a closure per layer; call program.step(...) then optimizer.step() "
                "without a closure"
            )
        self.step_layers(opt)
        setattr(opt, _STASH, (args, [g["params"] for g in opt.param_groups]))
        for g in opt.param_groups:
            g["params"] = []  # the call's own body now updates nothing: every layer is done
        return

    def _post_step(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        _restore(opt)

    def _param_hooks(self, me: weakref.ref, roots: list[nn.Module]) -> list:
        """``offload="params"``: each module holding parameters fetches the next layer when it
        starts (forward) and releases the layer before; each layer's last gradient fetches the
        layer before it (backward order) and releases its own. Where a graph holds no modules
        (parameters read as attributes), the roots' forward maps the layers in, in order."""
        hooks = []
        self._grads_expected = [sum(p.requires_grad for p in layer) for layer in self.layers]
        self._grads_seen = [0] * len(self.layers)
        self._entered: set[int] = set()
        self._current: int | None = None
        hooked = False
        for root in roots:
            hooks.append(root.register_forward_pre_hook(lambda module, args: _call(me, "_forward_begins")))
            for sub in root.modules():
                own = [p for p in sub.parameters(recurse=False) if id(p) in self.layer_of]
                if own:
                    layer = self.layer_of[id(own[0])]
                    hooks.append(sub.register_forward_pre_hook(
                        lambda module, args, layer=layer: _call(me, "_enter_layer", layer)))
                    hooked = True
        self._modules_hooked = hooked
        for i, layer in enumerate(self.layers):
            for p in layer:
                if p.requires_grad:
                    hooks.append(p.register_post_accumulate_grad_hook(lambda p, i=i: _call(me, "_grad_done", i)))
        return hooks

    def _forward_begins(self) -> None:
        self._grads_seen = [0] * len(self.layers)
        self._entered = set()
        self._current = None
        if not self._modules_hooked:
            for block in self._params:
                if block is not None:
                    self._worker.submit(block.prefetch)
        elif self._params:
            self._worker.submit(self._params[0].prefetch)

    def _enter_layer(self, layer: int) -> None:
        if layer == self._current:
            return
        previous, self._current = self._current, layer
        self._entered.add(layer)
        ahead = layer + 1
        if ahead < len(self.layers) and ahead not in self._entered:
            self._worker.submit(self._params[ahead].prefetch)
        if previous is not None:
            self._worker.submit(self._params[previous].release)  # backward maps it in again

    def _grad_done(self, layer: int) -> None:
        self._grads_seen[layer] += 1
        if self._grads_seen[layer] == 1 and layer > 0:
            self._worker.submit(self._params[layer - 1].prefetch)
        if self._grads_seen[layer] == self._grads_expected[layer]:
            self._worker.submit(self._params[layer].release)

    # ---- the layered step ------------------------------------------------------------------

    def step_layers(self, opt: torch.optim.Optimizer) -> None:
        """Run ``opt``'s update once per layer, each layer fetched ahead and written back behind."""
        step = type(opt).step
        raw = step.__wrapped__ if getattr(step, "hooked", False) else step
        groups = opt.param_groups
        full = [g["params"] for g in groups]
        by_layer: dict[int, list[list[nn.Parameter]]] = {}
        for gi, params in enumerate(full):
            for p in params:
                by_layer.setdefault(self.layer_of[id(p)], [[] for _ in groups])[gi].append(p)
        order = sorted(by_layer)
        blocks = self._state.setdefault(opt, {})
        pending: list[Future] = []
        try:
            fetched = self._fetch(opt, blocks, order[0]) if order else None
            for i, layer in enumerate(order):
                current = fetched.result() if isinstance(fetched, Future) else fetched
                if i + 1 < len(order):
                    fetched = self._fetch(opt, blocks, order[i + 1])
                for g, params in zip(groups, by_layer[layer]):
                    g["params"] = params
                raw(opt)
                if self.on_layer is not None:
                    self.on_layer(layer)
                pending.append(self._write_back(opt, blocks, layer, current))
        finally:
            for g, params in zip(groups, full):
                g["params"] = params
            for f in pending:
                if isinstance(f, Future):
                    f.result()
            if self._copy_stream is not None:
                self._copy_stream.synchronize()
            if self._adopted and not self.pinned:
                _trim_heap()  # the state the step made in ordinary memory, freed: give it back
            self._adopted = False

    def _entries(self, opt: torch.optim.Optimizer, layer: int) -> list[tuple[nn.Parameter, str, torch.Tensor]]:
        out = []
        for p in self.layers[layer]:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() > 0:
                    out.append((p, key, value))
        return out

    def _fetch(self, opt: torch.optim.Optimizer, blocks: dict, layer: int) -> Any:
        """Start bringing ``layer`` in: CPU, its pages mapped in by the worker (a Future); CUDA,
        device copies of its pinned state on the copy stream (returned with their event)."""
        held = blocks.get(layer)
        param_block = self._params[layer]
        if not self.pinned:
            def work() -> None:
                if held is not None:
                    held[0].prefetch()
                if param_block is not None:
                    param_block.prefetch()
            return self._worker.submit(work)
        if held is None or not _holds(self._entries(opt, layer), held[1], held[0].views):
            return None  # no state yet, or a load replaced it: the write back adopts it
        block, keys = held
        with torch.cuda.stream(self._copy_stream):
            device = [v.to(self.device, non_blocking=True) for v in block.views]
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        for (p, key), d in zip(keys, device):
            opt.state[p][key] = d
        torch.cuda.current_stream(self.device).wait_event(event)
        return device

    def _write_back(self, opt: torch.optim.Optimizer, blocks: dict, layer: int, device: Any) -> Any:
        """After ``layer``'s update: state not yet in the tier is moved there; the layer's
        resident copy is dropped behind (CPU: by the worker, a Future; CUDA: copied home)."""
        entries = self._entries(opt, layer)
        held = blocks.get(layer)
        if self.pinned and held is not None and device is not None:
            block, keys = held
            if _holds(entries, keys, device):
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                self._copy_stream.wait_event(event)
                with torch.cuda.stream(self._copy_stream):
                    for view, d in zip(block.views, device):
                        view.copy_(d, non_blocking=True)
                        d.record_stream(self._copy_stream)
                for (p, key), view in zip(keys, block.views):
                    opt.state[p][key] = view
                return None
        elif held is not None:
            block, keys = held
            if _holds(entries, keys, block.views):
                return self._release_later(block, self._params[layer])
        # First step, or state replaced (a load): the layer's state moves into a new block.
        if self.pinned:
            torch.cuda.current_stream(self.device).synchronize()
        if held is not None:
            held[0].close()
        if not entries:
            blocks.pop(layer, None)
            return self._release_later(None, self._params[layer])
        block = TierBlock([v for _, _, v in entries], self.directory, pinned=self.pinned)
        keys = [(p, k) for p, k, _ in entries]
        for (p, key), view in zip(keys, block.views):
            opt.state[p][key] = view
        blocks[layer] = (block, keys)
        self._adopted = True
        return None if self.pinned else self._release_later(block, self._params[layer])

    def _release_later(self, state: TierBlock | None, params: TierBlock | None) -> Future:
        def work() -> None:
            for block in (state, params):
                if block is not None:
                    block.release()
        return self._worker.submit(work)

    # ---- inspection and teardown -------------------------------------------------------------

    def wait(self) -> None:
        """Wait until the fetches and write-backs queued so far have run."""
        self._worker.submit(lambda: None).result()

    def state_bytes(self, opt: torch.optim.Optimizer) -> int:
        """Bytes of ``opt``'s offloaded state (in the tier)."""
        return sum(block.nbytes for block, _ in self._state.get(opt, {}).values())

    def resident_state_bytes(self, opt: torch.optim.Optimizer) -> list[int]:
        """Per layer, the bytes of ``opt``'s offloaded state resident in this process now
        (CPU tier: from ``/proc/self/smaps``; 0 for a layer without state)."""
        held = self._state.get(opt, {})
        layers = sorted(held)
        found = dict(zip(layers, resident_of([held[i][0] for i in layers])))
        return [found.get(i, 0) for i in range(len(self.layers))]

    def resident_param_bytes(self) -> list[int]:
        """Per layer, the bytes of its offloaded parameters resident now (``offload="params"``)."""
        blocks = [b for b in self._params if b is not None]
        return resident_of(blocks) if len(blocks) == len(self.layers) else [0] * len(self.layers)

    def close(self) -> None:
        """Stop offloading: state and parameters are copied back into ordinary memory, the
        tier's mappings are unmapped, the hooks removed. The program keeps working without it."""
        if self._closed:
            return
        self._closed = True
        self._worker.shutdown(wait=True)
        for h in self._hooks:
            h.remove()
        for opt, blocks in list(self._state.items()):
            for block, keys in blocks.values():
                for p, key in keys:
                    value = opt.state[p][key]
                    opt.state[p][key] = value.to(self.device, copy=True)
                block.close()
        self._state = weakref.WeakKeyDictionary()
        for layer, block in zip(self.layers, self._params):
            if block is not None:
                for p in layer:
                    p.data = p.data.clone()
                block.close()
        self._params = [None] * len(self.layers)


def _holds(entries: list, keys: list, tensors: list) -> bool:
    """Whether the optimizer's state ``entries`` are exactly ``tensors`` under ``keys``."""
    return len(entries) == len(keys) == len(tensors) and all(
        p is kp and k == kk and v is t for (p, k, v), (kp, kk), t in zip(entries, keys, tensors)
    )


def _trim_heap() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``; nothing elsewhere):
    freed state would otherwise stay in this process's resident set."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _call(ref: weakref.ref, method: str, *args: Any) -> Any:
    me = ref()
    return None if me is None else getattr(me, method)(*args)


def _restore(opt: torch.optim.Optimizer) -> None:
    held = opt.__dict__.pop(_STASH, None)
    if held is not None:
        for g, params in zip(opt.param_groups, held[1]):
            g["params"] = params


def _shutdown(worker: ThreadPoolExecutor, hooks: list) -> None:
    worker.shutdown(wait=False)
    for h in hooks:
        h.remove()
