"""Runs a function right after a package is imported (at once if it already
is), so that optax_paged8bit adapts orbax and flax.serialization to its
states without importing either itself."""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable


class _AfterImport(importlib.abc.MetaPathFinder):
  """Finds `package` as the other finders do, then runs `install` once its
  module has executed."""

  def __init__(self, package: str, install: Callable[[], None]):
    self.package = package
    self.install = install

  def find_spec(self, fullname, path, target=None):
    if fullname != self.package:
      return None
    for finder in sys.meta_path:
      if isinstance(finder, _AfterImport) or not hasattr(finder, "find_spec"):
        continue
      spec = finder.find_spec(fullname, path, target)
      if spec is not None:
        break
    else:
      return None
    loader = spec.loader
    if loader is None or not hasattr(loader, "exec_module"):
      return spec
    exec_module = loader.exec_module
    install = self.install

    def exec_then_install(module):
      exec_module(module)
      install()

    loader.exec_module = exec_then_install
    return spec


def after_import(package: str, install: Callable[[], None]) -> None:
  """Calls `install` now if `package` is imported, else right after it is."""
  if package in sys.modules:
    install()
  elif not any(isinstance(f, _AfterImport) and f.package == package for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport(package, install))
