"""moe_jax: sparse Mixture-of-Experts in JAX, to be read next to the papers."""

__version__ = "0.1.0"
