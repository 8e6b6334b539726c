"""A bug only a faithful starting point shows (issue 10, ADR-028), on a real VM.

Marked `vm` (not part of `make test`); `make test-integration-image HOST=askari` runs it
with the golden image's own checks, in the harness's sandbox (scripts/it-run).

RED: base without `nftables` in its package list: the role assumes the package is
there. The old golden image carried nftables (and Docker, gnupg, python3-docker), so that
role passed every cycle; the provider's image has none of them, so the apply fails when
base validates its ruleset with `nft`, which is not installed. Made in a clone of HEAD,
never in the working tree. GREEN is the same cycle on the unedited tree
(`make test-integration HOST=askari`, which `.ci/run` runs first).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import ivm

REPO = pathlib.Path(__file__).resolve().parents[2]
CYCLE_TIMEOUT_S = int(os.environ.get("BOMA_IT_E2E_TIMEOUT", "1800"))
HOST = os.environ.get("BOMA_IT_E2E_HOST", "askari")
DEFAULTS = "roles/base/defaults/main.yml"

pytestmark = pytest.mark.vm


def test_red_a_role_that_assumes_a_package_the_providers_image_lacks(tmp_path):
    assert "nftables" not in ivm.Images.reference_packages(), (
        "the image must start where production does"
    )
    repo = tmp_path / "repo"
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(repo)], check=True, timeout=300
    )
    defaults = repo / DEFAULTS
    text = defaults.read_text()
    assert "base__packages:\n  - nftables\n" in text, (
        "base's defaults changed shape: update this test"
    )
    defaults.write_text(text.replace("base__packages:\n  - nftables\n", "base__packages:\n", 1))
    proc = subprocess.run(
        [
            sys.executable,
            str(repo / "scripts" / "integration-vm.py"),
            "cycle",
            "--host",
            HOST,
            "--expect-fail=apply",
            # No checkpoints: this edited clone's cycle would otherwise end with the
            # checkpoint gc (one chain per profile) and remove the GREEN's applied-1 and
            # applied-2 that the askari RED resumes; every CI RED so far booted cold behind
            # it (resumed `booted` only: 501-646 s). This RED fails on the image as booted.
            "--no-checkpoints",
        ],
        cwd=repo,
        timeout=CYCLE_TIMEOUT_S,
        text=True,
        capture_output=True,
    )
    sys.stderr.write(proc.stderr[-4000:])
    assert proc.returncode == 0, (
        f"base without nftables must fail its apply on the provider's image (exit 0 with "
        f"--expect-fail=apply), got {proc.returncode}"
    )
    line = proc.stdout.strip().splitlines()[-1]
    vm = next(tok for tok in line.split() if tok.startswith("boma-it-"))
    result = json.loads((repo / "tests" / "integration" / ".run" / vm / "result.json").read_text())
    assert result["verdict"] == "fail" and result["failed_stage"] == "apply:site.yml"
    # its closing lines name the apply that failed (not "verify failed"); torn down as expected
    verdict = "integration-vm: " + ivm.Reporting.closing_lines(result)["verdict"]
    assert verdict.startswith("integration-vm: apply failed: ansible-playbook site.yml failed ")
    assert proc.stderr.splitlines().count(verdict) == 1, verdict
    assert line.startswith("integration-vm: FAIL (expected fail)[apply:site.yml] "), line
    assert [f for f in result["failures"] if f.startswith("base : ")], result["failures"]
    # the reason, in the apply's own log: the nft binary the role never installed
    log = (repo / "tests" / "integration" / ".run" / vm / "logs" / "apply-site.yml.log").read_text()
    assert "nft" in log.split("PLAY RECAP")[0].split(result["failures"][-1])[-1], log[-3000:]
