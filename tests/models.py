"""Small deterministic models shared by whale's tests (no dropout, no randomness in forward).

Every model here runs eagerly on CPU in milliseconds and traces with both torch.fx and
torch.export, except :class:`RoutedLM`, whose experts neither can trace. The annotated variants show the three places a user can annotate:
around construction in ``__init__`` (:class:`AnnotatedGPT`), around code in ``forward``
(:class:`ScopedMLP`), and from outside by name (``wh.annotate``, used directly in tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import whale as wh

__all__ = [
    "AnnotatedGPT",
    "BasicBlock",
    "Block",
    "CausalSelfAttention",
    "MHAModel",
    "MLP",
    "ResNetLike",
    "ReversibleLM",
    "RoutedExperts",
    "RoutedLM",
    "ScopedMLP",
    "SmallCNN",
    "TinyGPT",
]


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention written out: one qkv Linear, a causal mask buffer, one proj Linear."""

    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.n_embd = n_embd
        self.head_dim = n_embd // n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        mask = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (self.head_dim**-0.5)
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A GPT-2 shaped decoder: ``forward(idx (B, T) long) -> logits (B, T, vocab)``.

    Module names follow nanoGPT (``wte``, ``wpe``, ``h.<i>.attn.qkv``, ``ln_f``, ``lm_head``);
    the lm head is untied so every parameter has one owner.
    """

    def __init__(
        self, vocab: int = 64, block_size: int = 16, n_layer: int = 2, n_head: int = 2, n_embd: int = 32
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = self._blocks(n_layer, n_embd, n_head, block_size)
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = self._head(n_embd, vocab)

    def _blocks(self, n_layer: int, n_embd: int, n_head: int, block_size: int) -> nn.ModuleList:
        return nn.ModuleList(Block(n_embd, n_head, block_size) for _ in range(n_layer))

    def _head(self, n_embd: int, vocab: int) -> nn.Linear:
        return nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class AnnotatedGPT(TinyGPT):
    """TinyGPT annotated in ``__init__``: blocks built under ``replicate``, the head under ``split``.

    A scope tags the modules *registered* inside it, so the assignments sit inside the
    ``with``. The two annotation objects are kept as ``blocks_scope`` and ``head_scope`` so
    tests can check identity.
    """

    def __init__(
        self, vocab: int = 64, block_size: int = 16, n_layer: int = 2, n_head: int = 2, n_embd: int = 32
    ) -> None:
        nn.Module.__init__(self)
        self.block_size = block_size
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        with wh.replicate() as blocks_scope:
            self.h = self._blocks(n_layer, n_embd, n_head, block_size)
        self.ln_f = nn.LayerNorm(n_embd)
        with wh.split(2) as head_scope:
            self.lm_head = self._head(n_embd, vocab)
        self.blocks_scope = blocks_scope
        self.head_scope = head_scope


class ScopedMLP(nn.Module):
    """Annotated inside ``forward``: the middle of the network runs under ``split(2)``.

    ``self.inner_scope`` is created once and entered on every call, so all its nodes share
    one annotation object. ``forward(x (B, 16)) -> (B, 4)``.
    """

    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d_hidden)
        self.fc1 = nn.Linear(d_hidden, 4 * d_hidden)
        self.fc2 = nn.Linear(4 * d_hidden, d_hidden)
        self.out = nn.Linear(d_hidden, d_out)
        self.inner_scope = wh.split(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        with self.inner_scope:
            h = self.fc2(torch.relu(self.fc1(h)))
        return self.out(h)


class SmallCNN(nn.Module):
    """Conv-GroupNorm-ReLU twice, pooling, a Linear head: ``(B, 3, 16, 16) -> (B, classes)``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MHAModel(nn.Module):
    """Linear embed, ``nn.MultiheadAttention`` (batch first), LayerNorm, Linear head.

    ``forward(x (B, T, d_in)) -> (B, T, d_out)``.
    """

    def __init__(self, d_in: int = 8, d_model: int = 32, n_head: int = 4, d_out: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convs, a 1x1 downsample branch when needed."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetLike(nn.Module):
    """A two-stage torchvision-style ResNet: ``(B, 3, 16, 16) -> (B, classes)``.

    ``layer2.0`` has the strided downsample branch.
    """

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class RoutedExperts(nn.Module):
    """Top-1 routed experts in an ``nn.ModuleList``, each called only on the rows routed to it:
    a Python loop over the experts that got rows, as the eager code of DBRX, JetMoE and Switch
    Transformers runs it. Neither torch.fx nor torch.export can trace it."""

    def __init__(self, width: int, experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weight, choice = self.router(flat).softmax(-1).max(-1)
        out = torch.zeros_like(flat)
        for e in choice.unique().tolist():
            rows = (choice == e).nonzero().squeeze(-1)
            out = out.index_add(0, rows, self.experts[e](flat[rows]) * weight[rows, None])
        return out.reshape(x.shape)


class RoutedBlock(nn.Module):
    def __init__(self, width: int, experts: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.moe = RoutedExperts(width, experts)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.moe(torch.relu(self.fc(h)))


class RoutedLM(nn.Module):
    """Token embedding, ``blocks`` residual blocks (a linear layer, then :class:`RoutedExperts`)
    in an ``nn.ModuleList``, a head: logits ``(rows, tokens, vocab)``."""

    def __init__(self, vocab: int = 32, width: int = 16, blocks: int = 3, experts: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(RoutedBlock(width, experts) for _ in range(blocks))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class _Reversible(torch.autograd.Function):
    """Reversible residual layers as Reformer runs them: forward under ``no_grad`` keeping only
    the output; backward rebuilds each layer's input from its output and runs the layer's
    children again (never the layer itself) to get the gradients."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, layers: nn.ModuleList) -> torch.Tensor:
        for layer in layers:
            h = layer(h)
        ctx.layers = layers
        ctx.save_for_backward(h)
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        for layer in reversed(ctx.layers):
            with torch.no_grad():
                h = layer.inverse(h)
            with torch.enable_grad():
                x = h.detach().requires_grad_()
                torch.autograd.backward(x + layer.mix(layer.norm(x)), grad)
            grad = x.grad
        return grad, None


class ReversibleLayer(nn.Module):
    """``x + mix(norm(x))`` with ``mix`` scaled so that it can be inverted by fixed-point steps."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)
        nn.init.normal_(self.mix.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # gradients come from _Reversible.backward
            return x + self.mix(self.norm(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        x = y
        for _ in range(60):  # a contraction: mix is small
            x = y - self.mix(self.norm(x))
        return x


class ReversibleStack(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ReversibleLayer(width) for _ in range(layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _Reversible.apply(h, self.layers)


class ReversibleLM(nn.Module):
    """Token embedding, a :class:`ReversibleStack` (a custom autograd.Function whose backward
    runs the layers' children again: a traced graph would give them no gradient), a plain
    block, a head."""

    def __init__(self, vocab: int = 32, width: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.stack = ReversibleStack(width, layers)
        self.block = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stack(self.embed(ids))))
