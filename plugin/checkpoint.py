"""save_checkpoint / load_checkpoint for the schedule engine: DeepSpeed's files plus the layout they need.

DeepSpeed writes model weights through `PipelineStages.save_state_dict` (one `layer_XX-model_states.pt`
per layer, written once even where DualPipe holds two copies, and read back into every copy) and the
optimizer, LR scheduler and counters per rank as usual. Weights are per layer, so they load into any
schedule and any pipeline size; optimizer state is per rank, so it only fits the same layout. The
schedule, pipeline size and layer cut are written to `<dir>/<tag>/dualmoe_layout.json` and checked
before anything is loaded: a different layout with `load_optimizer_states=True` raises `ConfigError`.
A checkpoint without that file (saved by DeepSpeed's own PipelineEngine) is accepted for the one-stage-
per-rank schedules ("1f1b", "zb1p"), whose per-rank state has DeepSpeed's shape.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .errors import ConfigError

__all__ = ["LAYOUT_FILE", "CheckpointMixin"]

LAYOUT_FILE = "dualmoe_layout.json"


def _resolve_tag(load_dir: str, tag: Any) -> str | None:
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        return f.read().strip()


class CheckpointMixin:
    """Adds the layout record to DeepSpeed's checkpoint calls; mixed into the engine before PipelineEngine."""

    def checkpoint_layout(self) -> dict[str, Any]:
        """What a resumed run must match to reuse per-rank optimizer state."""
        plan = self._plan  # type: ignore[attr-defined]
        return {"schedule": plan.config.schedule, "pipe_ranks": plan.groups.pp_size,
                "data_parallel": plan.groups.dp_size, "bounds": list(plan.layout.bounds),
                "stage_to_rank": list(plan.layout.stage_to_rank)}

    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: dict[str, Any] | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> Any:
        """DeepSpeed's `save_checkpoint` (all ranks call it) plus `dualmoe_layout.json` from global rank 0.

        Args:
            save_dir: checkpoint root folder.
            tag: checkpoint tag (default: "global_step<N>", as DeepSpeed).
            client_state: the caller's extra state.
            save_latest: write the `latest` file.
            exclude_frozen_parameters: skip frozen parameters.

        Returns:
            What DeepSpeed returns.
        """
        tag = f"global_step{self.global_steps}" if tag is None else tag  # type: ignore[attr-defined]
        result = super().save_checkpoint(save_dir, tag=tag, client_state=client_state or {},  # type: ignore[misc]
                                         save_latest=save_latest, exclude_frozen_parameters=exclude_frozen_parameters)
        if self.global_rank == 0:  # type: ignore[attr-defined]
            path = os.path.join(save_dir, str(tag), LAYOUT_FILE)
            with open(path, "w") as f:
                json.dump(self.checkpoint_layout(), f, indent=1)
        return result

    def _check_layout(self, load_dir: str, tag: Any) -> None:
        resolved = _resolve_tag(load_dir, tag)
        path = None if resolved is None else os.path.join(load_dir, resolved, LAYOUT_FILE)
        current = self.checkpoint_layout()
        if path is not None and os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved != current:
                raise ConfigError(f"checkpoint {os.path.dirname(path)} was saved with layout {saved}, this engine "
                                  f"runs {current}; per-rank optimizer state does not transfer: load with "
                                  f"load_optimizer_states=False (weights are per layer and load into any layout) "
                                  f"or run the saved layout")
        elif current["schedule"] not in ("1f1b", "zb1p"):
            raise ConfigError(f"checkpoint in {load_dir} (tag {resolved}) has no {LAYOUT_FILE}, so its per-rank "
                              f"optimizer state has DeepSpeed's one-stage-per-rank layout, not schedule "
                              f"{current['schedule']!r}'s; load with load_optimizer_states=False")

    def load_checkpoint(self, load_dir: str, tag: Any = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Any = None) -> tuple[Any, Any]:
        """DeepSpeed's `load_checkpoint`, refusing optimizer state saved under another layout.

        Returns:
            (load path, client state), as DeepSpeed.

        Raises:
            ConfigError: optimizer state was requested but the checkpoint's schedule, pipeline size, data
                parallel size or layer cut differs from this engine's (checked before loading anything).
        """
        if load_optimizer_states and not load_module_only:
            self._check_layout(load_dir, tag)
        return super().load_checkpoint(  # type: ignore[misc]
            load_dir, tag=tag, load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
            custom_load_fn=custom_load_fn)
