#!/usr/bin/env python3
"""Open a report.html in headless Chromium and check that it renders and that every image loads.

The report itself has no JS, so the check loads a copy with a probe script added before </body>. On
the window's load event (which fires only once every image has loaded or failed) the probe writes a
JSON summary into the DOM: the title, how many tables got laid out, how many images there are, and
which are broken (not decoded, naturalWidth 0, or laid out with no size). ``--dump-dom`` prints the
DOM after that and the summary is parsed back. A missing summary (page or script never ran) is a
failure too, so the check cannot pass by saying nothing. DNS is mapped to nowhere, so an image that
needs the network counts as broken: the report must work offline.

Usage: check_report_in_browser.py REPORT.html [--expect-images N]
Exit status: 0 all good, 1 problems (printed), 2 no Chromium found.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: anything fetched from the network fails
    "--virtual-time-budget=10000",  # let pending work finish before the DOM is dumped
)
PROBE_ID = "peftlab-render-probe"
PROBE_SCRIPT = f"""<script>
window.addEventListener("load", function () {{
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) {{
    var box = img.getBoundingClientRect();
    return !(img.complete && img.naturalWidth > 0 && box.width > 0 && box.height > 0);
  }});
  var tables = Array.prototype.slice.call(document.querySelectorAll("table"));
  var probe = document.createElement("pre");
  probe.id = "{PROBE_ID}";
  probe.textContent = JSON.stringify({{
    title: document.title,
    heading: (document.querySelector("h1") || {{}}).textContent || "",
    tables_rendered: tables.filter(function (t) {{ return t.getBoundingClientRect().height > 0; }}).length,
    images_total: images.length,
    broken_images: broken.map(function (img) {{ return img.alt || img.src.slice(0, 60); }})
  }});
  document.body.appendChild(probe);
}});
</script>"""


class BrowserCheckError(RuntimeError):
    """Chromium did not produce a probe result: it failed to start, crashed, or the page never loaded."""


@dataclass(frozen=True)
class RenderProbe:
    title: str
    heading: str
    tables_rendered: int
    images_total: int
    broken_images: list[str]

    @property
    def images_loaded(self) -> int:
        return self.images_total - len(self.broken_images)


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def probe_report(html_path: Path, chromium: str | None = None, timeout_s: float = 90) -> RenderProbe:
    """Load html_path (a probed copy of it) in headless Chromium and return what the page reported."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise BrowserCheckError(f"no Chromium found on PATH (looked for {', '.join(CHROMIUM_NAMES)})")
    page = Path(html_path).read_text(encoding="utf-8")
    body_end = page.lower().rfind("</body>")
    probed = page[:body_end] + PROBE_SCRIPT + page[body_end:] if body_end >= 0 else page + PROBE_SCRIPT
    with tempfile.TemporaryDirectory(prefix="peftlab-browser-") as scratch:
        copy = Path(scratch) / "report.html"
        copy.write_text(probed, encoding="utf-8")
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={Path(scratch) / 'profile'}", "--dump-dom",
                   copy.as_uri()]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            raise BrowserCheckError(f"Chromium did not finish within {timeout_s:g} s") from error
    match = re.search(rf'<pre id="{PROBE_ID}">(.*?)</pre>', done.stdout, re.DOTALL)
    if match is None:
        stderr_tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise BrowserCheckError(f"no probe result in the page (Chromium exit {done.returncode}):\n{stderr_tail}")
    return RenderProbe(**json.loads(html.unescape(match.group(1))))


def render_problems(probe: RenderProbe, expected_images: int | None = None) -> list[str]:
    """Everything wrong with a probed page; empty when it rendered with every image loaded."""
    problems = [f"broken image: {name}" for name in probe.broken_images]
    if expected_images is not None and probe.images_total != expected_images:
        problems.append(f"{probe.images_total} images on the page, expected {expected_images}")
    if not probe.heading.strip():
        problems.append("no visible <h1> heading")
    if probe.tables_rendered == 0:
        problems.append("no table was laid out")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the report.html to check")
    parser.add_argument("--expect-images", type=int, help="fail unless the page has exactly this many images")
    args = parser.parse_args(argv)
    if find_chromium() is None:
        print("no Chromium found; install it, e.g. apt-get install -y chromium", file=sys.stderr)
        return 2
    try:
        probe = probe_report(args.report)
    except BrowserCheckError as error:
        print(f"FAIL: {error}", file=sys.stderr)
        return 1
    problems = render_problems(probe, args.expect_images)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if not problems:
        print(f"OK: {probe.title!r} rendered, {probe.tables_rendered} tables, "
              f"{probe.images_loaded}/{probe.images_total} images loaded")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
