"""RED -> GREEN proof that the control node's harness survives its own firewall (ADR-031).

These tests boot real VMs, so they are marked `vm` and are not part of `make test`.
Run them with `make test-integration-control` (RED and GREEN in one pytest call), which
wraps pytest in the harness's sandbox (scripts/it-run); `make test-integration-red
HOST=ubongo` runs the RED alone.

GREEN: the ubongo profile (base's firewall live + integration_test) survives a graceful
reboot and a power cut: libvirtd and the harness network come back, a network-namespace
guest on it gets a DHCP lease, resolves a name through the host's dnsmasq and reaches the
controller through the NAT, and `input` and `forward` are still policy drop.
RED: the same cycle without integration_test's 20-boma-harness.nft must FAIL verify for
the right reason: the guest gets no lease (base's input chain drops DHCP to dnsmasq),
while the firewall, libvirtd and the network are healthy; the diagnostics bundle holds the
ruleset and dnsmasq's log. If RED passes, the harness is not faithful: fix the harness,
not this test.
"""

import os
import pathlib
import sys

import pytest
import vm_runs
from report_page import check_report
from vm_runs import filter_chain, libvirt_domains, newest_result

# One ubongo cycle under TCG is ~15-20 minutes (libvirt and QEMU install in the guest);
# the driver bounds every stage itself, this is a last resort for a wedged run.
CYCLE_TIMEOUT_S = int(os.environ.get("BOMA_IT_E2E_TIMEOUT", "2700"))
HOST = "ubongo"  # the control node has one profile pair, whatever BOMA_IT_E2E_HOST says

# verify-ubongo.yml's checks.
GUEST_LEASE = "guest gets a DHCP lease from the host's dnsmasq"
GUEST_DNS = "guest resolves a name through the host's dnsmasq"
GUEST_NAT = "guest reaches the controller through the NAT"
HEALTH = (
    "nftables enabled and active",
    "input chain still default-deny",
    "forward chain still default-deny",
    "libvirtd enabled and active",
    "harness network active and autostarted",
    "every tool the harness calls is installed",
    "libvirt starts a QEMU domain on the harness network",
)

pytestmark = pytest.mark.vm


def run_driver(*args):
    return vm_runs.run_driver(*args, timeout=CYCLE_TIMEOUT_S)


def checks(result, key):
    return {t["name"]: t["status"] for t in result.get(key) or []}


def test_green_control_node_keeps_its_harness_through_both_reboots():
    proc = run_driver("cycle", "--host", HOST)
    sys.stderr.write(proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = newest_result(HOST)
    assert result["verdict"] == "pass"
    assert result["phases"]["reboot"] > 0, "a GREEN run must include a real reboot"
    assert [d["mode"] for d in result["reboot_diffs"]] == ["graceful", "hard"]
    for diff in result["reboot_diffs"]:
        assert diff["unexpected"] == [], diff
        after = (pathlib.Path(diff["dir"]) / "after" / "nft-ruleset.txt").read_text()
        # After each reboot: still default-deny, with the harness bridge's openings.
        assert "policy drop" in filter_chain(after, "input")
        assert 'iifname "virbr-boma" udp dport { 53, 67 } accept' in filter_chain(after, "input")
        assert "policy drop" in filter_chain(after, "forward")
        assert 'iifname "virbr-boma" accept' in filter_chain(after, "forward")
    # The guest's checks passed live and after the reboots.
    for key in ("verify_live_tasks", "verify_tasks"):
        seen = checks(result, key)
        for name in (GUEST_LEASE, GUEST_DNS, GUEST_NAT) + HEALTH:
            assert seen.get(name) == "ok", (key, name, seen)
    assert result["vm"] not in libvirt_domains(), "a passing cycle must destroy its VM"
    check_report(result, f"{HOST}-green", [GUEST_LEASE, "reboot:hard"])


def test_red_control_node_without_the_dropin_fails_at_the_guest():
    proc = run_driver("cycle", "--host", f"{HOST}-regression")
    sys.stderr.write(proc.stderr[-4000:])
    assert proc.returncode == 1, (
        f"the regression profile must fail verify (exit 1), got {proc.returncode}: if it "
        "passed, the harness does not see base's firewall cut the harness network"
    )
    result = newest_result(f"{HOST}-regression")
    assert result["verdict"] == "fail"
    # The drop-in is missing as soon as the applies end: the live verify fails.
    assert result["failed_stage"] == "verify:live" and result["story"] == "dead live"
    failures = " ".join(result.get("failures", []))
    assert GUEST_LEASE in failures, failures
    assert GUEST_NAT in failures, failures
    # Nothing else may be broken: the reason is base's chains, not a dead host.
    for healthy in HEALTH:
        assert healthy not in failures, f"unexpected failure: {healthy}"
    diag = pathlib.Path(result["diagnostics"])
    ruleset = (diag / "nft-ruleset.txt").read_text()
    for name in ("input", "forward"):
        chain = filter_chain(ruleset, name)
        assert "policy drop" in chain and "virbr-boma" not in chain, f"{name}:\n{chain}"
    # dnsmasq's log is in the bundle: it never saw the guest's DHCPDISCOVER.
    dnsmasq = (diag / "dnsmasq.log").read_text()
    assert "DHCPDISCOVER(virbr-boma)" not in dnsmasq, dnsmasq[-2000:]
    assert not [p for p in result["phase_details"] if p["name"].startswith("reboot:")]
    check_report(result, f"{HOST}-red", [GUEST_LEASE, "dead live"])
    # The VM is kept for inspection on a verify failure; this test cleans up after itself.
    assert run_driver("prune").returncode == 0
