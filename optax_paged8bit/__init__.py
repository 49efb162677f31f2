"""optax_paged8bit: bitsandbytes' PagedAdamW8bit for JAX and optax."""

from optax_paged8bit.accumulation import AccumulateGradientsState, accumulate_gradients
from optax_paged8bit.paging import (
  collect,
  export_state,
  from_optax_adamw,
  import_state,
  page_in,
  page_out,
  release,
  residency,
  restore_checkpoint,
  save_checkpoint,
  set_device_memory_budget,
  slot_info,
  state_nbytes,
  to_optax_adamw,
)
from optax_paged8bit.quantization import QMAP_SIGNED, QMAP_UNSIGNED, dynamic_map
from optax_paged8bit.transform import (
  Adam8bitState,
  Layout,
  PagedAdamW8bitState,
  PagedGradientTransformation,
  QuantizedMoments,
  adamw8bit,
  paged_adamw8bit,
)

__all__ = [
  "QMAP_SIGNED",
  "QMAP_UNSIGNED",
  "AccumulateGradientsState",
  "Adam8bitState",
  "Layout",
  "PagedAdamW8bitState",
  "PagedGradientTransformation",
  "QuantizedMoments",
  "accumulate_gradients",
  "adamw8bit",
  "collect",
  "dynamic_map",
  "export_state",
  "from_optax_adamw",
  "import_state",
  "page_in",
  "page_out",
  "paged_adamw8bit",
  "release",
  "residency",
  "restore_checkpoint",
  "save_checkpoint",
  "set_device_memory_budget",
  "slot_info",
  "state_nbytes",
  "to_optax_adamw",
]

__version__ = "0.1.0"
