"""optax's own conformance tests (optax/_src/alias_test.py, class AliasTest),
generated from the installed optax for our two transforms, as optax's
contributors run them for theirs.

The test module's source is read from the installed optax and executed with
its optimizer table replaced by ours. The few edits below are each asserted
to apply, so that a change in optax's file fails here loudly instead of
silently testing less. What cannot pass by design is skipped, with the reason:
- complex and float64 params: bitsandbytes' optimizers (and so ours) take
  float32, bfloat16 and float16 params only;
- optax.MultiSteps with paged_adamw8bit: it runs the inner update on every
  micro-step and keeps or discards the result, which a state advanced in place
  cannot survive (the README says to use accumulate_gradients, or adamw8bit);
- test_explicit_dtype: it is not parameterized by the optimizers under test
  (it checks optax's sgd/adam/adamw and their accumulator dtypes).
Layout-fixing arguments need inject_hyperparams' static_args, as adafactor's
min_dim_size_to_factor does. Half the entries spell the learning rate as
optax does (learning_rate), half as bitsandbytes does (lr).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import types

import pytest

import optax_paged8bit

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
pytest.importorskip("absl.testing")

OURS = """(
    {'opt_name': 'paged_adamw8bit', 'opt_kwargs': {'lr': 1e-1, 'weight_decay': 1e-4}},
    {'opt_name': 'adamw8bit', 'opt_kwargs': {'learning_rate': 1e-1, 'weight_decay': 1e-4}},
    {
        'opt_name': 'paged_adamw8bit',
        'opt_kwargs': {'learning_rate': 1e-1, 'weight_decay': 1e-4, 'min_8bit_size': 0},
    },
    {
        'opt_name': 'adamw8bit',
        'opt_kwargs': {'lr': 1e-1, 'weight_decay': 1e-4, 'min_8bit_size': 0},
    },
)
"""

PRELUDE = """
_OURS = __import__('optax_paged8bit')
_NO_COMPLEX = ('paged_adamw8bit', 'adamw8bit')
_STATIC_ARGS = {
    'adafactor': ('min_dim_size_to_factor',),
    'paged_adamw8bit': ('min_8bit_size', 'percentile_clipping'),
    'adamw8bit': ('min_8bit_size', 'percentile_clipping'),
}
"""

# (pattern, replacement, how many times it must apply; None: at least once)
EDITS = [
  # Our optimizer table instead of optax's.
  (r"_OPTIMIZERS_UNDER_TEST = \(\n.*?\n\)\n", "_OPTIMIZERS_UNDER_TEST = " + OURS, 1),
  # Look the optimizers up in optax_paged8bit.
  (r"return getattr\(alias, opt_name\)", "return getattr(_OURS, opt_name)", 1),
  # Our transforms take no complex params (each "does not support complex" list).
  (r"\)\s*and\s+jnp\.iscomplexobj\(dtype\)", ") + _NO_COMPLEX and jnp.iscomplexobj(dtype)", 2),
  # Layout-fixing arguments are static under inject_hyperparams.
  (r"if opt_name == 'adafactor':\n", "if opt_name in _STATIC_ARGS:\n", 1),
  (r"static_args=\('min_dim_size_to_factor',\)", "static_args=_STATIC_ARGS[opt_name]", 1),
  # No float64 params (also edits LBFGSTest's copy, which is not collected here).
  (
    r"( +)(with utils\.x64_precision\(dtype in \(jnp\.float64, jnp\.complex128\)\):)",
    r"\1if dtype in (jnp.float64, jnp.complex128):\n\1  self.skipTest('float32, bfloat16 "
    r"and float16 params only, as in bitsandbytes')\n\1\2",
    None,
  ),
  # A paged state cannot live under optax.MultiSteps.
  (
    r'( +)"""Test that the optimizers can safely be used with optax.MultiSteps."""\n',
    r'\g<0>\1if opt_name == "paged_adamw8bit":\n\1  self.skipTest("MultiSteps discards '
    r'updates of a state advanced in place; use accumulate_gradients or adamw8bit")\n',
    1,
  ),
]


def _generated_alias_test() -> type:
  spec = importlib.util.find_spec("optax._src.alias_test")
  if spec is None or spec.origin is None:
    pytest.skip("the installed optax ships no _src/alias_test.py", allow_module_level=True)
  source = pathlib.Path(spec.origin).read_text()
  for pattern, replacement, times in EDITS:
    source, n = re.subn(pattern, replacement, source, flags=re.S)
    ok = n >= 1 if times is None else n == times
    assert ok, f"optax's alias_test.py changed: {pattern!r} applied {n} times, not {times}"
  source = source.replace("\nclass AliasTest(", PRELUDE + "\nclass AliasTest(", 1)
  module = types.ModuleType("optax_alias_test_for_optax_paged8bit")
  module.__file__ = spec.origin
  exec(compile(source, spec.origin, "exec"), module.__dict__)
  cls = module.AliasTest
  for name in list(vars(cls)):
    if name.startswith("test_explicit_dtype"):
      delattr(cls, name)  # optax's sgd/adam/adamw only, not the optimizers under test
  return cls


AliasTest = _generated_alias_test()
assert optax_paged8bit.paged_adamw8bit and optax_paged8bit.adamw8bit
