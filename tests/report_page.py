"""A real run's report.html, rendered by headless Chromium (issue 28).

The e2e tests call `check_report(result, name, must_show)` after a real GREEN or RED: it
loads the run's report.html (from its diagnostics bundle, which outlives a prune of the
run dir), reads the rendered DOM for the verdict and each text in `must_show`, and keeps a
screenshot as BOMA_REPORT_SCREENS/<name>.png (default tests/integration/.run/report-screens).

Without Chromium the check is skipped with a printed reason, unless
BOMA_REPORT_REQUIRED=1 (.ci/run sets it after `make test-report` installed Chromium):
then a missing browser fails the test.
"""

import html
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
SCREENS = pathlib.Path(
    os.environ.get("BOMA_REPORT_SCREENS")
    or REPO / "tests" / "integration" / ".run" / "report-screens"
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def _chromium(browser, profile, *args):
    argv = [browser, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout


def check_report(result, name, must_show=()):
    """Render the run's report.html; assert its verdict and `must_show`; keep a screenshot."""
    places = [result.get("diagnostics"), pathlib.Path.home() / "integration-runs" / result["vm"]]
    pages = [pathlib.Path(p) / "report.html" for p in places if p]
    page = next((p for p in pages if p.is_file()), None)
    assert page, f"no report.html in the run's bundle: looked at {[str(p) for p in pages]}"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        assert os.environ.get("BOMA_REPORT_REQUIRED") != "1", (
            "chromium is missing (make test-report)"
        )
        print(f"report page not rendered (no chromium): {page}")
        return None
    with tempfile.TemporaryDirectory() as profile:
        dom = html.unescape(_chromium(browser, profile, "--dump-dom", page.as_uri()))
        SCREENS.mkdir(parents=True, exist_ok=True)
        shot = SCREENS / f"{name}.png"
        _chromium(
            browser, profile, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()
        )
    verdict = re.search(r'id="verdict"[^>]*>([^<]*)<', dom)
    assert verdict and verdict.group(1) == result["verdict"].upper(), "verdict not rendered"
    for text in must_show:
        assert text in dom, f"report.html does not show {text!r}"
    print(f"report page: {page}\nscreenshot: {shot}")
    return shot


if __name__ == "__main__":  # .ci/run: report_page.py RESULT_JSON NAME [MUST_SHOW...]
    import json
    import sys

    check_report(json.loads(pathlib.Path(sys.argv[1]).read_text()), sys.argv[2], sys.argv[3:])
