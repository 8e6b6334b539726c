"""Network and accelerator: the libvirt network, DHCP leases, KVM or TCG."""

import os
import time

import pytest
from conftest import BOUNDS, assert_one_line_error, ivm

LEASES = (
    " Name       MAC address          Protocol     Address\n"
    "-------------------------------------------------------------------\n"
    " vnet0      52:54:00:aa:bb:cc    ipv4         192.168.150.42/24\n"
    " vnet1      52:54:00:11:22:33    ipv4         192.168.150.77/24\n"
)


def test_lease_never_comes(h):
    t0 = time.monotonic()
    p = h.run("cycle", "--host", "askari", FAKE_NO_LEASE="1")
    elapsed = time.monotonic() - t0
    assert p.returncode == 3, p.stderr
    line = assert_one_line_error(p)
    assert "dhcp-lease" in line and "timed out after 2s" in line, line  # the 1.5 s bound
    assert "console log:" in line
    (res,) = h.results()
    # The wait ends at its bound, not 12 s later: the boot phase (define, start, the lease
    # wait) and the whole run stay within the bound plus the fakes' start-up costs.
    assert res["phases"]["boot"] < BOUNDS["DHCP_LEASE"] + 5, res["phases"]
    assert elapsed < BOUNDS["DHCP_LEASE"] + 10
    assert res["verdict"] == "error" and res["failed_stage"] == "dhcp-lease"
    vm = res["vm"]
    # infra error: diagnostics (host side + NOTE), then teardown of what this run created
    diag = h.diag / vm
    assert "could not be collected" in (diag / "NOTE").read_text()
    assert (diag / "domain.xml").is_file() and (diag / "SUMMARY.txt").is_file()
    assert h.domains() == {}
    assert not (h.cache / "runs" / vm).exists()
    assert not h.calls("ansible-playbook")


def test_accel_auto_probes_once_and_caches(h):
    kvm = h.tmp / "kvm"
    kvm.write_text("")
    os.chmod(kvm, 0o666)
    env = {
        "BOMA_IT_ACCEL": "auto",
        "BOMA_IT_KVM_DEV": str(kvm),
        "BOMA_IT_BOOT_ID_PATH": str(h.tmp / "host-boot-id"),
    }
    (h.tmp / "host-boot-id").write_text("b1\n")
    p = h.run("up", "--host", "askari", **env)
    assert p.returncode == 0, p.stderr
    assert "accel: kvm (KVM probe booted a kernel" in p.stderr
    vi = [c["argv"] for c in h.calls("virt-install") if "--print-xml" in c["argv"]][0]
    assert vi[vi.index("--virt-type") + 1] == "kvm"
    assert h.run("down").returncode == 0
    p2 = h.run("up", "--host", "askari", **env, FAKE_ACCEL_OUTPUT="KVM internal error. Suberror: 1")
    assert "[cached]" in p2.stderr and len(h.calls("qemu-system-x86_64")) == 1
    assert h.run("down").returncode == 0
    (h.tmp / "host-boot-id").write_text("b2\n")  # host rebooted: probe again
    p3 = h.run("up", "--host", "askari", **env, FAKE_ACCEL_OUTPUT="KVM internal error. Suberror: 1")
    assert "accel: tcg (KVM probe failed: 'KVM internal error')" in p3.stderr
    assert len(h.calls("qemu-system-x86_64")) == 2


def test_accel_auto_without_dev_kvm_is_tcg_unprobed(h):
    p = h.run("up", "--host", "askari", BOMA_IT_ACCEL="auto")
    assert p.returncode == 0, p.stderr
    assert "absent; not probed" in p.stderr and not h.calls("qemu-system-x86_64")


def test_parse_lease_ip_extracts_ipv4():
    out = (
        " Name       MAC address          Protocol     Address\n"
        "-------------------------------------------------------------------\n"
        " vnet0      52:54:00:aa:bb:cc    ipv4         192.168.150.42/24\n"
    )
    assert ivm.parse_lease_ip(out) == "192.168.150.42"


def test_parse_lease_ip_none_when_absent():
    assert ivm.parse_lease_ip("no leases\n") is None


def test_parse_lease_ip_matches_mac_case_insensitively():
    assert ivm.parse_lease_ip(LEASES, "52:54:00:11:22:33") == "192.168.150.77"
    assert ivm.parse_lease_ip(LEASES, "52:54:00:AA:BB:CC") == "192.168.150.42"
    assert ivm.parse_lease_ip(LEASES, "52:54:00:de:ad:00") is None


def test_parse_lease_ip_ignores_ipv6_rows():
    out = " vnet0  52:54:00:aa:bb:cc  ipv6  fe80::1/64\n"
    assert ivm.parse_lease_ip(out, "52:54:00:aa:bb:cc") is None


def test_make_mac_is_libvirt_prefixed():
    assert ivm.make_mac(bytes([1, 0xAB, 255])) == "52:54:00:01:ab:ff"


def test_parse_net_info_and_name_list():
    info = ivm.parse_net_info("Name:           boma-it\nActive:         yes\nBridge: virbr-boma\n")
    assert info["active"] == "yes" and info["name"] == "boma-it"
    assert ivm.parse_name_list("a\n\n b \n") == ["a", "b"]


@pytest.mark.parametrize(
    "out,verdict",
    [
        ("[0.9] VFS: Cannot open root device\n[0.9] Kernel panic - not syncing", "kvm"),
        ("Kernel panic - not syncing: Unable to mount root fs", "kvm"),
        ("KVM internal error. Suberror: 1\nemulation failure\n", "tcg"),
        ("qemu: Could not access KVM kernel module: Permission denied", "tcg"),
        ("qemu-system-x86_64: failed to initialize kvm: No such file", "tcg"),
        ("[0.1] Linux version 6.1\n", "tcg"),
        ("", "tcg"),
    ],
)
def test_classify_accel_probe(out, verdict):
    assert ivm.classify_accel_probe(out)[0] == verdict


def test_classify_accel_probe_timeout_reason():
    assert "within 30s" in ivm.classify_accel_probe("", timed_out=True, bound=30)[1]


def test_accel_probe_argv():
    a = ivm.accel_probe_argv("/img/vmlinuz")
    assert a[:3] == ["qemu-system-x86_64", "-accel", "kvm"]
    assert a[a.index("-kernel") + 1] == "/img/vmlinuz" and "-no-reboot" in a
    assert "root=/dev/nonexistent" in a[a.index("-append") + 1]


@pytest.mark.parametrize(
    "mode,gid,kvm_gid,ok",
    [
        (0o020666, 0, 108, True),
        (0o020660, 108, 108, True),
        (0o020660, 0, 108, False),
        (0o020600, 0, 108, False),
        (0o020660, 108, None, False),
    ],
)
def test_kvm_group_accessible(mode, gid, kvm_gid, ok):
    assert ivm.kvm_group_accessible(mode, gid, kvm_gid) is ok
