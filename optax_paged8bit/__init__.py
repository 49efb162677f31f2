"""optax_paged8bit: bitsandbytes' PagedAdamW8bit for JAX and optax."""

from optax_paged8bit.transform import (
  Layout,
  PagedAdamW8bitState,
  PagedGradientTransformation,
  paged_adamw8bit,
)

__all__ = [
  "Layout",
  "PagedAdamW8bitState",
  "PagedGradientTransformation",
  "paged_adamw8bit",
]

__version__ = "0.1.0"
