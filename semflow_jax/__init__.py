"""semflow_jax: SemFlow (semantic segmentation and image synthesis as one rectified flow) in JAX/Flax."""

__version__ = "0.1.0"

# Importing the package changes nothing in the process (no XLA flags, no device split, no malloc settings):
# the command-line tools call semflow_jax.cpu.tuning.tune() before jax starts, and so may any program.


def __getattr__(name):
    # Lazy, so that `import semflow_jax.flow` does not pull in orbax and the data stack.
    if name == "SemFlow":
        from semflow_jax.api import SemFlow

        return SemFlow
    raise AttributeError(name)


__all__ = ["SemFlow"]
