"""optax_paged8bit: bitsandbytes' PagedAdamW8bit for JAX and optax.

Modules, one concern each: `paged` (paged_adamw8bit and its state),
`functional` (adamw8bit, whose state is also the checkpoint format),
`checkpoint` (export/import, orbax save/restore), `fused` (the fused step
in Flax's forms), `memory` (release,
collection, paging), `migration` (from and to optax.adamw), `accumulation`,
`quantization`; and the internal `_contract` (arguments and their checks),
`_layout` (the static layout, tree checks, sharding), `_calls` (the custom
calls), `_transform` (what both transforms share), `_states` (finding paged
states in any pytree), `_orbax_guard` and `_flax_serialization` (what orbax
and flax.serialization do with the states; `_import_hooks` installs them), and
`_ffi` (the extension).
"""

from optax_paged8bit import _flax_serialization, _orbax_guard
from optax_paged8bit._layout import Layout
from optax_paged8bit._transform import PagedGradientTransformation
from optax_paged8bit.accumulation import AccumulateGradientsState, accumulate_gradients
from optax_paged8bit.checkpoint import (
  InterruptedStepWarning,
  export_state,
  import_state,
  restore_checkpoint,
  save_checkpoint,
)
from optax_paged8bit.functional import Adam8bitState, adamw8bit
from optax_paged8bit.fused import fused_chain
from optax_paged8bit.memory import (
  collect,
  eviction_watch,
  host_memory_kind,
  measure_residency,
  page_in,
  page_out,
  release,
  residency,
  set_device_memory_budget,
  set_eviction_watch,
  set_host_memory_kind,
  slot_info,
  state_nbytes,
)
from optax_paged8bit.migration import from_optax_adamw, to_optax_adamw
from optax_paged8bit.paged import PagedAdamW8bitState, paged_adamw8bit
from optax_paged8bit.quantization import QMAP_SIGNED, QMAP_UNSIGNED, dynamic_map

_orbax_guard.install()
_flax_serialization.install()


def __getattr__(name: str):
  """FusedTrainState and FusedOptimizer (Flax's TrainState and nnx.Optimizer
  with the fused step), made on first use: Flax is an optional dependency."""
  if name in ("FusedTrainState", "FusedOptimizer"):
    from optax_paged8bit import fused

    return getattr(fused, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
  "QMAP_SIGNED",
  "QMAP_UNSIGNED",
  "AccumulateGradientsState",
  "Adam8bitState",
  "InterruptedStepWarning",
  "Layout",
  "PagedAdamW8bitState",
  "PagedGradientTransformation",
  "accumulate_gradients",
  "adamw8bit",
  "collect",
  "dynamic_map",
  "eviction_watch",
  "export_state",
  "from_optax_adamw",
  "fused_chain",
  "host_memory_kind",
  "import_state",
  "measure_residency",
  "page_in",
  "page_out",
  "paged_adamw8bit",
  "release",
  "residency",
  "restore_checkpoint",
  "save_checkpoint",
  "set_device_memory_budget",
  "set_eviction_watch",
  "set_host_memory_kind",
  "slot_info",
  "state_nbytes",
  "to_optax_adamw",
]

__version__ = "0.1.0"
