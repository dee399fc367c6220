"""mgd-jax: Multi-granularity knowledge distillation (Shao & Chen, IMAVIS 2021) in JAX/Flax."""
__version__ = "0.1.0"
