"""The public API: `SemFlow.from_workdir(DIR)`, then `segment(images)` and `synthesize(labels)`.

For people who never read the trainer: numpy in, numpy out, any batch size (chunked and padded internally so
each shape compiles once). Work is split over this process's devices (data parallel, parameters replicated);
the distributed evaluator uses `semflow_jax.sampling.Sampler` over the global mesh instead.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from semflow_jax import checkpoint, config_lib, flow, sampling, sharding
from semflow_jax.errors import SemFlowError
from semflow_jax.models import Codec, build_model, build_vae
from semflow_jax.state import abstract_train_state, sampling_params


def sample_keys(seed: int, n: int) -> np.ndarray:
    """One PRNG key per example, key i = fold_in(PRNGKey(seed), i): a sample is independent of batching."""
    base = jax.random.PRNGKey(seed)
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n)))


class SemFlow:
    """A trained SemFlow model: one velocity network that segments (t: 0 -> 1) and synthesizes (t: 1 -> 0)."""

    def __init__(self, config, params, mesh=None, vae_params=None):
        self.config = config_lib.validate(config)
        self.mesh = sharding.local_mesh() if mesh is None else mesh
        self.params = jax.device_put(params, sharding.replicated(self.mesh))
        self.vae_params = (
            None if vae_params is None else jax.device_put(vae_params, sharding.replicated(self.mesh))
        )
        self.model = build_model(config)
        self.anchors = jnp.asarray(
            flow.anchors_for(config.data.num_classes, config.anchors.base, config.anchors.spacing)
        )
        self.sampler = sampling.Sampler(
            self.model,
            self.anchors,
            self.mesh,
            jax.tree.map(lambda _: sharding.replicated(self.mesh), params),
            Codec(build_vae(config)),
        )
        self.num_classes = int(config.data.num_classes)
        self.image_hw = config_lib.image_hw(config)

    @classmethod
    def from_workdir(cls, workdir: str, ema: bool = True, step: int | None = None) -> SemFlow:
        """Loads config.json and the newest (or given) checkpoint of a training workdir; EMA weights by default
        (the trained ones when the run kept no EMA, train.ema_decay = 0)."""
        if not os.path.isdir(workdir):
            raise SemFlowError(f"workdir {workdir!r} does not exist")
        config = config_lib.load(workdir)
        ckpt_dir = os.path.join(workdir, "checkpoints")
        if not checkpoint.has_checkpoint(ckpt_dir):
            raise SemFlowError(f"no checkpoint in {ckpt_dir}: train first (python -m semflow_jax.train)")
        ckpt = checkpoint.Checkpointer(ckpt_dir, create=False, async_save=False)
        try:
            state = ckpt.restore(abstract_train_state(config), step)
        finally:
            ckpt.close()

        params = sampling_params(state) if ema else state["params"]
        return cls(config, params, vae_params=state.get("vae"))

    # ------------------------------------------------------------------------------------------------------
    def _check_images(self, images) -> np.ndarray:
        images = np.asarray(images)
        h, w = self.image_hw
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise SemFlowError(
                f"images must be uint8 [N, {h}, {w}, 3], got {images.dtype} {list(images.shape)}"
            )
        return images

    def _check_labels(self, labels) -> np.ndarray:
        labels = np.asarray(labels)
        h, w = self.image_hw
        if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 3 or labels.shape[1:] != (h, w):
            raise SemFlowError(
                f"labels must be integer [N, {h}, {w}], got {labels.dtype} {list(labels.shape)}"
            )
        bad = (labels < 0) | ((labels >= self.num_classes) & (labels != flow.IGNORE_LABEL))
        if bad.any():
            raise SemFlowError(
                f"labels must be class ids in [0, {self.num_classes}) or {flow.IGNORE_LABEL} (ignore); "
                f"found {int(labels[bad][0])}"
            )
        return labels.astype(np.int32)

    def _chunks(self, n: int, batch_size: int | None):
        b = int(batch_size or self.config.eval.batch_size)
        b = -(-b // self.mesh.size) * self.mesh.size  # every device gets the same number of rows
        for start in range(0, n, b):
            yield start, min(start + b, n), b

    @staticmethod
    def _pad(x: np.ndarray, b: int) -> np.ndarray:
        return np.concatenate([x, np.repeat(x[-1:], b - len(x), axis=0)]) if len(x) < b else x

    def _frames(self, path) -> np.ndarray:
        """A trajectory [T, N, ...] in flow space as uint8 pictures [N, T, H, W, 3]."""
        frames = [np.asarray(f) for f in self.sampler.pictures(path, self.vae_params)]
        return np.stack(frames, axis=1)

    def segment(
        self,
        images,
        steps: int | None = None,
        solver: str | None = None,
        batch_size=None,
        return_trajectory: bool = False,
    ):
        """uint8 images [N, H, W, 3] -> int32 class ids [N, H, W]. Deterministic: same image, same mask.

        With return_trajectory, returns (class ids, frames): frames uint8 [N, steps + 1, H, W, 3] are the
        states z_t of the ODE path from the image (t = 0) to the painted mask (t = 1), as pictures.
        """
        images = self._check_images(images)
        steps = int(steps or self.config.flow.steps)
        solver = solver or self.config.flow.solver
        out, paths = [], []
        for lo, hi, b in self._chunks(len(images), batch_size):
            x = jax.device_put(self._pad(images[lo:hi], b), self.sampler.batch_sharding)
            labels = self.sampler.segment(self.params, x, steps, solver, self.vae_params, return_trajectory)
            if return_trajectory:
                labels, path = labels
                paths.append(self._frames(path)[: hi - lo])
            out.append(np.asarray(labels)[: hi - lo])
        labels = np.concatenate(out) if out else np.zeros((0, *self.image_hw), np.int32)
        if return_trajectory:
            return labels, (
                np.concatenate(paths) if paths else np.zeros((0, steps + 1, *self.image_hw, 3), np.uint8)
            )
        return labels

    def synthesize(
        self,
        labels,
        steps: int | None = None,
        beta: float | None = None,
        seed: int = 0,
        solver: str | None = None,
        batch_size=None,
        keys=None,
        return_trajectory: bool = False,
    ):
        """int class ids [N, H, W] -> uint8 images [N, H, W, 3]; beta (0-255 units) perturbs the mask.

        The same seed gives the same pictures, whatever the batch size; beta=0 gives the one deterministic
        image per mask. keys (uint32 [N, 2], one jax PRNG key per row) replaces seed where the caller names
        each sample's randomness itself, e.g. by file name. With return_trajectory, returns (images, frames):
        frames uint8 [N, steps + 1, H, W, 3] run from the perturbed mask (t = 1) to the image (t = 0).
        """
        labels = self._check_labels(labels)
        steps = int(steps or self.config.flow.steps)
        solver = solver or self.config.flow.solver
        beta = float(self.config.flow.beta if beta is None else beta)
        try:
            flow.check_beta(beta, self.config.anchors.spacing)
        except ValueError as e:
            raise SemFlowError(str(e)) from None
        if keys is None:
            keys = sample_keys(seed, len(labels))
        keys = np.asarray(keys)
        if keys.shape != (len(labels), 2) or keys.dtype != np.uint32:
            raise SemFlowError(f"keys must be uint32 [{len(labels)}, 2], got {keys.dtype} {list(keys.shape)}")
        out, paths = [], []
        for lo, hi, b in self._chunks(len(labels), batch_size):
            x, k = (
                jax.device_put(self._pad(a[lo:hi], b), self.sampler.batch_sharding) for a in (labels, keys)
            )
            images = self.sampler.synthesize(
                self.params, x, k, beta, steps, solver, self.vae_params, return_trajectory
            )
            if return_trajectory:
                images, path = images
                paths.append(self._frames(path)[: hi - lo])
            out.append(np.asarray(images)[: hi - lo])
        images = np.concatenate(out) if out else np.zeros((0, *self.image_hw, 3), np.uint8)
        if return_trajectory:
            return images, (
                np.concatenate(paths) if paths else np.zeros((0, steps + 1, *self.image_hw, 3), np.uint8)
            )
        return images
