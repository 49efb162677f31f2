"""Opens pages of the built documentation site in headless Chromium (Qt's
WebEngine, from the PyQt6-WebEngine wheel: no browser to install) and fails
on a page that does not load, an asset it asks for that is missing or not
part of the site (the site must work offline), a console error or warning,
or a page with no content.

Usage: python docs/check_site.py docs/_build/html [PAGE ...]
(default pages: index.html and quickstart.html)
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--no-sandbox --disable-gpu")

from PyQt6.QtCore import QEventLoop, QTimer, QUrl
from PyQt6.QtWebEngineCore import (
  QWebEnginePage,
  QWebEngineProfile,
  QWebEngineSettings,
  QWebEngineUrlRequestInterceptor,
)
from PyQt6.QtWidgets import QApplication


class Requests(QWebEngineUrlRequestInterceptor):
  """Every URL the pages ask for."""

  def __init__(self):
    super().__init__()
    self.urls: list[str] = []

  def interceptRequest(self, info):
    self.urls.append(info.requestUrl().toString())


class Page(QWebEnginePage):
  def __init__(self, profile, problems):
    super().__init__(profile)
    self.problems = problems

  def javaScriptConsoleMessage(self, level, message, line, source):
    if level != QWebEnginePage.JavaScriptConsoleMessageLevel.InfoMessageLevel:
      self.problems.append(f"console {level.name}: {message} ({source}:{line})")


def check(site: pathlib.Path, pages: list[str]) -> list[str]:
  app = QApplication(sys.argv[:1])  # noqa: F841 (kept alive while the pages load)
  profile = QWebEngineProfile()
  requests = Requests()
  profile.setUrlRequestInterceptor(requests)
  # A page of the site may ask for remote assets (that is what is checked);
  # Chromium would otherwise block them before they reach the interceptor.
  profile.settings().setAttribute(
    QWebEngineSettings.WebAttribute.LocalContentCanAccessRemoteUrls, True
  )
  problems: list[str] = []
  for name in pages:
    path = site / name
    if not path.is_file():
      problems.append(f"{name}: not in the built site")
      continue
    page_problems: list[str] = []
    page = Page(profile, page_problems)
    requests.urls.clear()
    result = {}
    loop = QEventLoop()

    def finished(ok, page=page, result=result, loop=loop):
      result["ok"] = ok
      page.runJavaScript(
        "document.body ? document.body.innerText.length : 0",
        lambda n: (result.__setitem__("text", n), loop.quit()),
      )

    page.loadFinished.connect(finished)
    page.load(QUrl.fromLocalFile(str(path.resolve())))
    QTimer.singleShot(60_000, loop.quit)
    loop.exec()
    if not result.get("ok"):
      page_problems.append("did not load")
    if result.get("text", 0) < 200:
      page_problems.append(f"shows {result.get('text', 0)} characters of text")
    for url in requests.urls:
      local = QUrl(url).toLocalFile()
      if not QUrl(url).isLocalFile():
        page_problems.append(f"asks for an asset outside the site: {url}")
      elif not os.path.exists(local):
        page_problems.append(f"asset missing: {local}")
    problems += [f"{name}: {p}" for p in page_problems]
    print(f"{name}: loaded, {len(requests.urls)} requests, {len(page_problems)} problems")
  return problems


def main() -> None:
  site = pathlib.Path(sys.argv[1])
  pages = sys.argv[2:] or ["index.html", "quickstart.html"]
  problems = check(site, pages)
  for problem in problems:
    print(problem)
  sys.exit(1 if problems else 0)


if __name__ == "__main__":
  main()
