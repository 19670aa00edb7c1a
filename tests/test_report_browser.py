"""report.html in a real headless Chromium: it renders and every image loads; a broken image fails."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from peftlab.lab.report import TITLE, write_report
from test_report import synthetic_results

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_report_in_browser.py"
spec = importlib.util.spec_from_file_location("check_report_in_browser", SCRIPT)
browser_check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = browser_check  # dataclasses look their module up while the script runs
spec.loader.exec_module(browser_check)

if browser_check.find_chromium() is None:
    pytest.skip("no Chromium on PATH (apt-get install -y chromium)", allow_module_level=True)

PLOT_COUNT = 9  # the synthetic results have data for every non-sweep plot (the three Pareto plots included)
TRUNCATED_PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA"


@pytest.fixture(scope="module")
def html_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(synthetic_results(), tmp_path_factory.mktemp("report"))[1]


def test_report_renders_offline_with_every_image_loaded(html_path: Path) -> None:
    probe = browser_check.probe_report(html_path)
    assert browser_check.render_problems(probe, expected_images=PLOT_COUNT) == []
    assert probe.images_loaded == PLOT_COUNT
    assert probe.title == probe.heading == TITLE
    assert probe.tables_rendered >= 3  # results, environment, config


@pytest.mark.parametrize("broken_src", [TRUNCATED_PNG, "https://example.com/plot.png"],
                         ids=["truncated-png", "needs-network"])
def test_a_broken_image_fails_the_check(html_path: Path, tmp_path: Path, broken_src: str) -> None:
    page = html_path.read_text(encoding="utf-8")
    sources = re.findall(r'src="(data:image/png;base64,[^"]+)"', page)
    broken = tmp_path / "report.html"
    broken.write_text(page.replace(sources[1], broken_src), encoding="utf-8")

    probe = browser_check.probe_report(broken)

    assert probe.images_total == PLOT_COUNT and probe.images_loaded == PLOT_COUNT - 1
    assert probe.broken_images == ["Training loss"]
    assert browser_check.render_problems(probe, expected_images=PLOT_COUNT) == ["broken image: Training loss"]
    assert browser_check.main([str(broken)]) == 1
