"""report.html in a real browser (issue 28): headless Chromium renders the page of a fake
pass and of a fake red run (the fake harness, tests/conftest.py); the test reads the
rendered DOM (the verdict, the failing check, the timeline's phases) and saves a
screenshot of each to tests/integration/.run/report-screens/ (BOMA_REPORT_SCREENS).

`make test-report` runs it (and installs Debian's chromium first when root)."""

import os
import pathlib
import re
import shutil
import subprocess

import pytest
import report_page
from conftest import Harness, result_of

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENS = pathlib.Path(
    os.environ.get("BOMA_REPORT_SCREENS")
    or pathlib.Path(__file__).resolve().parent / "integration" / ".run" / "report-screens"
)
# Timings that give the timeline something to draw (seconds, as structure only).
SLOW = {
    "FAKE_APPLY_SLEEP": "0.6",
    "FAKE_RUNNING_SLEEP": "0.5",
    "FAKE_SHUTDOWN_SECONDS": "0.3",
}

if CHROMIUM is None:
    # CI (and anyone who sets it) asked for the browser: its absence is a failure there
    assert os.environ.get("BOMA_REPORT_REQUIRED") != "1", "BOMA_REPORT_REQUIRED=1: no chromium"
    pytest.skip(
        "chromium not installed (apt-get install chromium; make test-report does it as root)",
        allow_module_level=True,
    )


def _chromium(tmp_path, *args):
    argv = [CHROMIUM, *report_page.FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)


def _render(tmp_path, page, name):
    """(the rendered DOM, the screenshot's path) of a report page."""
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    SCREENS.mkdir(parents=True, exist_ok=True)
    shot = SCREENS / f"{name}.png"
    shot.unlink(missing_ok=True)
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    return dom, shot


def _text(dom, element_id):
    m = re.search(rf'id="{element_id}"[^>]*>(.*?)</', dom, re.S)
    return m.group(1) if m else None


@pytest.fixture
def hb(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def test_a_pass_renders_its_verdict_and_its_timeline(hb, tmp_path):
    p = hb.run("cycle", "--host", "askari", timeout=120, **SLOW)
    assert p.returncode == 0, p.stderr
    res = result_of(hb, p)
    dom, _ = _render(tmp_path, hb.diag / res["vm"] / "report.html", "pass")
    assert _text(dom, "verdict") == "PASS"
    labels = re.findall(r'<text class="label[^"]*"[^>]*>([^<]+)</text>', dom)
    assert [x for x in labels if not x.startswith("checkpoint")][:4] == [
        "image",
        "boot",
        "apply:site.yml",
        "apply:offsite.yml",
    ]
    assert {"verify:live", "reboot:graceful", "verify", "teardown"} <= set(labels)
    assert 'id="failures"' not in dom


def test_a_red_run_renders_the_story_and_the_failing_check(hb, tmp_path):
    p = hb.run("cycle", "--host", "askari", timeout=120, FAKE_VERIFY_FAIL="1", **SLOW)
    assert p.returncode == 1, p.stderr
    res = result_of(hb, p)
    dom, _ = _render(tmp_path, hb.diag / res["vm"] / "report.html", "red")
    assert _text(dom, "verdict") == "FAIL"
    assert "dies on reboot" in _text(dom, "story")
    assert _text(dom, "failed-stage") == "verify"
    failures = dom.split('id="failures"', 1)[1].split("</section>", 1)[0]
    assert "published :443 answers from the controller" in failures
    labels = re.findall(r'<text class="label[^"]*"[^>]*>([^<]+)</text>', dom)
    assert "verify ✗" in labels and "reboot:graceful" in labels
