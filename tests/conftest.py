"""Shared test helpers."""

from __future__ import annotations

import contextlib
import os

# 8 fake CPU devices for the sharding tests (single-device tests use device 0);
# set before JAX initialises its backends.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import jax
import jax.numpy as jnp
import pytest

import optax_paged8bit as op


@contextlib.contextmanager
def raises_at_runtime(match: str):
  """Expects the custom call to fail with `match` when the result is awaited.

  JAX keeps the runtime token of the last side-effecting computation per
  device and waits for it at exit; a successful side-effecting call afterwards
  replaces the failed one so that the error is not reported twice.
  """
  with pytest.raises(Exception, match=match):
    yield
  fresh = op.paged_adamw8bit().init({"x": jnp.zeros(1)})
  jax.block_until_ready(op.export_state(fresh))
  op.release(fresh)
