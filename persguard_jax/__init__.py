"""persguard_jax: protecting photos from unauthorised personalisation of text-to-image diffusion models."""
__version__ = "0.1.0"
