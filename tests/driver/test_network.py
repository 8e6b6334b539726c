"""Network and accelerator: the libvirt network, DHCP leases, KVM or TCG."""

import os
import re
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
    assert ivm.Network.parse_lease_ip(out) == "192.168.150.42"


def test_parse_lease_ip_none_when_absent():
    assert ivm.Network.parse_lease_ip("no leases\n") is None


def test_parse_lease_ip_matches_mac_case_insensitively():
    assert ivm.Network.parse_lease_ip(LEASES, "52:54:00:11:22:33") == "192.168.150.77"
    assert ivm.Network.parse_lease_ip(LEASES, "52:54:00:AA:BB:CC") == "192.168.150.42"
    assert ivm.Network.parse_lease_ip(LEASES, "52:54:00:de:ad:00") is None


def test_parse_lease_ip_ignores_ipv6_rows():
    out = " vnet0  52:54:00:aa:bb:cc  ipv6  fe80::1/64\n"
    assert ivm.Network.parse_lease_ip(out, "52:54:00:aa:bb:cc") is None


def test_make_mac_is_libvirt_prefixed():
    assert ivm.Network.make_mac(bytes([1, 0xAB, 255])) == "52:54:00:01:ab:ff"


def test_parse_net_info_and_name_list():
    info = ivm.Network.parse_net_info(
        "Name:           boma-it\nActive:         yes\nBridge: virbr-boma\n"
    )
    assert info["active"] == "yes" and info["name"] == "boma-it"
    assert ivm.Utilities.parse_name_list("a\n\n b \n") == ["a", "b"]


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
    assert ivm.Network.classify_accel_probe(out)[0] == verdict


def test_classify_accel_probe_timeout_reason():
    assert "within 30s" in ivm.Network.classify_accel_probe("", timed_out=True, bound=30)[1]


def test_accel_probe_argv():
    a = ivm.Network.accel_probe_argv("/img/vmlinuz")
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
    assert ivm.Network.kvm_group_accessible(mode, gid, kvm_gid) is ok


# ---- the harness network's subnet (BOMA_IT_NET_SUBNET, ADR-031) --------------------------
def test_the_default_network_is_the_one_before_the_subnet_was_configurable():
    # Same text, so every booted checkpoint key made before stays valid.
    assert ivm.Network.net_xml() == ivm.Network.NET_XML
    assert "<ip address='192.168.150.1' netmask='255.255.255.0'>" in ivm.Network.NET_XML
    assert "<range start='192.168.150.10' end='192.168.150.254'/>" in ivm.Network.NET_XML


def test_a_configured_subnet_renders_the_same_shape_on_other_addresses():
    shape = ivm.Network.net_shape(ivm.Network.net_xml("10.77.5.0/24"))
    assert shape == {
        **ivm.Network.net_shape(ivm.Network.NET_XML),
        "address": "10.77.5.1",
        "dhcp": "10.77.5.10-10.77.5.254",
    }
    assert ivm.Network.net_drift(ivm.Network.NET_XML, ivm.Network.net_xml("10.77.5.0/24")) == [
        "address=192.168.150.1",
        "dhcp=192.168.150.10-192.168.150.254",
    ]


@pytest.mark.parametrize(
    "text", ["192.168.150.0/23", "192.168.150.1/24", "192.168.256.0/24", "fd00::/64", "", "x"]
)
def test_a_subnet_that_is_not_a_24_network_is_refused(text):
    with pytest.raises(ValueError, match="IPv4 /24"):
        ivm.Env.net_subnet(text)


def test_a_bad_subnet_setting_is_exit_2_before_anything_is_created(h):
    p = h.run("up", "--host", "askari", BOMA_IT_NET_SUBNET="10.0.0.0/8")
    assert p.returncode == 2, p.stderr
    line = assert_one_line_error(p)
    assert "BOMA_IT_NET_SUBNET" in line and "IPv4 /24" in line, line
    assert h.domains() == {} and not h.virsh_cmds()


def test_the_driver_defines_the_network_on_the_configured_subnet(h):
    p = h.run("up", "--host", "askari", BOMA_IT_NET_SUBNET="10.77.5.0/24")
    assert p.returncode == 0, p.stderr
    xml = h.state()["networks"]["boma-it"]["xml"]
    assert ivm.Network.net_shape(xml) == ivm.Network.net_shape(ivm.Network.net_xml("10.77.5.0/24"))
    assert h.run("down").returncode == 0


def test_the_subnet_is_an_input_of_the_booted_checkpoint(h):
    ctx = ivm.Env.ctx_from_env(h.env, ivm.Options())
    other = ivm.Env.ctx_from_env({**h.env, "BOMA_IT_NET_SUBNET": "10.77.5.0/24"}, ivm.Options())
    profile = ivm.Profiles.load_profile("askari")
    keys = [
        ivm.Checkpoints.checkpoint_chain(c, profile, "internal", "img", "tcg")[0][1]
        for c in (ctx, other)
    ]
    assert keys[0] != keys[1]


def test_the_role_defines_the_network_the_driver_would(tmp_path):
    # roles/integration_test defines boma-it on the real control node (ADR-031) and the
    # driver only finds it: a different shape would make every run redefine it.
    import jinja2
    import yaml

    role = ivm.REPO_ROOT / "roles" / "integration_test"
    rvars = yaml.safe_load((role / "vars" / "main.yml").read_text())
    # The role's vars refer to each other: resolved in passes, then rendered strictly.
    lazy, strict = jinja2.Environment(), jinja2.Environment(undefined=jinja2.StrictUndefined)
    for env in (lazy, strict):
        env.filters["comment"] = lambda text, *a, **k: "<!-- " + text + " -->"
        env.filters["regex_replace"] = lambda v, pat, rep: re.sub(pat, rep, v)
    for subnet in ("192.168.150.0/24", "10.77.5.0/24"):
        ctx = {"integration_test__network_subnet": subnet, "ansible_managed": "managed"}
        for _ in range(4):
            ctx.update(
                {k: lazy.from_string(v).render(ctx) for k, v in rvars.items() if isinstance(v, str)}
            )
        ctx["__integration_test_network_shape"] = [
            strict.from_string(v).render(ctx) for v in rvars["__integration_test_network_shape"]
        ]
        tpl = role / "templates" / "etc" / "boma-integration" / "network-boma-it.xml.j2"
        xml = strict.from_string(tpl.read_text()).render(ctx)
        assert ivm.Network.net_shape(xml) == ivm.Network.net_shape(ivm.Network.net_xml(subnet)), (
            subnet
        )
        assert ivm.Network.net_drift(xml, ivm.Network.net_xml(subnet)) == []
        # What the role looks for in libvirt's copy is in the driver's definition too.
        assert all(
            piece in ivm.Network.net_xml(subnet)
            for piece in ctx["__integration_test_network_shape"]
        )
