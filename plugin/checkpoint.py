"""save_checkpoint / load_checkpoint for the schedule engine: DeepSpeed's files plus the layout they need.

DeepSpeed writes model weights through `PipelineStages.save_state_dict` (one `layer_XX-model_states.pt`
per layer, written once even where DualPipe holds two copies, and read back into every copy) and the
optimizer, LR scheduler and counters per rank as usual. Weights are per layer, so they load into any
schedule and any pipeline size; optimizer state is per rank, so it only fits the same layout. The
schedule kind, pipeline size and layer cut are recorded in the client state under "dualmoe" and checked
on load: a mismatch with `load_optimizer_states=True` raises `ConfigError` naming both layouts.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

__all__ = ["LAYOUT_KEY", "CheckpointMixin"]

LAYOUT_KEY = "dualmoe"


class CheckpointMixin:
    """Adds the layout record to DeepSpeed's checkpoint calls; mixed into the engine before PipelineEngine."""

    def checkpoint_layout(self) -> dict[str, Any]:
        """What a resumed run must match to reuse per-rank optimizer state."""
        plan = self._plan  # type: ignore[attr-defined]
        return {"schedule": plan.config.schedule, "pipe_ranks": plan.groups.pp_size,
                "bounds": list(plan.layout.bounds), "stage_to_rank": list(plan.layout.stage_to_rank)}

    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: dict[str, Any] | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> Any:
        """DeepSpeed's `save_checkpoint` (all ranks call it); the layout is added to the client state.

        Args:
            save_dir: checkpoint root folder.
            tag: checkpoint tag (default: the global step).
            client_state: the caller's extra state.
            save_latest: write the `latest` file.
            exclude_frozen_parameters: skip frozen parameters.

        Returns:
            What DeepSpeed returns.
        """
        state = dict(client_state or {})
        state[LAYOUT_KEY] = self.checkpoint_layout()
        return super().save_checkpoint(save_dir, tag=tag, client_state=state,  # type: ignore[misc]
                                       save_latest=save_latest, exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str, tag: Any = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Any = None) -> tuple[Any, Any]:
        """DeepSpeed's `load_checkpoint`, refusing optimizer state saved under another layout.

        Returns:
            (load path, client state without the layout record), as DeepSpeed.

        Raises:
            ConfigError: optimizer state was requested but the checkpoint's schedule, pipeline size or
                layer cut differs from this engine's.
        """
        path, client_state = super().load_checkpoint(  # type: ignore[misc]
            load_dir, tag=tag, load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
            custom_load_fn=custom_load_fn)
        saved = client_state.pop(LAYOUT_KEY, None) if isinstance(client_state, dict) else None
        current = self.checkpoint_layout()
        if saved is not None and saved != current and load_optimizer_states and not load_module_only:
            raise ConfigError(f"checkpoint {path} was saved with layout {saved}, this engine runs {current}; "
                              f"per-rank optimizer state does not transfer: load with load_optimizer_states=False "
                              f"(weights are per layer and load into any layout) or use the saved schedule")
        return path, client_state
