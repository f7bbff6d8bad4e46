"""Models built from moe_jax layers."""

from moe_jax.models.transformer import TransformerConfig, TransformerLM

__all__ = ["TransformerConfig", "TransformerLM"]
