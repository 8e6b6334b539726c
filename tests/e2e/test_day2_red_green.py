"""Day 2 RED -> GREEN on real VMs (issue 11): a change applied to a RUNNING host.

Marked `vm` (not part of `make test`). Run with `make test-integration-day2 HOST=askari`
(or `make test-vm`), which wraps pytest in the harness's sandbox (scripts/it-run).

Both tests work on a clone of this repository in a temporary directory (never the
working tree): REF is the clone's HEAD (what production runs), and the change under test
is an uncommitted edit in the clone, applied with `cycle --from HEAD`.

The change: one more line in base's nftables template, so base's "reload nftables"
handler fires on a host whose Docker is up and publishing :443.
- RED: the same change, plus base's handler switched from `reloaded` to `restarted`.
  Debian's nftables.service stops with `nft flush ruleset`, which also wipes the tables
  Docker manages through iptables-nft (docker/for-linux#1472): Caddy's published :443 is
  dead on the running host. A fresh cycle cannot see it (base's handler fires before
  Docker is installed) and a reboot heals it (nftables loads before Docker starts): only
  the live verify of a day-2 run shows it, as "dead live".
- GREEN: the change alone (the handler reloads, which replaces only `table inet filter`)
  passes the live verify, both reboots, verify and idempotence; it resumes REF's
  checkpoint, which the RED run left (or used): the cache hit of `--from`.
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
TEMPLATE = "roles/base/templates/etc/nftables.conf.j2"
HANDLERS = "roles/base/handlers/main.yml"

pytestmark = pytest.mark.vm
RED_RAN = []  # the RED test ran first in this session: its REF checkpoint must be hit


def clone_with_change(tmp, restart_handler):
    """A clone of HEAD with the change under test uncommitted in its working tree."""
    dst = tmp / "repo"
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(dst)],
        check=True,
        timeout=300,
    )
    t = dst / TEMPLATE
    text = t.read_text()
    assert "\ntable inet filter {\n" in text, "base's template changed shape: update this test"
    t.write_text(
        text.replace(
            "\ntable inet filter {\n",
            "\n# day-2 change under test: one more line, so the reload handler fires\n"
            "table inet filter {\n",
            1,
        )
    )
    if restart_handler:
        h = dst / HANDLERS
        text = h.read_text()
        old = "    name: nftables.service\n    state: reloaded\n  when: base__firewall_apply"
        assert old in text, "base's reload handler changed shape: update this test"
        h.write_text(text.replace(old, old.replace("reloaded", "restarted"), 1))
    return dst


def run_clone(repo, *args):
    proc = subprocess.run(
        [sys.executable, str(repo / "scripts" / "integration-vm.py"), *args],
        cwd=repo,
        timeout=CYCLE_TIMEOUT_S,
        text=True,
        capture_output=True,
    )
    sys.stderr.write(proc.stderr[-4000:])
    return proc


def result_of(repo, proc):
    """The result.json of the run named on proc's summary line."""
    line = proc.stdout.strip().splitlines()[-1]
    vm = next(tok for tok in line.split() if tok.startswith("boma-it-"))
    return json.loads((repo / "tests" / "integration" / ".run" / vm / "result.json").read_text())


def test_day2_red_a_restarting_firewall_handler_kills_docker_live(tmp_path):
    repo = clone_with_change(tmp_path, restart_handler=True)
    proc = run_clone(repo, "cycle", "--host", HOST, "--from", "HEAD", "--expect-fail=verify:live")
    assert proc.returncode == 0, (
        "the day-2 RED must fail its LIVE verify (exit 0 with --expect-fail=verify:live): "
        f"got {proc.returncode}; if it passed, the harness cannot see a day-2 bug"
    )
    result = result_of(repo, proc)
    assert result["verdict"] == "fail" and result["failed_stage"] == "verify:live"
    assert result["story"] == "dead live"
    # its closing lines name the stage and the story; the expected failure is torn down
    verdict = "integration-vm: " + ivm.Reporting.closing_lines(result)["verdict"]
    assert verdict.startswith("integration-vm: verify failed (dead live): live verify playbook")
    assert proc.stderr.splitlines().count(verdict) == 1, verdict
    assert "kept for inspection" not in proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("integration-vm: FAIL (expected fail)[verify:live] "), summary
    assert "published :443 answers from the controller" in result["failures"]
    for healthy in ("nftables enabled and active", "docker enabled and active"):
        assert healthy not in result["failures"], f"unexpected failure: {healthy}"
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], text=True, capture_output=True, check=True
    ).stdout.strip()
    up = result["upgrade"]
    assert up["from"]["commit"] == head and up["to"] == {"commit": head, "dirty": True}
    assert any("Render and validate the host firewall ruleset" in t for t in up["changed_tasks"])
    # The evidence: Docker's iptables-nft tables are gone from the live ruleset.
    ruleset = (pathlib.Path(result["diagnostics"]) / "nft-ruleset.txt").read_text()
    assert "table inet filter" in ruleset and "chain DOCKER" not in ruleset, ruleset
    # No reboot ran: the story is the live host's.
    assert not [p for p in result["phase_details"] if p["name"].startswith("reboot:")]
    RED_RAN.append(result["vm"])


def test_day2_green_the_change_alone_survives_the_running_host_and_reboots(tmp_path):
    repo = clone_with_change(tmp_path, restart_handler=False)
    proc = run_clone(repo, "cycle", "--host", HOST, "--from", "HEAD")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = result_of(repo, proc)
    assert result["verdict"] == "pass" and result["story"] is None
    if RED_RAN:  # REF's state came from the checkpoint the RED run left or used: a hit
        assert (result.get("resumed_from") or {}).get("stage") == "applied-2", result.get(
            "resumed_from"
        )
    assert any(
        "Render and validate the host firewall ruleset" in t
        for t in result["upgrade"]["changed_tasks"]
    )
    names = [p["name"] for p in result["phase_details"] if p["status"] == "pass"]
    assert names.index("verify:live") < names.index("reboot:graceful") < names.index("verify")
    assert result["idempotence"]["changed"] == 0
