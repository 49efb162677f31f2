"""Every Python example of the documentation site (docs/*.md) runs: each
page's ```python blocks, in order, in one fresh process, after the page's
hidden set-up (`<!-- docs-setup ... -->` comments, which the site does not
show: the names a guide's fragment assumes, such as params or loss_fn).

A page says what it needs in a `<!-- docs-run: ... -->` comment: `devices=N`
runs it on N fake CPU devices; `processes=N` runs N processes joined by
jax.distributed on this machine, each given DOCS_COORDINATOR,
DOCS_NUM_PROCESSES and DOCS_PROCESS_ID. Every page gets DOCS_REPO, the
repository's root. Blocks in other languages (bash, text) are not run."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def page_script(text: str) -> str:
  """The page's set-up and Python blocks, in the order they appear."""
  parts = []
  pattern = r"<!-- docs-setup\n(.*?)-->|^```python\n(.*?)^```$"
  for setup, code in re.findall(pattern, text, flags=re.S | re.M):
    parts.append(setup or code)
  return "\n".join(parts)


def page_options(text: str) -> dict[str, int]:
  found = re.search(r"<!-- docs-run: (.*?) -->", text)
  if not found:
    return {}
  return {k: int(v) for k, v in (item.split("=") for item in found.group(1).split())}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_every_page_is_in_the_site_and_the_runner_finds_code():
  index = (DOCS / "index.md").read_text()
  for page in PAGES:
    if page.stem != "index":
      assert re.search(rf"^{page.stem}$", index, re.M), f"{page.name} is in no toctree"
  with_code = {p.stem for p in PAGES if page_script(p.read_text()).strip()}
  guides = {"index", "quickstart", "flax", "checkpoints", "devices", "hosts", "memory", "qlora"}
  assert guides <= with_code, guides - with_code


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_the_page_examples_run(page, tmp_path):
  text = page.read_text()
  script = page_script(text)
  if not script.strip():
    assert "```python" not in text
    return
  options = page_options(text)
  (tmp_path / "page.py").write_text(script)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["MPLBACKEND"] = "Agg"
  env["DOCS_REPO"] = str(DOCS.parent)  # for a page's set-up that imports an example
  if "devices" in options:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={options['devices']}"
  n = options.get("processes", 1)
  env.update(DOCS_COORDINATOR=f"127.0.0.1:{free_port()}", DOCS_NUM_PROCESSES=str(n))
  runs = [
    subprocess.Popen(
      [sys.executable, "page.py"],
      cwd=tmp_path,
      env={**env, "DOCS_PROCESS_ID": str(i)},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(n)
  ]
  for i, run in enumerate(runs):
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, f"{page.name}, process {i}:\n{out[-2000:]}\n{err[-4000:]}"
