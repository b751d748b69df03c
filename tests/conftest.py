"""Shared pytest setup: skip `gpu` tests where no CUDA device is present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# DeepSpeed JIT-builds C++ ops (the CPU shared-memory comm op) into TORCH_EXTENSIONS_DIR under a lock file.
# Keep the build per checkout, so a build killed elsewhere (a stale lock in ~/.cache) or another venv's torch
# cannot make every distributed test wait on it; spawned ranks inherit the variable.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
