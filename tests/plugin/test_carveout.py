"""sm_carveout: sets torch's cuBLAS SM carve-out for the block and restores the previous value; CUDA only."""

from __future__ import annotations

import pytest
import torch
from dualmoe.carveout import sm_carveout

_get = getattr(torch._C, "_get_sm_carveout_experimental", None)
needs_api = pytest.mark.skipif(_get is None, reason="this torch has no SM carve-out API")


@needs_api
def test_carveout_is_set_inside_and_restored_after_even_on_error() -> None:
    before = _get()
    with sm_carveout(8, torch.device("cuda", 0)):  # only torch's global setting: no CUDA work happens
        assert _get() == 8
        with sm_carveout(4, torch.device("cuda", 0)):
            assert _get() == 4
        assert _get() == 8
    assert _get() == before
    with pytest.raises(RuntimeError, match="boom"), sm_carveout(8, torch.device("cuda", 0)):
        raise RuntimeError("boom")
    assert _get() == before


@needs_api
def test_carveout_is_a_no_op_off_cuda_or_at_zero() -> None:
    before = _get()
    with sm_carveout(8, torch.device("cpu")):
        assert _get() == before
    with sm_carveout(0, torch.device("cuda", 0)):
        assert _get() == before
