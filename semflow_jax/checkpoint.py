"""Checkpoints of the training state: the only module that imports orbax (its V1 API is coming).

A checkpoint holds the state pytree (params, opt, ema, step, rng) and a JSON part (data iterator state, config).
orbax writes each step to a temporary directory and renames it when complete, so a crash mid-save leaves
nothing that `latest_step` would pick up.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from semflow_jax.errors import SemFlowError


class Checkpointer:
    """Saves and restores {"state": pytree, "extra": JSON} per step under `directory`."""

    def __init__(self, directory: str, keep: int = 2, async_save: bool = True, create: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state, extra: dict, force: bool = False) -> bool:
        """Starts saving (asynchronously when enabled); returns whether a save was started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra))
        return self._manager.save(step, args=args, force=force)

    def restore(self, template, step: int | None = None):
        """Returns (state, extra) of `step` (default: newest), laid out like `template` (arrays or shapes)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise SemFlowError(
                f"no checkpoint in {self.directory}: train first (python -m semflow_jax.train)"
            )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(template), extra=ocp.args.JsonRestore())
        try:
            out = self._manager.restore(step, args=args)
        except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SemFlowError(
                f"checkpoint {self.directory}/{step} does not fit this config: {msg}"
            ) from None
        return out.state, out.extra

    def wait(self) -> None:
        """Blocks until an asynchronous save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.close()


def has_checkpoint(directory: str) -> bool:
    """Whether `directory` holds at least one complete checkpoint (without creating anything)."""
    if not os.path.isdir(directory):
        return False
    return Checkpointer(directory, create=False, async_save=False).latest_step() is not None
