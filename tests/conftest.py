"""Suite-wide JAX settings."""

import jax

# float64 everywhere, so that references and estimates can be compared to 1e-10.
jax.config.update("jax_enable_x64", True)
# Most of the suite's time goes to XLA compiling hundreds of small vmapped programs. Without
# XLA's optimization passes they compile several times faster, and the suite tests cpjax,
# not those passes.
jax.config.update("jax_disable_most_optimizations", True)
