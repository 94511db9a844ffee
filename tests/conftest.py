"""Suite-wide setup: float64, so that references and estimates can be compared tightly."""

import jax

jax.config.update("jax_enable_x64", True)
