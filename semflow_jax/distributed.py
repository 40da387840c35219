"""Multi-process start-up and preemption: one code path from a laptop to a pod.

`initialize` joins the processes of a multi-host run (explicit coordinator, or what a TPU pod / SLURM job
announces in its environment) and does nothing on one machine. `check_topology` fails fast when the process
or device count is not what the launcher asked for. `Preemption` answers "should this step be the last?":
on several processes through JAX's preemption sync point (every host agrees on the same step), on one
through a SIGTERM handler.
"""

from __future__ import annotations

import os
import signal
import threading

import jax

from semflow_jax.errors import SemFlowError


def _cluster_env() -> str | None:
    """Names the multi-process environment jax can detect by itself, or None on a single machine."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def initialize(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, auto: bool = False
) -> bool:
    """Joins a multi-process run; returns whether one was joined. Call before anything touches a device.

    With a coordinator address all three values are used as given (e.g. several processes on one host).
    With auto, jax finds the cluster itself (TPU pod metadata, SLURM, MPI). Otherwise a SLURM step or MPI
    job with several tasks is still detected from its environment; on one machine nothing happens.
    """
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise SemFlowError(
                f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < num_processes, "
                f"got {num_processes} and {process_id}"
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if auto or _cluster_env() is not None:
        jax.distributed.initialize()
        return True
    return False


def startup_line(mesh, global_batch: int) -> str:
    """The line every process prints at start: who it is, what it sees, how the batch is split."""
    return (
        f"process {jax.process_index()}/{jax.process_count()}  devices {jax.local_device_count()} local / "
        f"{jax.device_count()} global ({jax.devices()[0].platform})  mesh {dict(mesh.shape)}  "
        f"batch {global_batch} global / {global_batch // jax.process_count()} per process / "
        f"{global_batch // mesh.size} per device"
    )


def check_topology(expect_processes: int = 0, expect_devices: int = 0) -> None:
    """Fails fast when the run does not see the processes/devices the launcher expected (0: no check)."""
    if expect_processes and jax.process_count() != expect_processes:
        raise SemFlowError(
            f"expected {expect_processes} processes, jax sees {jax.process_count()} "
            f"(process {jax.process_index()}): are all workers started with the same command?"
        )
    if expect_devices and jax.device_count() != expect_devices:
        raise SemFlowError(
            f"expected {expect_devices} devices, jax sees {jax.device_count()} "
            f"({jax.local_device_count()} on process {jax.process_index()})"
        )


class Preemption:
    """`reached(step)` turns True at the step where the run should save and stop after a SIGTERM.

    On several processes JAX's preemption service catches the signal on any host and picks one step that
    every host reaches, so all of them save the same step. On one process a SIGTERM handler sets a flag
    (the current step still finishes: the signal never interrupts a step).
    """

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self._flag = False
        self._previous = None
        # Signal handlers can only be set from the main thread; elsewhere (a notebook's worker thread) the
        # run simply has no single-process preemption handling.
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._flag = True

    def reached(self, step: int) -> bool:
        """Whether `step` (just completed) is the one to save and stop at."""
        if self.multi_process:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag

    def close(self) -> None:
        """Restores the SIGTERM handler that was there before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def define_flags() -> None:
    """The command-line flags of a multi-process launch, shared by train and eval."""
    from absl import flags

    flags.DEFINE_string(
        "coordinator_address", "", "host:port of process 0; only where jax cannot detect the cluster itself."
    )
    flags.DEFINE_integer("num_processes", 0, "Processes in the run (with --coordinator_address).")
    flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() and let jax find the cluster (TPU pod, SLURM).",
    )
    flags.DEFINE_integer("expect_processes", 0, "Fail at start unless jax sees this many processes (0: any).")
    flags.DEFINE_integer("expect_devices", 0, "Fail at start unless jax sees this many devices (0: any).")


def initialize_from_flags() -> None:
    """initialize + check_topology with the values of `define_flags`'s flags."""
    from absl import flags

    f = flags.FLAGS
    initialize(f.coordinator_address, f.num_processes, f.process_id, f.distributed)
    check_topology(f.expect_processes, f.expect_devices)
