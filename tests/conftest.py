"""Suite-wide JAX settings."""

import jax

# float64 everywhere, so that references and estimates can be compared to 1e-10.
jax.config.update("jax_enable_x64", True)
# Most of the suite's time is XLA compiling hundreds of small vmapped programs; without its
# optimization passes they compile several times faster and give the same float64 results.
jax.config.update("jax_disable_most_optimizations", True)
