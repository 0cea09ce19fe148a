"""crate_jax: CRATE, the white-box transformer, in JAX/Flax."""
from crate_jax import models
from crate_jax.models import CRATE

__version__ = "0.1.0"
__all__ = ["CRATE", "models", "__version__"]
