"""Tiny pipeline models, data and a one-process reference for the engine tests (gloo, CPU).

Layers are built with DeepSpeed's per-layer seeding (`seed_layers=True`), so layer i has the same
initial weights wherever it is built; the reference builds every layer once in one process, names
parameters like `PipelineModule` ("3.weight", "tied_modules.embed.weight") and runs the micro-batches
in order, each loss divided by the number of micro-batches (and data-parallel replicas).
"""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.module import LayerSpec, TiedLayerSpec
from torch import Tensor, nn

__all__ = ["BASE_SEED", "Block", "Case", "Embed", "PosBlock", "batches", "check_against_reference", "loss_fn",
           "mlp_specs", "reference", "tied_specs", "train"]

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


def batches(kind: str, num: int, *, seed: int, dtype: torch.dtype = torch.float64, batch: int = 2
            ) -> list[tuple[Tensor, Tensor]]:
    """`num` micro-batches: "mlp" (x [B, H], y [B, H]) or "tokens" (ids [B, S], next ids [B, S]).

    Token micro-batch i has sequence length 2 + i % 4, so shapes change from one micro-batch to the next.
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return [(torch.randn(batch, HIDDEN, generator=gen, dtype=dtype),
                 torch.randn(batch, HIDDEN, generator=gen, dtype=dtype)) for _ in range(num)]
    shapes = [(batch, 2 + i % (SEQ - 1)) for i in range(num)]
    return [(torch.randint(0, VOCAB, shape, generator=gen), torch.randint(0, VOCAB, shape, generator=gen))
            for shape in shapes]


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
              scale: int | None = None, steps: int = 1, lr: float = 0.0, clip: float = 0.0
              ) -> tuple[list[list[Tensor]], dict[str, Tensor], dict[str, Tensor]]:
    """Per-step per-micro-batch losses, the last step's grads and the final weights, by parameter name.

    Args:
        specs: the layer list.
        data: all micro-batches of all steps, in order (`steps` x micro-batches per step).
        dtype: parameter dtype.
        scale: divisor of each micro-batch loss (default: micro-batches per step).
        steps: optimizer steps (plain SGD with `lr`).
        lr: SGD learning rate.
        clip: max global grad norm before each update (0: no clipping).
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
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@dataclasses.dataclass(frozen=True)
class Case:
    """One engine run: schedule kinds (one engine each, in turn), layout, model, data and DeepSpeed settings."""

    kinds: tuple[str, ...]
    pipe: int
    dp: int = 1
    micro_batches: int = 8
    model: str = "mlp"  # "mlp" (Blocks) or "tied" (embedding, PosBlocks, tied head; int/bool tensors cross)
    num_layers: int = 8
    steps: int = 1
    lr: float = 0.0
    dtype: str = "fp32"  # "fp32", "bf16" or "fp16" (data and the DeepSpeed "bf16"/"fp16" section)
    clip: float = 0.0  # gradient_clipping
    extra: tuple[tuple[str, Any], ...] = ()  # top-level DeepSpeed keys
    pipeline: tuple[tuple[str, Any], ...] = ()  # extra "pipeline" keys

    def specs(self) -> list[Any]:
        return mlp_specs(self.num_layers) if self.model == "mlp" else tied_specs(self.num_layers - 2)

    def data(self, dtype: torch.dtype | None = None) -> list[tuple[Tensor, Tensor]]:
        """All micro-batches of all steps and replicas: step-major, then replica, then micro-batch."""
        dtype = dtype or {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.dtype, torch.float32)
        return batches("mlp" if self.model == "mlp" else "tokens", self.steps * self.dp * self.micro_batches,
                       seed=7, dtype=dtype)

    def config(self, kind: str) -> dict[str, Any]:
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": self.micro_batches,
               "steps_per_print": 10**6, "gradient_clipping": self.clip, "zero_allow_untested_optimizer": True,
               "optimizer": {"type": "SGD", "params": {"lr": self.lr}},
               "pipeline": {"schedule": kind, "timeout_s": 60, "partition_method": "uniform", **dict(self.pipeline)}}
        if self.dtype == "bf16":
            cfg["bf16"] = {"enabled": True}
        if self.dtype == "fp16":
            cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
        cfg.update(dict(self.extra))
        return cfg


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def train(rank: int, world_size: int, case: Case) -> dict[str, Any]:
    """Rank function: for each kind, build a stock PipelineModule, `dualmoe.initialize` it, train `case.steps`.

    Returns:
        kind -> {"losses": [{global micro-batch: loss}] per step, "mean": [train_batch result] per step,
                 "grads": {name: grad} of the last step (ZeRO-0 fp32 only), "weights": {name: final weight},
                 "headers": p2p headers sent + received after each step, "links": (warmed, used) p2p
                 connections, "freed": whether the engine was garbage once destroyed and dropped}.
    """
    import deepspeed
    import dualmoe
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="gloo")
    out: dict[str, Any] = {}
    for kind in case.kinds:
        model = PipelineModule(case.specs(), num_stages=case.pipe, loss_fn=loss_fn, seed_layers=True,
                               base_seed=BASE_SEED, partition_method="uniform")
        engine, _, _, _ = dualmoe.initialize(model=model, model_parameters=model.parameters(),
                                             config=case.config(kind))
        grads: dict[str, np.ndarray] = {}
        step_fn = engine.optimizer.step

        def capture(*args: Any, _engine: Any = engine, _step: Any = step_fn, _grads: dict = grads,
                    **kwargs: Any) -> Any:
            _grads.clear()
            _grads.update({n: _numpy(p.grad) for n, p in _engine.module.named_parameters() if p.grad is not None})
            return _step(*args, **kwargs)

        engine.optimizer.step = capture
        dp_rank = engine.grid.get_data_parallel_rank()
        data, per_step = case.data(), case.dp * case.micro_batches
        losses, means, headers = [], [], []
        for step in range(case.steps):
            first = step * per_step + dp_rank * case.micro_batches
            means.append(float(engine.train_batch(iter(data[first:first + case.micro_batches]))))
            losses.append({dp_rank * case.micro_batches + mb: _numpy(v)
                           for mb, v in engine.micro_batch_losses.items()})
            headers.append(engine._comm.headers_sent + engine._comm.headers_received)
        out[kind] = {"losses": losses, "mean": means, "grads": grads, "headers": headers,
                     "skipped": engine.skipped_steps,
                     "links": (sorted(engine._comm.links_warmed), sorted(engine._comm.links_used)),
                     "weights": {n: _numpy(p) for n, p in engine.module.named_parameters()}}
        alive = weakref.ref(engine)
        engine.destroy()  # DeepSpeed's ZeRO optimizers unhook the parameters here
        del engine, model, step_fn, capture
        gc.collect()
        out[kind]["freed"] = alive() is None
    return out


def cos_diff(a: Tensor, b: Tensor) -> float:
    """DualPipe's `cal_diff`: 1 - 2<a,b> / (|a|^2 + |b|^2), in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    denom = (a * a + b * b).sum()
    return 0.0 if denom == 0 else float(1 - 2 * (a * b).sum() / denom)


def _check_comm(case: Case, kind: str, results: list[dict[str, Any]]) -> None:
    """Every rank warmed exactly the p2p connections it used; static shapes send headers in step 0 only; the
    engine was freed once destroyed and dropped."""
    static = dict(case.pipeline).get("static_shapes", "auto") is not False
    for rank, r in enumerate(results):
        warmed, used = r[kind]["links"]
        assert warmed == used and (used or case.pipe == 1), (kind, rank, warmed, used)
        headers = r[kind]["headers"]
        assert all(h == headers[0] for h in headers) if static else headers == sorted(set(headers)), \
            (kind, rank, headers)
        assert r[kind]["freed"], (kind, rank)


def check_against_reference(case: Case, results: list[dict[str, Any]], *, grads: bool = True,
                            weights: bool = False, tol: float = 1e-12) -> None:
    """Assert every kind's per-micro-batch losses equal the reference's, and grads (or weights) match.

    Grads must be bitwise equal or within cos-diff `tol`; every parameter must be present on some rank.
    """
    ref_losses, ref_grads, ref_weights = reference(case.specs(), case.data(torch.float32), dtype=torch.float32,
                                                   scale=case.dp * case.micro_batches, steps=case.steps, lr=case.lr,
                                                   clip=case.clip)
    for kind in case.kinds:
        for step in range(case.steps):
            seen: dict[int, np.ndarray] = {}
            for r in results:
                seen.update(r[kind]["losses"][step])
            assert sorted(seen) == list(range(case.dp * case.micro_batches)), (kind, sorted(seen))
            for mb, value in seen.items():
                got = torch.from_numpy(value)
                # Step 0 runs the reference's ops on the reference's weights: bitwise. Later steps start
                # from weights updated with grads summed in another order.
                assert torch.equal(got, ref_losses[step][mb]) if step == 0 else \
                    torch.allclose(got, ref_losses[step][mb], rtol=1e-5, atol=0), (kind, step, mb)
            mean = float(torch.stack(ref_losses[step]).mean())
            assert all(abs(r[kind]["mean"][step] - mean) <= 1e-6 * max(1.0, abs(mean)) for r in results), kind
        _check_comm(case, kind, results)
        for what, ref in (("grads", ref_grads if grads else None), ("weights", ref_weights if weights else None)):
            if ref is None:
                continue
            covered = set()
            for r in results:
                for name, value in r[kind][what].items():
                    got = torch.from_numpy(value)
                    assert torch.equal(got, ref[name]) or cos_diff(got, ref[name]) < tol, \
                        (kind, what, name, cos_diff(got, ref[name]))
                    covered.add(name)
            assert covered == set(ref), (kind, what, sorted(set(ref) - covered))
