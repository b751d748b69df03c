"""Tiny pipeline models, data and a one-process reference for the engine tests (gloo, CPU).

Layers are built with DeepSpeed's per-layer seeding (`seed_layers=True`), so layer i has the same
initial weights wherever it is built; the reference builds every layer once in one process, names
parameters like `PipelineModule` ("3.weight", "tied_modules.embed.weight") and runs the micro-batches
in order, each loss divided by the number of micro-batches (and data-parallel replicas).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.module import LayerSpec, TiedLayerSpec
from torch import Tensor, nn

__all__ = ["BASE_SEED", "Block", "Embed", "Head", "PosBlock", "batches", "loss_fn", "mlp_specs", "reference",
           "tied_specs"]

BASE_SEED = 1234
HIDDEN = 8
VOCAB = 11
SEQ = 5


class Block(nn.Module):
    """x -> x + tanh(Linear(x)) @ W2: two Linears, a residual, float in and out."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Embed(nn.Module):
    """(token ids [B, S] int64) -> (hidden [B, S, H], position ids [B, S] int64, mask [B, S] bool)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VOCAB, HIDDEN))

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pos = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
        return self.weight[ids], pos, ids % 3 != 0


class PosBlock(nn.Module):
    """A block that uses the int position ids and the bool mask it receives, and passes them on."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.pos = nn.Parameter(torch.randn(SEQ, HIDDEN) * 0.1)

    def forward(self, inputs: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, pos, mask = inputs
        x = self.block(x + self.pos[pos]) * mask.unsqueeze(-1).to(x.dtype) + x * (~mask).unsqueeze(-1).to(x.dtype)
        return x, pos, mask


def head_fn(embed: Embed, inputs: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Tied output head: logits = hidden @ embedding.T."""
    return inputs[0] @ embed.weight.t()


class Head(nn.Module):
    """Unused marker so 'type:' partitioning has a name to count."""


def mlp_specs(num_layers: int) -> list[Any]:
    """`num_layers` Blocks."""
    return [LayerSpec(Block) for _ in range(num_layers)]


def tied_specs(num_blocks: int) -> list[Any]:
    """Embedding, PosBlocks, tied head: int and bool tensors cross every stage boundary."""
    return [TiedLayerSpec("embed", Embed), *[LayerSpec(PosBlock) for _ in range(num_blocks)],
            TiedLayerSpec("embed", Embed, forward_fn=head_fn)]


def loss_fn(outputs: Tensor, labels: Tensor) -> Tensor:
    """Mean squared error for float labels, cross entropy for int labels."""
    if labels.dtype == torch.int64:
        return nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).float(), labels.reshape(-1))
    return ((outputs.float() - labels.float()) ** 2).mean()


def batches(kind: str, num: int, *, seed: int, dtype: torch.dtype = torch.float64, batch: int = 2,
            seq: int = SEQ) -> list[tuple[Tensor, Tensor]]:
    """`num` micro-batches: "mlp" (x [B, H], y [B, H]) or "tokens" (ids [B, S], next ids [B, S])."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return [(torch.randn(batch, HIDDEN, generator=gen, dtype=dtype),
                 torch.randn(batch, HIDDEN, generator=gen, dtype=dtype)) for _ in range(num)]
    return [(torch.randint(0, VOCAB, (batch, seq), generator=gen), torch.randint(0, VOCAB, (batch, seq), generator=gen))
            for _ in range(num)]


class _Reference(nn.Module):
    def __init__(self, specs: Sequence[Any], dtype: torch.dtype) -> None:
        super().__init__()
        self.tied_modules = nn.ModuleDict()
        self.funcs = []
        for index, spec in enumerate(specs):
            ds_utils.set_random_seed(BASE_SEED + index)
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                module = self.tied_modules[spec.key]
                self.funcs.append(module if spec.forward_fn is None else
                                  (lambda x, f=spec.forward_fn, m=module: f(m, x)))
            else:
                module = spec.build()
                self.add_module(str(index), module)
                self.funcs.append(module)
        self.to(dtype)

    def forward(self, x: Any) -> Any:
        for fn in self.funcs:
            x = fn(x)
        return x


def reference(specs: Sequence[Any], data: Sequence[tuple[Tensor, Tensor]], *, dtype: torch.dtype = torch.float64,
              scale: int | None = None, steps: int = 1, lr: float = 0.0
              ) -> tuple[list[list[Tensor]], dict[str, Tensor], dict[str, Tensor]]:
    """Per-step per-micro-batch losses, the last step's grads and the final weights, by parameter name.

    Args:
        specs: the layer list.
        data: all micro-batches of all steps, in order (`steps` x micro-batches per step).
        dtype: parameter dtype.
        scale: divisor of each micro-batch loss (default: micro-batches per step).
        steps: optimizer steps (plain SGD with `lr`).
        lr: SGD learning rate.
    """
    model = _Reference(specs, dtype)
    per_step = len(data) // steps
    losses: list[list[Tensor]] = []
    grads: dict[str, Tensor] = {}
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        step_losses = []
        for x, y in data[step * per_step:(step + 1) * per_step]:
            loss = loss_fn(model(x), y)
            (loss / (scale or per_step)).backward()
            step_losses.append(loss.detach())
        losses.append(step_losses)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}
