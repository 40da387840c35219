"""The sample grid of a few validation examples (image | ground truth | prediction | syntheses), which train
writes as it goes and eval at the end, and the global validation batches both assemble it from.
"""

from __future__ import annotations

import jax
import numpy as np

from semflow_jax import sharding
from semflow_jax.data import pipeline
from semflow_jax.visualize import colorize, grid


def example_keys(seed: int, index, sample: int = 0):
    """One PRNG key per example from its dataset index: a sample depends on neither batching nor hosts."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), sample)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(index)


def global_batches(config, mesh, num_examples: int, batch_size: int):
    """eval_batches of this process, each assembled into global arrays over mesh (padding rows invalid)."""
    for local in pipeline.eval_batches(
        config, num_examples, batch_size, "validation", jax.process_index(), jax.process_count()
    ):
        yield {k: sharding.to_global(v, mesh) for k, v in local.items()}


def host_rows(arrays: dict) -> dict:
    """Every process's valid rows of global batch arrays, gathered to the host and sorted by example index."""
    host = {k: sharding.to_host(v) for k, v in arrays.items()}
    order = np.argsort(host["index"][host["valid"]], kind="stable")
    return {k: v[host["valid"]][order] for k, v in host.items()}


def preview_grid(config, sampler, params, batch, num_samples: int = 2, vae_params=None) -> np.ndarray:
    """Rows of image | ground truth | prediction | num_samples syntheses for a global batch of a few examples.

    Collective on several processes: every process calls it with its part of the batch.
    """
    steps, solver, beta = int(config.flow.steps), config.flow.solver, float(config.flow.beta)
    out = {k: batch[k] for k in ("image", "label", "index", "valid")}
    out["pred"] = sampler.segment(params, batch["image"], steps, solver, vae_params)
    for s in range(num_samples):
        keys = example_keys(config.seed, batch["index"], s)
        out[f"sample{s}"] = sampler.synthesize(params, batch["label"], keys, beta, steps, solver, vae_params)
    rows = host_rows(out)
    _, palette = pipeline.class_names_and_palette(config)
    pictures = [
        [
            rows["image"][i],
            colorize(rows["label"][i], palette),
            colorize(rows["pred"][i], palette),
            *(rows[f"sample{s}"][i] for s in range(num_samples)),
        ]
        for i in range(len(rows["index"]))
    ]
    return grid(pictures, scale=max(1, 128 // rows["image"].shape[1]))
