"""Checkpoints of a training run: the only module that imports orbax (its V1 API is coming).

One checkpoint per saved step holds three items:
  "state":  the training-state pytree (params, opt, ema, step, rng), written shard by shard from every host;
  "data":   each process's grain iterator position (one small JSON file per process), so the batch sequence
            continues exactly where it stopped;
  "config": the run's config as JSON.
orbax writes a step into a temporary directory and renames it only when every host has finished, so a crash
mid-save (or a kill -9) leaves nothing that `latest_step` would pick up.
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

from semflow_jax.errors import SemFlowError, first_line

# orbax's "replica-parallel" save splits every replicated array into one slice per device, each cut by an
# eagerly dispatched (so separately compiled) slice: a few hundred compilations per save of a small model on 8
# devices, seconds on a CPU, and no gain below a large slice (it only spreads the writing of big replicated
# arrays over hosts). Kept for slices of at least this many bytes.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 4 << 20


def _register_array_handler() -> None:
    default = ocp.type_handlers.get_type_handler(jax.Array)
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES,
        array_metadata_store=getattr(default, "_array_metadata_store", None),
    )
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns about every override, on every start of every command
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


_register_array_handler()


class Checkpointer:
    """Saves and restores the items of a training step under `directory`; keeps the newest `keep`."""

    def __init__(self, directory: str, keep: int = 2, async_save: bool = True, create: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def save(
        self, step: int, state, data_iterator=None, config_json: dict | None = None, force=False
    ) -> bool:
        """Starts saving (asynchronously when enabled; the arrays are copied first, so training may go on)."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config_json is not None:
            items["config"] = ocp.args.JsonSave(config_json)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, template, step: int | None = None, data_iterator=None):
        """The state of `step` (default: newest), laid out like `template` (arrays or ShapeDtypeStructs with
        shardings); also moves `data_iterator`, if given, to where that step left it."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise SemFlowError(
                f"no checkpoint in {self.directory}: train first (python -m semflow_jax.train)"
            )
        items = {"state": ocp.args.StandardRestore(template)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
            raise SemFlowError(
                f"checkpoint {self.directory}/{step} does not fit this run: {first_line(e)}"
            ) from None
        return out.state

    def restore_config(self, step: int | None = None) -> dict | None:
        """The config JSON saved with `step` (default: newest), or None for a checkpoint without one."""
        step = self.latest_step() if step is None else step
        if step is None or not os.path.isdir(os.path.join(self.directory, str(step), "config")):
            return None
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        """Blocks until an asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.close()


def has_checkpoint(directory: str) -> bool:
    """Whether `directory` holds at least one complete checkpoint (without creating anything)."""
    if not os.path.isdir(directory):
        return False
    ckpt = Checkpointer(directory, create=False, async_save=False)
    try:
        return ckpt.latest_step() is not None
    finally:
        ckpt.close()
