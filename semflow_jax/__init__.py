"""semflow_jax: SemFlow (semantic segmentation and image synthesis as one rectified flow) in JAX/Flax."""

from semflow_jax import malloc_options, xla_options

__version__ = "0.1.0"

# Before JAX creates its backend, which reads XLA_FLAGS once: the measured-fastest CPU options.
xla_options.apply()
# Where the CPU computes: XLA's per-call temporary buffers reuse freed pages instead of fresh mappings.
malloc_options.apply()


def __getattr__(name):
    # Lazy, so that `import semflow_jax.flow` does not pull in orbax and the data stack.
    if name == "SemFlow":
        from semflow_jax.api import SemFlow

        return SemFlow
    raise AttributeError(name)


__all__ = ["SemFlow"]
