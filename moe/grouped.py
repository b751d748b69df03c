"""Grouped expert GEMMs: `torch._grouped_mm` on CUDA when it can take the operands, a per-group loop otherwise.

Legend: M rows (grouped: `counts[g]` consecutive rows per group g), G groups, N output and K input width.

    grouped_mm     y[M, N]    = x_g @ w[g].T        (forward)
    grouped_mm_dx  dx[M, K]   = dy_g @ w[g]         (input grad)
    grouped_wgrad  dw[G, N, K] = dy_g.T @ x_g       (weight grad, a fresh tensor in the input dtype)

Fast path: `F.grouped_mm` (`torch._grouped_mm` on older torch) for bf16 on CUDA SM80+ when the operands
meet its layout rules (`grouped_mm_layout_problem`, the rules of torch's own checks: bf16, row- or
column-major with 16-byte aligned leading strides, 16-byte aligned data, int32 offsets). Its output is
the input dtype (fp32 accumulation inside the kernel, one rounding); torch 2.11 rejects any other
`out_dtype`, so none is passed and a wider accumulator adds the result. A layout it cannot take on CUDA
runs the loop with one warning and a count in `fallback_counts()`; an error from the kernel itself is
raised, never swallowed into a slow path. CPU (and fp32/fp64 anywhere) runs the loop of `torch.mm`: the
reference math, unchanged.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from dualmoe.log import warn_once
from torch import Tensor

__all__ = [
    "fallback_counts",
    "grouped_mm",
    "grouped_mm_dx",
    "grouped_mm_layout_problem",
    "grouped_wgrad",
    "grouped_wgrad_",
]

logger = logging.getLogger(__name__)
# torch >= 2.10 has the public F.grouped_mm (bf16, CUDA SM80+); older builds only the private op.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_FALLBACKS: collections.Counter[str] = collections.Counter()


def grouped_mm_layout_problem(mat_a: Tensor, mat_b: Tensor) -> str | None:
    """Why `torch._grouped_mm(mat_a, mat_b, offs=...)` would reject these operands, or None if it takes them.

    The rules of its checks (torch `_meta_grouped_mm_common`, the same as the CUDA op's): bf16 operands,
    2-D or 3-D, each either row-major or column-major in its last two dims with the leading stride a
    multiple of 16 bytes; plus 16-byte aligned data on the device (the kernels load 16-byte vectors).
    The output dtype is left to the op (the input dtype): torch 2.11 rejects any other.
    """
    if mat_a.dtype != torch.bfloat16 or mat_b.dtype != torch.bfloat16:
        return f"operands are {mat_a.dtype}/{mat_b.dtype}; the grouped GEMM kernels take bfloat16"
    for name, mat in (("mat_a", mat_a), ("mat_b", mat_b)):
        if mat.dim() not in (2, 3):
            return f"{name} is {mat.dim()}-D; grouped GEMM takes 2-D or 3-D operands"
        rows, cols = mat.shape[-2:]
        row_stride, col_stride = mat.stride()[-2:]
        if row_stride == 1 and col_stride >= max(1, rows):  # column-major (torch checks this case first)
            lead = col_stride
        elif col_stride == 1 and row_stride >= max(1, cols):
            lead = row_stride
        else:
            return (f"{name} strides {tuple(mat.stride())} for shape {tuple(mat.shape)} are neither row- nor "
                    "column-major")
        if lead % (16 // mat.element_size()):
            return f"{name} leading stride {lead} is not a multiple of 16 bytes (pad H and I to multiples of 8)"
        if mat.device.type == "cuda" and mat.data_ptr() % 16:
            return f"{name} data is not 16-byte aligned"
    return None


def fallback_counts() -> dict[str, int]:
    """How many GEMMs ran the per-expert loop on CUDA instead of grouped_mm, by "op: reason" (this process)."""
    return dict(_FALLBACKS)


def _fast_device(t: Tensor) -> bool:
    return t.is_cuda and _cuda_capable(t.device)


@functools.lru_cache(maxsize=16)
def _cuda_capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _grouped_fast(op: str, mat_a: Tensor, mat_b: Tensor, counts: Sequence[int]) -> Tensor | None:
    """grouped_mm(mat_a, mat_b) on the fast path, or None (then the caller loops) with the reason counted."""
    if not _fast_device(mat_a) or _GROUPED_MM is None:
        if mat_a.is_cuda:
            _note_fallback(op, "no grouped_mm in this torch build" if _GROUPED_MM is None else "GPU older than SM80")
        return None
    problem = grouped_mm_layout_problem(mat_a, mat_b)
    if problem is not None:
        _note_fallback(op, problem)
        return None
    offs, _ = _group_meta(tuple(int(n) for n in counts), mat_a.device)
    return _GROUPED_MM(mat_a, mat_b, offs=offs)  # errors propagate: never a silent slow path


def _note_fallback(op: str, reason: str) -> None:
    _FALLBACKS[f"{op}: {reason}"] += 1
    warn_once(logger, f"grouped expert GEMM ({op}) runs a per-expert loop on CUDA: {reason}")


@functools.lru_cache(maxsize=256)
def _group_meta(counts: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(int32 end offsets, int64 indices of empty groups or None) on `device`, cached per group sizes.

    Uploaded from pinned memory without blocking: a pageable copy would make the host wait for the
    device's queue to drain before each new set of group sizes.
    """
    offs = _upload(list(itertools.accumulate(counts)), torch.int32, device)
    empty = [g for g, n in enumerate(counts) if n == 0]
    return offs, (_upload(empty, torch.int64, device) if empty else None)


def _upload(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _grouped_rows(kind: str, a_MK: Tensor, b_GKN: Tensor, counts: Sequence[int]) -> Tensor:
    """Rows of group g of `a` @ b[g] -> [M, N]: the grouped kernel where it applies, else a per-group loop."""
    if a_MK.shape[0] > 0:
        y = _grouped_fast(kind, a_MK, b_GKN, counts)
        if y is not None:
            return y
    out = a_MK.new_empty((a_MK.shape[0], b_GKN.shape[2]))
    start = 0
    for g, n in enumerate(counts):
        if n:
            torch.mm(a_MK[start:start + n], b_GKN[g], out=out[start:start + n])
        start += n
    return out


def grouped_mm(x_MK: Tensor, w_GNK: Tensor, counts: Sequence[int]) -> Tensor:
    """y rows of group g = x rows of g @ w[g].T (`counts[g]` consecutive rows per group) -> [M, N]."""
    return _grouped_rows("fwd", x_MK, w_GNK.transpose(-2, -1), counts)


def grouped_mm_dx(dy_MN: Tensor, w_GNK: Tensor, counts: Sequence[int]) -> Tensor:
    """Input grad of `grouped_mm`: dx rows of g = dy rows of g @ w[g] -> [M, K]."""
    return _grouped_rows("dx", dy_MN, w_GNK, counts)


def grouped_wgrad(dy_MN: Tensor, x_MK: Tensor, counts: Sequence[int]) -> Tensor | None:
    """Weight grad of `grouped_mm` as a fresh [G, N, K] in the input dtype via grouped_mm, or None off the fast path.

    grouped_mm accumulates in fp32 inside the kernel and rounds once to the input dtype (its only output
    dtype); empty groups are zeroed explicitly (pytorch#172439: some kernels leave them unset).
    """
    if dy_MN.shape[0] == 0:
        return None
    # 2-D x 2-D: the shared M dimension is split by offs, giving [G, N, K].
    dw = _grouped_fast("dw", dy_MN.t(), x_MK, counts)
    if dw is not None:
        _, empty = _group_meta(tuple(int(n) for n in counts), dw.device)
        if empty is not None:
            dw.index_fill_(0, empty, 0)
    return dw


def grouped_wgrad_(out_GNK: Tensor, dy_MN: Tensor, x_MK: Tensor, counts: Sequence[int]) -> None:
    """Weight grad of `grouped_mm`, accumulated in place: out[g] += dy_g.T @ x_g (out may be wider, e.g. fp32)."""
    dw = grouped_wgrad(dy_MN, x_MK, counts)
    if dw is not None:
        out_GNK.add_(dw)
        return
    start = 0
    for g, n in enumerate(counts):
        if n:
            dy_g, x_g = dy_MN[start:start + n], x_MK[start:start + n]
            if out_GNK.dtype == dy_g.dtype:
                out_GNK[g].addmm_(dy_g.t(), x_g)
            else:
                out_GNK[g].add_(torch.mm(dy_g.t(), x_g))
        start += n
