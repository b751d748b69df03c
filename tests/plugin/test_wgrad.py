"""Weight-grad split: full B outside a capture, I then W inside one, both equal to plain autograd."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from dualmoe.errors import ScheduleError
from dualmoe.wgrad import (
    WeightGradQueue,
    accumulate_grad,
    defer_or_run,
    install,
    split_linear,
    uninstall,
)
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

torch.set_num_threads(1)

HIDDEN = 8


class Block(nn.Module):
    """Transformer-ish: LN -> Linear(bias) -> GELU -> Linear(no bias) + residual -> LN -> frozen Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN, bias=False)
        self.norm2 = nn.LayerNorm(HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.proj.weight.requires_grad_(False)  # frozen weight, trainable bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down(F.gelu(self.up(self.norm1(x))))
        return x + self.proj(self.norm2(x))


def make_mlp() -> nn.Module:
    frozen = nn.Linear(2 * HIDDEN, 2 * HIDDEN)
    frozen.requires_grad_(False)
    return nn.Sequential(
        nn.Linear(HIDDEN, 2 * HIDDEN),  # first layer: its input does not require grad
        nn.GELU(),
        frozen,
        nn.Linear(2 * HIDDEN, HIDDEN, bias=False),
        nn.GELU(),
        nn.Linear(HIDDEN, 4),
    )


def make_block() -> nn.Module:
    return nn.Sequential(nn.Linear(HIDDEN, HIDDEN), Block(), Block())


MODELS = {"mlp": make_mlp, "block": make_block}
DTYPES = [torch.float32, torch.float64]


def build(name: str, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, nn.Module, WeightGradQueue]:
    torch.manual_seed(seed)
    ref = MODELS[name]().to(dtype)
    model = copy.deepcopy(ref)
    queue = WeightGradQueue()
    assert install(model, queue) > 0
    return ref, model, queue


def batch(name: str, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, HIDDEN, generator=gen, dtype=dtype)
    out = 4 if name == "mlp" else HIDDEN
    return x, torch.randn(2, 3, out, generator=gen, dtype=dtype)


def loss_of(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), target)


def assert_grads_equal(ref: nn.Module, model: nn.Module) -> None:
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        if p_ref.grad is None:
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
            assert torch.equal(p_ref.grad, p.grad), name


def linear_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_wgrad_outside_capture_is_plain_autograd_bitwise(name: str, dtype: torch.dtype) -> None:
    ref, model, queue = build(name, dtype)
    x, target = batch(name, dtype, 1)
    loss_of(ref, x, target).backward()
    loss_of(model, x, target).backward()
    assert_grads_equal(ref, model)
    assert len(queue) == 0 and queue.held_bytes() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_wgrad_capture_defers_linear_grads_until_run(name: str, dtype: torch.dtype) -> None:
    ref, model, queue = build(name, dtype)
    x, target = batch(name, dtype, 1)
    x_grad = x.clone().requires_grad_(True)  # the input grad (I) must be ready right after backward
    ref_x = x_grad.detach().clone().requires_grad_(True)
    loss_of(ref, ref_x, target).backward()
    with queue.capture((0, 0)):
        loss_of(model, x_grad, target).backward()
    assert torch.equal(x_grad.grad, ref_x.grad)
    lin = linear_params(model)
    for n, p in model.named_parameters():
        if id(p) in lin:
            assert p.grad is None, n
        elif p.requires_grad:
            assert p.grad is not None, n  # LayerNorm grads come with I
    assert queue.pending_keys() == [(0, 0)]
    queue.run((0, 0))
    assert_grads_equal(ref, model)
    assert len(queue) == 0 and queue.held_bytes() == 0


@pytest.mark.parametrize("name", list(MODELS))
def test_wgrad_two_microbatches_run_in_other_order_accumulate(name: str) -> None:
    dtype = torch.float64
    ref, model, queue = build(name, dtype)
    batches = [batch(name, dtype, seed) for seed in (1, 2)]
    for x, target in batches:
        loss_of(ref, x, target).backward()
    for mb, (x, target) in enumerate(batches):
        with queue.capture(mb):
            loss_of(model, x, target).backward()
    assert queue.pending_keys() == [0, 1]
    queue.run(1)
    queue.run(0)
    assert_grads_equal(ref, model)  # two addends: a + b == b + a bitwise


def test_wgrad_mixes_captured_and_full_backward() -> None:
    dtype = torch.float64
    ref, model, queue = build("block", dtype)
    batches = [batch("block", dtype, seed) for seed in (1, 2)]
    for x, target in batches:
        loss_of(ref, x, target).backward()
    with queue.capture("mb0"):
        loss_of(model, *batches[0]).backward()
    loss_of(model, *batches[1]).backward()  # full B: dW of mb1 lands first
    queue.run("mb0")
    assert_grads_equal(ref, model)


def test_wgrad_run_unknown_or_finished_key_raises() -> None:
    _, model, queue = build("mlp", torch.float64)
    x, target = batch("mlp", torch.float64, 1)
    with queue.capture((1, 3)):
        loss_of(model, x, target).backward()
    with pytest.raises(ScheduleError, match=r"W for key \(0, 3\): no backward was captured.*pending keys: \(1, 3\)"):
        queue.run((0, 3))
    queue.run((1, 3))
    with pytest.raises(ScheduleError, match=r"W for key \(1, 3\).*already ran.*pending keys: none"):
        queue.run((1, 3))


def test_wgrad_capture_does_not_nest() -> None:
    queue = WeightGradQueue()
    with queue.capture(0), pytest.raises(RuntimeError, match=r"capture\(1\) while capture\(0\) is open"):
        with queue.capture(1):
            pass
    assert not queue.capturing


def test_wgrad_empty_capture_runs_as_noop() -> None:
    queue = WeightGradQueue()
    with queue.capture("no-linear"):
        pass
    assert queue.pending_keys() == ["no-linear"]
    queue.run("no-linear")
    assert len(queue) == 0


def test_wgrad_clear_frees_held_work() -> None:
    _, model, queue = build("mlp", torch.float64)
    x, target = batch("mlp", torch.float64, 1)
    with queue.capture(0):
        loss_of(model, x, target).backward()
    assert queue.held_bytes() > 0
    peak = queue.peak_held_bytes()
    queue.clear()
    assert len(queue) == 0 and queue.held_bytes() == 0 and queue.peak_held_bytes() == peak
    assert all(p.grad is None for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())


def test_wgrad_held_bytes_is_inputs_plus_output_grads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(HIDDEN, 16), nn.GELU(), nn.Linear(16, 16, bias=False), nn.Tanh(), nn.Linear(16, 4))
    queue = WeightGradQueue()
    install(model, queue)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output grad) per Linear

    def record(layer: nn.Module, args: tuple[torch.Tensor], out: torch.Tensor) -> None:
        out.register_hook(lambda g: seen.append((args[0], g)))

    for layer in model:
        if isinstance(layer, nn.Linear):
            layer.register_forward_hook(record)
    x = torch.randn(3, 5, HIDDEN)
    with queue.capture(0):
        model(x).square().sum().backward()
    assert len(seen) == 3
    expected = sum(t.numel() * t.element_size() for pair in seen for t in pair)
    assert queue.held_bytes() == expected == 4 * (3 * 5) * (HIDDEN + 16 + 16 + 16 + 16 + 4)
    # Exactly one reference, no copies: the held inputs are the tensors the layers consumed.
    held_ptrs = {t.untyped_storage().data_ptr() for w in queue._work[0] for t in w.held}
    assert {t.untyped_storage().data_ptr() for t, _ in seen} <= held_ptrs


def test_wgrad_after_input_backward_only_linear_inputs_stay_alive() -> None:
    # torch's stage_backward_input keeps the whole graph until W; the split keeps x and dy only.
    torch.manual_seed(0)
    model = make_block()
    queue = WeightGradQueue()
    install(model, queue)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, StorageWeakRef]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved[storage.data_ptr()] = (storage.nbytes(), StorageWeakRef(storage))
        return t

    x = torch.randn(4, 6, HIDDEN)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    activation_bytes = sum(nbytes for nbytes, _ in saved.values())
    dy = torch.randn_like(y)
    with queue.capture(0):
        y.backward(dy)
    del y, dy
    alive = {ptr for ptr, (_, ref) in saved.items() if not ref.expired()}
    held_x = {w.x.untyped_storage().data_ptr() for w in queue._work[0] if w.x is not None}
    assert alive == held_x  # no other saved activation survives I
    held_dy = sum(w.g.untyped_storage().nbytes() for w in queue._work[0])
    assert queue.held_bytes() == sum(saved[p][0] for p in alive) + held_dy
    assert queue.held_bytes() < activation_bytes + held_dy


def test_wgrad_frozen_weight_with_bias_holds_bias_grad_only() -> None:
    layer = nn.Linear(HIDDEN, 4)
    layer.weight.requires_grad_(False)
    queue = WeightGradQueue()
    install(layer, queue)
    x = torch.randn(5, HIDDEN, requires_grad=True)
    dy = torch.randn(5, 4)
    with queue.capture(0):
        layer(x).backward(dy)
    assert queue.held_bytes() == 4 * 4  # db = dy.sum(0) is reduced at I: neither x nor dy is kept
    queue.run(0)
    assert layer.weight.grad is None and torch.equal(layer.bias.grad, dy.sum(0))


def test_wgrad_fully_frozen_layer_builds_no_work() -> None:
    layer = nn.Linear(HIDDEN, 4).requires_grad_(False)
    queue = WeightGradQueue()
    install(layer, queue)
    x = torch.randn(5, HIDDEN, requires_grad=True)
    with queue.capture(0):
        layer(x).sum().backward()
    assert queue.held_bytes() == 0 and queue._work[0] == []
    assert torch.equal(x.grad, layer.weight.sum(0).expand(5, HIDDEN))


def test_wgrad_tied_weight_sums_before_accumulating() -> None:
    torch.manual_seed(0)
    ref = nn.Linear(HIDDEN, HIDDEN, dtype=torch.float64)
    model = copy.deepcopy(ref)
    queue = WeightGradQueue()
    install(model, queue)
    for layer in (ref, model):
        layer.weight.grad = torch.randn_like(layer.weight, generator=torch.Generator().manual_seed(3))
        layer.bias.grad = None
    x = torch.randn(3, HIDDEN, dtype=torch.float64)
    ref(torch.tanh(ref(ref(x)))).sum().backward()
    with queue.capture(0):
        model(torch.tanh(model(model(x)))).sum().backward()
    queue.run(0)
    assert torch.equal(ref.weight.grad, model.weight.grad)
    assert torch.equal(ref.bias.grad, model.bias.grad)


def test_wgrad_retain_graph_backward_defers_without_copies() -> None:
    # DeepSpeed backs a multi-output stage through several backward calls with retain_graph=True.
    torch.manual_seed(0)
    ref = nn.Linear(HIDDEN, HIDDEN, dtype=torch.float64)
    model = copy.deepcopy(ref)
    queue = WeightGradQueue()
    install(model, queue)
    for layer in (ref, model):  # a grad from earlier micro-batches: accumulation order shows
        layer.weight.grad = torch.randn_like(layer.weight, generator=torch.Generator().manual_seed(3))
    x = torch.randn(3, HIDDEN, dtype=torch.float64)
    g1, g2 = torch.randn(3, HIDDEN, dtype=torch.float64), torch.randn(3, HIDDEN, dtype=torch.float64)
    y = ref(x)
    y.backward(g1, retain_graph=True)
    y.backward(g2)
    y = model(x)
    with queue.capture(0):
        y.backward(g1, retain_graph=True)
        y.backward(g2)
    assert queue.held_bytes() == 3 * 8 * 3 * HIDDEN  # x once, g1, g2
    queue.run(0)
    assert torch.equal(ref.weight.grad, model.weight.grad)
    assert torch.equal(ref.bias.grad, model.bias.grad)


def test_wgrad_in_place_change_of_held_tensor_raises() -> None:
    layer = nn.Linear(HIDDEN, 4)
    queue = WeightGradQueue()
    install(layer, queue)
    x = torch.randn(5, HIDDEN)
    with queue.capture(0):
        layer(x).sum().backward()
    x.add_(1.0)  # e.g. an engine reusing a receive buffer before W
    with pytest.raises(RuntimeError, match="modified in place after its backward"):
        queue.run(0)
    assert queue.held_bytes() == 0


def test_wgrad_on_accumulate_sees_every_deferred_param() -> None:
    model = make_mlp()
    seen: list[int] = []
    queue = WeightGradQueue(on_accumulate=lambda p: seen.append(id(p)))
    install(model, queue)
    with queue.capture(0):
        loss_of(model, *batch("mlp", torch.float32, 1)).backward()
    queue.run(0)
    trainable = [id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable)


class _ScaleFn(torch.autograd.Function):
    """y = x * w with dw deferred through `defer_or_run` (the protocol MoE experts use)."""

    @staticmethod
    def forward(ctx, x, w, queue):
        ctx.save_for_backward(x, w)
        ctx.queue = queue
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        defer_or_run(ctx.queue, lambda: accumulate_grad(w, (g * x).sum(0)), held=(x, g))
        return g * w, None, None


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, HIDDEN, dtype=torch.float64))
        self.queue: WeightGradQueue | None = None

    def set_weight_grad_queue(self, queue: WeightGradQueue | None) -> None:
        self.queue = queue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaleFn.apply(x, self.w, self.queue)


def test_wgrad_custom_module_protocol_defers_through_queue() -> None:
    model = nn.Sequential(nn.Linear(HIDDEN, HIDDEN, dtype=torch.float64), _Scale())
    queue = WeightGradQueue()
    assert install(model, queue) == 2 and model[1].queue is queue
    x = torch.randn(3, HIDDEN, dtype=torch.float64)
    with queue.capture(0):
        model(x).sum().backward()
    assert model[1].w.grad is None and queue.held_bytes() > 0
    queue.run(0)
    expected = model[0](x).detach().sum(0)
    assert torch.equal(model[1].w.grad, expected)
    assert uninstall(model) == 2 and model[1].queue is None
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()  # queue None: W runs inline
    assert torch.equal(model[1].w.grad, expected)


@pytest.mark.parametrize("name", list(MODELS))
def test_wgrad_install_uninstall_keep_state_dict_and_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    before = copy.deepcopy(model.state_dict())
    x, _ = batch(name, torch.float32, 1)
    plain = model(x)
    queue = WeightGradQueue()
    count = install(model, queue)
    assert count == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert install(model, queue) == count  # idempotent
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert torch.equal(model(x), plain)
    assert uninstall(model) == count
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert uninstall(model) == 0
    assert torch.equal(model(x), plain)


def test_wgrad_deepcopy_shares_queue_and_pickle_gets_fresh_one() -> None:
    model = make_mlp()
    queue = WeightGradQueue()
    install(model, queue)
    twin = copy.deepcopy(model)
    assert twin[0].forward.queue is queue and twin[0].forward.linear is twin[0]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded[0].forward.linear is loaded[0] and loaded[0].forward.queue is not queue
    assert len(pickle.loads(pickle.dumps(queue))) == 0
    x, _ = batch("mlp", torch.float32, 1)
    assert torch.equal(loaded(x), model(x))


def test_wgrad_split_linear_shapes_and_no_grad() -> None:
    queue = WeightGradQueue()
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for shape in [(5,), (4, 5), (2, 4, 5), (2, 1, 4, 5)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        y = split_linear(x, w, b, queue)
        assert torch.equal(y, F.linear(x, w, b))
        g = torch.randn_like(y)
        ref = torch.autograd.grad(F.linear(x, w, b), (x, w, b), g)
        with queue.capture(shape):
            got_x = torch.autograd.grad(y, x, g)[0]
        w.grad = b.grad = None
        queue.run(shape)
        torch.testing.assert_close(got_x, ref[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(w.grad, ref[1], rtol=0, atol=1e-12)
        torch.testing.assert_close(b.grad, ref[2], rtol=0, atol=1e-12)
    with torch.no_grad():
        assert split_linear(x, w, b, queue).grad_fn is None


def test_wgrad_autocast_bf16_matches_plain_autocast_bitwise() -> None:
    torch.manual_seed(0)
    ref = make_block()
    model = copy.deepcopy(ref)
    queue = WeightGradQueue()
    install(model, queue)
    x, target = batch("block", torch.float32, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref = loss_of(ref, x, target)
        with queue.capture(0):
            loss = loss_of(model, x, target)
    assert torch.equal(loss, loss_ref)
    loss_ref.backward()
    with queue.capture(0):
        loss.backward()
    # Held activations are the bf16 casts autocast saves, not fp32 copies (a frozen-weight layer
    # holds only its reduced bias grad, in the parameter's dtype).
    works = queue._work[0]
    assert all(t.dtype == torch.bfloat16 for w in works if not w.g_is_bias_grad for t in w.held)
    assert [w.g.dtype for w in works if w.g_is_bias_grad] == [torch.float32] * 2
    queue.run(0)
    for p in model.parameters():
        assert p.grad is None or p.grad.dtype == torch.float32
    assert_grads_equal(ref, model)


def test_wgrad_bf16_params_match_fp32_within_bf16_tolerance() -> None:
    torch.manual_seed(0)
    ref = make_block().to(torch.float64)
    model = copy.deepcopy(ref).to(torch.bfloat16)
    queue = WeightGradQueue()
    install(model, queue)
    x, target = batch("block", torch.float64, 1)
    loss_of(ref, x, target).backward()
    with queue.capture(0):
        loss_of(model, x.to(torch.bfloat16), target.to(torch.bfloat16)).backward()
    queue.run(0)
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        if p_ref.grad is None:
            continue
        assert p.grad.dtype == torch.bfloat16, name
        scale = p_ref.grad.abs().max().item()
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=0, atol=0.05 * scale, msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_wgrad_under_activation_checkpointing(use_reentrant: bool) -> None:
    ref, model, queue = build("block", torch.float64)
    x, target = batch("block", torch.float64, 1)
    x = x.requires_grad_(use_reentrant)  # reentrant checkpointing needs an input that requires grad

    def checkpointed(m: nn.Module) -> torch.Tensor:
        h = m[0](x)
        for block in m[1:]:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=use_reentrant)
        return F.mse_loss(h, target)

    checkpointed(ref).backward()
    with queue.capture(0):
        checkpointed(model).backward()
    assert all(p.grad is None for p in model.parameters() if id(p) in linear_params(model))
    queue.run(0)
    assert_grads_equal(ref, model)


def test_wgrad_compiled_module_keeps_split_after_tracing_outside_capture() -> None:
    ref, model, queue = build("mlp", torch.float64)
    compiled = torch.compile(model, backend="aot_eager")
    x, target = batch("mlp", torch.float64, 1)
    loss_of(compiled, x, target).backward()  # traced while not capturing
    model.zero_grad(set_to_none=True)
    with queue.capture(0):
        loss_of(compiled, x, target).backward()
    assert all(p.grad is None for p in model.parameters())  # every MLP param is a Linear's
    queue.run(0)
    loss_of(ref, x, target).backward()
    assert_grads_equal(ref, model)
