import pathlib

from conftest import load_script

ivm = load_script("integration-vm.py", "integration_vm")


# ---- spec Task 2 (verbatim) -------------------------------------------------------
def test_valid_tiers():
    assert ivm.VALID_TIERS == ("internal", "le-staging", "le-prod-wildcard")


# ---- spec Task 3 (verbatim) -------------------------------------------------------
def test_vm_name_prefix_and_suffix():
    assert ivm.vm_name("askari", "ab12cd34") == "boma-it-askari-ab12cd34"


def test_vm_name_generates_suffix():
    n = ivm.vm_name("askari")
    assert n.startswith("boma-it-askari-") and len(n.split("-")[-1]) == 8


def test_free_mib_parses_memavailable():
    sample = "MemTotal:       16331156 kB\nMemAvailable:    8388608 kB\n"
    assert ivm.free_mib(sample) == 8192


def test_parse_lease_ip_extracts_ipv4():
    out = (
        " Name       MAC address          Protocol     Address\n"
        "-------------------------------------------------------------------\n"
        " vnet0      52:54:00:aa:bb:cc    ipv4         192.168.150.42/24\n"
    )
    assert ivm.parse_lease_ip(out) == "192.168.150.42"


def test_parse_lease_ip_none_when_absent():
    assert ivm.parse_lease_ip("no leases\n") is None


# ---- spec Task 4 (verbatim) -------------------------------------------------------
def test_meta_data_has_instance_and_hostname():
    md = ivm.render_meta_data("iid-askari-x", "boma-it-askari-x")
    assert "instance-id: iid-askari-x" in md
    assert "local-hostname: boma-it-askari-x" in md


def test_user_data_injects_key_and_ansible_user():
    ud = ivm.render_user_data("ssh-ed25519 AAAA... claude@ubongo", "ansible")
    assert ud.startswith("#cloud-config")
    assert "name: ansible" in ud
    assert "ssh-ed25519 AAAA... claude@ubongo" in ud
    assert "NOPASSWD:ALL" in ud


# ---- spec Task 5 (verbatim) -------------------------------------------------------
def test_cert_file_valid_tier():
    p = ivm.cert_file("le-staging")
    assert p.name == "le-staging.yml" and p.parent.name == "certs"


def test_cert_file_rejects_bad_tier():
    import pytest

    with pytest.raises(ValueError):
        ivm.cert_file("bogus")


def test_render_run_hosts_single_host_in_groups():
    out = ivm.render_run_hosts("boma-it-askari-x", "192.168.150.42", "ansible", ["offsite_hosts"])
    inv = json.loads(out)  # JSON: Ansible's yaml inventory plugin reads it
    assert inv == {
        "all": {
            "children": {
                "offsite_hosts": {
                    "hosts": {
                        "boma-it-askari-x": {
                            "ansible_host": "192.168.150.42",
                            "ansible_user": "ansible",
                        }
                    }
                }
            }
        }
    }
    # invariant: the real askari host must NOT appear
    assert ivm.inventory_host_names(out) == {"boma-it-askari-x"}


# =====================================================================================
# Beyond the spec: every pure helper
# =====================================================================================
import json  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fakes"
LEASES = (
    " Name       MAC address          Protocol     Address\n"
    "-------------------------------------------------------------------\n"
    " vnet0      52:54:00:aa:bb:cc    ipv4         192.168.150.42/24\n"
    " vnet1      52:54:00:11:22:33    ipv4         192.168.150.77/24\n"
)


# ---- names, leases, meminfo ---------------------------------------------------------
def test_parse_lease_ip_matches_mac_case_insensitively():
    assert ivm.parse_lease_ip(LEASES, "52:54:00:11:22:33") == "192.168.150.77"
    assert ivm.parse_lease_ip(LEASES, "52:54:00:AA:BB:CC") == "192.168.150.42"
    assert ivm.parse_lease_ip(LEASES, "52:54:00:de:ad:00") is None


def test_parse_lease_ip_ignores_ipv6_rows():
    out = " vnet0  52:54:00:aa:bb:cc  ipv6  fe80::1/64\n"
    assert ivm.parse_lease_ip(out, "52:54:00:aa:bb:cc") is None


def test_free_mib_missing_field_is_zero():
    assert ivm.free_mib("MemTotal: 1 kB\n") == 0


def test_make_mac_is_libvirt_prefixed():
    assert ivm.make_mac(bytes([1, 0xAB, 255])) == "52:54:00:01:ab:ff"


def test_render_current_spec_format():
    assert ivm.render_current("boma-it-a-1", "10.0.0.2", "a").splitlines() == [
        "boma-it-a-1",
        "10.0.0.2",
        "a",
    ]


# ---- cloud-init -------------------------------------------------------------------
def test_user_data_with_host_key_block():
    priv = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAA\nBBB\n-----END OPENSSH PRIVATE KEY-----\n"
    ud = ivm.render_user_data(
        "ssh-ed25519 CLIENT c",
        "ansible",
        host_key_private=priv,
        host_key_public="ssh-ed25519 HOSTPUB h\n",
    )
    assert "  ed25519_private: |\n    -----BEGIN OPENSSH PRIVATE KEY-----\n    AAA\n    BBB\n" in ud
    assert "  ed25519_public: ssh-ed25519 HOSTPUB h\n" in ud
    assert "ssh_genkeytypes: [ed25519]" in ud and "manage_etc_hosts: true" in ud
    assert "package_update: false" in ud and "ssh_pwauth" not in ud


def test_user_data_without_host_key_has_no_ssh_keys():
    assert "ssh_keys" not in ivm.render_user_data("ssh-ed25519 K c", "ansible")


# ---- inventory ------------------------------------------------------------------------
def test_render_run_hosts_host_vars_are_strings():
    out = ivm.render_run_hosts(
        "vm",
        "10.0.0.2",
        "ansible",
        ["g1", "g2"],
        host_vars={"ansible_ssh_common_args": "-o A='b\"c'", "ansible_port": 2222},
    )
    groups = json.loads(out)["all"]["children"]
    assert sorted(groups) == ["g1", "g2"]
    for g in groups.values():
        assert g["hosts"]["vm"]["ansible_ssh_common_args"] == "-o A='b\"c'"
        assert g["hosts"]["vm"]["ansible_port"] == "2222"


def test_inventory_host_names_of_rendered_inventory():
    out = ivm.render_run_hosts(
        "boma-it-x-1", "1.2.3.4", "ansible", ["a", "b"], host_vars={"ansible_port": 22}
    )
    assert ivm.inventory_host_names(out) == {"boma-it-x-1"}


def test_inventory_host_names_sees_a_smuggled_real_host():
    inv = json.dumps(
        {
            "all": {
                "children": {
                    "offsite_hosts": {
                        "hosts": {
                            "boma-it-x-1": {"ansible_host": "1.2.3.4"},
                            "askari": {"ansible_host": "77.42.120.136"},
                        }
                    },
                    "g": {"children": {"h": {"hosts": ["third"]}}},
                },
                "hosts": {"other": {}},
            }
        }
    )
    assert ivm.inventory_host_names(inv) == {"boma-it-x-1", "askari", "other", "third"}
    with pytest.raises(ivm.InfraError) as e:
        ivm.assert_single_host_inventory(inv, "boma-it-x-1")
    assert e.value.stage == "inventory"


def test_single_host_guard_refuses_an_inventory_that_is_not_json():
    with pytest.raises(ivm.InfraError) as e:
        ivm.assert_single_host_inventory("all:\n  hosts:\n    boma-it-x-1:\n", "boma-it-x-1")
    assert e.value.stage == "inventory"


def test_extra_vars_order(tmp_path):
    (tmp_path / "certs").mkdir()
    vault = tmp_path / "vault.yml"
    prof = {"extra_vars_files": ["overrides/a.yml", "overrides/b.yml"]}
    files = ivm.extra_vars_files(prof, "le-staging", tmp_path, vault)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "overrides/a.yml",
        "overrides/b.yml",
        "certs/le-staging.yml",
    ]
    vault.write_text("x: 1\n")
    assert ivm.extra_vars_files(prof, "internal", tmp_path, vault)[-1] == vault


@pytest.mark.parametrize("tier", ["le-staging", "le-prod-wildcard"])
def test_real_secret_tiers_never_get_the_fake_vault_values(tmp_path, tier):
    # Their Caddy needs the real Gandi token: the production vault is loaded instead.
    vault = tmp_path / "vault.yml"
    vault.write_text("x: 1\n")
    files = ivm.extra_vars_files({"extra_vars_files": []}, tier, tmp_path, vault)
    assert vault not in files and files[-1].name == f"{tier}.yml"
    assert tier in ivm.REAL_SECRET_TIERS and "internal" not in ivm.REAL_SECRET_TIERS


# ---- argv builders ------------------------------------------------------------------
def test_ssh_options_pin_the_host_key():
    opts = ivm.ssh_options("/r", "boma-it-x-1", 2222)
    joined = " ".join(opts)
    assert "StrictHostKeyChecking=yes" in joined and "StrictHostKeyChecking=no" not in joined
    assert "UserKnownHostsFile=/r/known_hosts" in joined and "HostKeyAlias=boma-it-x-1" in joined
    assert "IdentitiesOnly=yes" in joined and "BatchMode=yes" in joined
    assert opts[opts.index("-i") + 1] == "/r/id_ed25519" and opts[-2:] == ["-p", "2222"]


def test_ssh_argv_ends_with_destination_and_command():
    a = ivm.ssh_argv("/r", "vm", "10.0.0.2", "cloud-init status --wait")
    assert a[0] == "ssh" and a[-2:] == ["ansible@10.0.0.2", "cloud-init status --wait"]


def test_ansible_ssh_args_keeps_multiplexing_and_pinning():
    s = ivm.ansible_ssh_args("/r", "vm")
    assert s.startswith("-o ControlMaster=auto -o ControlPersist=60s")
    assert "StrictHostKeyChecking=yes" in s and "-p" not in s.split()


def test_known_hosts_line_uses_alias():
    assert ivm.known_hosts_line("vm", "ssh-ed25519 AAAA comment\n") == "vm ssh-ed25519 AAAA\n"


def test_virsh_argv_always_connects():
    assert ivm.virsh_argv("qemu:///system", "domstate", "x") == [
        "virsh",
        "--connect",
        "qemu:///system",
        "domstate",
        "x",
    ]


def test_ssh_keygen_and_disk_argv():
    assert ivm.ssh_keygen_argv("/r/k", "c") == [
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "c",
        "-f",
        "/r/k",
    ]
    assert ivm.qemu_img_overlay_argv("/g.qcow2", "/o.qcow2") == [
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "/g.qcow2",
        "/o.qcow2",
    ]
    assert ivm.cloud_localds_argv("/s", "/u", "/m") == ["cloud-localds", "/s", "/u", "/m"]


def test_choose_osinfo():
    assert ivm.choose_osinfo("debian12\ndebian13, debiantesting\n") == "debian13"
    assert ivm.choose_osinfo("debian11\ndebian12\n") == "debian12"
    assert ivm.choose_osinfo("debian11, debianbullseye\ndebian10, debianbuster\n") == "debian11"
    assert ivm.choose_osinfo("fedora40\n") == "detect=on,require=off"
    assert ivm.choose_osinfo("") == "detect=on,require=off"


def _vi(**kw):
    base = dict(
        uri="qemu:///system",
        name="vm",
        mem_mib=2048,
        vcpus=2,
        overlay="/c/o.qcow2",
        seed="/c/seed.img",
        mac="52:54:00:01:02:03",
        console_log="/c/console.log",
        virt_type="qemu",
        osinfo="debian13",
    )
    base.update(kw)
    return ivm.virt_install_argv(**base)


def test_virt_install_argv_boots_the_disk():
    a = _vi()
    assert a[:3] == ["virt-install", "--connect", "qemu:///system"]
    assert "--import" in a and a[-1] == "--print-xml"
    assert "path=/c/o.qcow2,format=qcow2,bus=virtio" in a
    assert "path=/c/seed.img,format=raw,bus=virtio,readonly=on" in a
    assert "network=boma-it,model=virtio,mac=52:54:00:01:02:03" in a
    assert a[a.index("--serial") + 1] == "pty,log.file=/c/console.log"
    assert a[a.index("--virt-type") + 1] == "qemu" and a[a.index("--graphics") + 1] == "none"
    assert "--boot" not in a  # the disk's own GRUB and kernel (ADR-028)


def test_ansible_playbook_argv_requires_limit():
    a = ivm.ansible_playbook_argv(
        "/v/ansible-playbook",
        "/r/inventory/hosts.yml",
        "/p/site.yml",
        "vm",
        ["base"],
        ["/x.yml", "/y.yml"],
    )
    assert a == [
        "/v/ansible-playbook",
        "-i",
        "/r/inventory/hosts.yml",
        "/p/site.yml",
        "--limit",
        "vm",
        "--tags",
        "base",
        "-e",
        "@/x.yml",
        "-e",
        "@/y.yml",
    ]
    with pytest.raises(ivm.InfraError):
        ivm.ansible_playbook_argv("ap", "inv", "pb", "", [], [])


def test_ansible_env():
    env = ivm.ansible_env(
        {"PATH": "/bin", "ANSIBLE_SSH_ARGS": "-o StrictHostKeyChecking=no"},
        "/repo",
        "/repo/run/vm",
        "vm",
    )
    assert env["PATH"] == "/bin" and env["ANSIBLE_CONFIG"] == "/repo/ansible.cfg"
    assert env["ANSIBLE_CACHE_PLUGIN_CONNECTION"] == "/repo/run/vm/facts"
    assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True"
    assert "StrictHostKeyChecking=no" not in env["ANSIBLE_SSH_ARGS"]


# ---- profiles ---------------------------------------------------------------------
def _profiles(tmp_path, **files):
    (tmp_path / "tests" / "integration" / "profiles").mkdir(parents=True, exist_ok=True)
    (tmp_path / "tests" / "integration" / "overrides").mkdir(exist_ok=True)
    (tmp_path / "playbooks").mkdir(exist_ok=True)
    for pb in ("site.yml", "offsite.yml"):
        (tmp_path / "playbooks" / pb).write_text("---\n")
    for f in ("a.yml", "a-reg.yml"):
        (tmp_path / "tests" / "integration" / "overrides" / f).write_text("---\n")
    (tmp_path / "tests" / "integration" / "verify.yml").write_text("---\n")
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2)
        (tmp_path / "tests" / "integration" / "profiles" / f"{name}.json").write_text(text)
    return lambda host: ivm.load_profile(
        host, tmp_path / "tests" / "integration" / "profiles", tmp_path
    )


BASE = {
    "groups": ["offsite_hosts"],
    "applies": [{"playbook": "site.yml", "tags": ["base"]}],
    "extra_vars_files": ["overrides/a.yml"],
    "mem_mib": 2048,
    "vcpus": 2,
}


def test_load_profile_defaults(tmp_path):
    p = _profiles(tmp_path, askari={"groups": ["g"], "applies": [{"playbook": "site.yml"}]})(
        "askari"
    )
    assert p["mem_mib"] == ivm.DEFAULT_MEM_MIB and p["vcpus"] == ivm.DEFAULT_VCPUS
    assert p["reboot"] == ["graceful"] and p["verify"] == "tests/integration/verify.yml"
    assert p["extra_vars_files"] == [] and p["name"] == "askari"


def test_load_profile_extends_appends_extra_vars_and_replaces_lists(tmp_path):
    load = _profiles(
        tmp_path,
        askari=BASE,
        **{
            "askari-regression": {
                "extends": "askari",
                "extra_vars_files": ["overrides/a-reg.yml"],
                "groups": ["x", "y"],
                "reboot": ["graceful", "hard"],
                "_comment": "ignored",
            }
        },
    )
    p = load("askari-regression")
    assert p["extra_vars_files"] == ["overrides/a.yml", "overrides/a-reg.yml"]
    assert p["groups"] == ["x", "y"] and p["applies"] == BASE["applies"]
    assert p["reboot"] == ["graceful", "hard"] and "extends" not in p
    assert p["name"] == "askari-regression"


@pytest.mark.parametrize(
    "files,host,needle",
    [
        ({}, "ghost", "no profile tests/integration/profiles/ghost.json (known: none)"),
        ({"a": BASE}, "ghost", "(known: a)"),
        ({"a": '{\n  "groups": ["x"],\n  "applies": [\n}'}, "a", "invalid JSON at line 4"),
        ({"a": "[1, 2]"}, "a", "top level must be a JSON object"),
        ({"a": {"groups": ["x"]}}, "a", "missing required key 'applies'"),
        ({"a": {**BASE, "vcpus": "2"}}, "a", "key 'vcpus' must be int, got str"),
        ({"a": {**BASE, "vcpus": True}}, "a", "key 'vcpus' must be int, got bool"),
        ({"a": {**BASE, "groups": "offsite_hosts"}}, "a", "key 'groups' must be list"),
        ({"a": {**BASE, "groups": ["bad-group"]}}, "a", "invalid group name"),
        ({"a": {**BASE, "applies": [{"tags": ["x"]}]}}, "a", "'applies[0].playbook' missing"),
        (
            {"a": {**BASE, "applies": [{"playbook": "site.yml", "tags": "base"}]}},
            "a",
            "applies[0].tags",
        ),
        (
            {"a": {**BASE, "applies": [{"playbook": "site.yml", "tgas": []}]}},
            "a",
            "unknown keys ['tgas']",
        ),
        (
            {"a": {**BASE, "applies": [{"playbook": "nope.yml"}]}},
            "a",
            "playbooks/nope.yml, which does not exist",
        ),
        (
            {"a": {**BASE, "extra_vars_files": ["overrides/nope.yml"]}},
            "a",
            "tests/integration/overrides/nope.yml",
        ),
        (
            {"a": {**BASE, "verify": "tests/nope.yml"}},
            "a",
            "verify playbook tests/nope.yml does not exist",
        ),
        (
            {"a": {**BASE, "reboot": ["soft"]}},
            "a",
            "key 'reboot' entries must be one of graceful, hard",
        ),
        ({"a": {**BASE, "mem_mib": 64}}, "a", "key 'mem_mib' must be >= 512"),
        ({"a": {**BASE, "memory": 1}}, "a", "unknown key 'memory'"),
        ({"a": {"extends": "b"}, "b": {"extends": "a"}}, "a", "'extends' cycle (a -> b -> a)"),
        ({"a": {"extends": "ghost"}}, "a", "key 'extends' names 'ghost'"),
        ({"a": BASE}, "../etc/passwd", "invalid host name"),
    ],
)
def test_load_profile_errors_name_file_and_key(tmp_path, files, host, needle):
    load = _profiles(tmp_path, **files)
    with pytest.raises(ivm.UsageError) as e:
        load(host)
    assert needle in str(e.value)
    assert e.value.exit_code == 2


def test_bad_profile_type_error_names_the_file_that_set_it(tmp_path):
    load = _profiles(tmp_path, a=BASE, b={"extends": "a", "vcpus": "many"})
    with pytest.raises(ivm.UsageError) as e:
        load("b")
    assert "profiles/b.json" in str(e.value)


def test_merge_profiles_is_shallow():
    m = ivm.merge_profiles(
        {"groups": ["a"], "extra_vars_files": ["x"], "mem_mib": 1},
        {"groups": ["b"], "extra_vars_files": ["y"], "extends": "p"},
    )
    assert m == {"groups": ["b"], "extra_vars_files": ["x", "y"], "mem_mib": 1}


def test_repo_profiles_load():
    """The profiles other engineers commit must pass the driver's validation."""
    for p in sorted(ivm.PROFILE_DIR.glob("*.json")):
        prof = ivm.load_profile(p.stem)
        assert prof["groups"] and prof["applies"]


# ---- metadata -------------------------------------------------------------------------
def test_metadata_roundtrip():
    x = ivm.render_metadata_xml(
        "2026-11-25T18:00:00+00:00/vm",
        "2026-11-25T18:00:00+00:00",
        "askari",
        "claude",
        host="askari",
    )
    m = ivm.parse_metadata_xml(x)
    assert m == {
        "id": "2026-11-25T18:00:00+00:00/vm",
        "created_at": "2026-11-25T18:00:00+00:00",
        "profile": "askari",
        "owner": "claude",
        "host": "askari",
    }


def test_metadata_parse_as_virsh_prints_it():
    out = (
        '<boma:run xmlns:boma="https://boma.invalid/integration-vm" id="r1" '
        'created_at="t" profile="p" owner="o"/>\n'
    )
    assert ivm.parse_metadata_xml(out)["id"] == "r1"


@pytest.mark.parametrize(
    "text",
    ["", "error: metadata not found", "<run/>", '<x:run xmlns:x="https://other.invalid" id="1"/>'],
)
def test_metadata_parse_rejects_foreign(text):
    assert ivm.parse_metadata_xml(text) is None


def test_metadata_escapes_attributes():
    x = ivm.render_metadata_xml('a"<b', "t", "p&q", "o")
    assert ivm.parse_metadata_xml(x)["id"] == 'a"<b' and ET.fromstring(x) is not None


@pytest.mark.parametrize(
    "dom",
    [
        "<domain type='kvm'>\n  <name>vm</name>\n</domain>\n",
        "<domain type='kvm'>\n  <name>vm</name>\n  <metadata/>\n</domain>\n",
        "<domain type='kvm'>\n  <name>vm</name>\n"
        "  <metadata>\n    <x:y xmlns:x='u'/>\n  </metadata>\n</domain>\n",
    ],
)
def test_add_domain_metadata(dom):
    meta = ivm.render_metadata_xml("id1", "t", "p", "o")
    out = ivm.add_domain_metadata(dom, meta)
    root = ET.fromstring(out)
    found = root.find(f"metadata/{{{ivm.METADATA_URI}}}run")
    assert found is not None and found.get("id") == "id1"
    assert ivm.domain_name_from_xml(out) == "vm"


def test_add_domain_metadata_rejects_non_domain():
    with pytest.raises(ivm.InfraError):
        ivm.add_domain_metadata("garbage", "<m/>")


def test_parse_net_info_and_name_list():
    info = ivm.parse_net_info("Name:           boma-it\nActive:         yes\nBridge: virbr-boma\n")
    assert info["active"] == "yes" and info["name"] == "boma-it"
    assert ivm.parse_name_list("a\n\n b \n") == ["a", "b"]


# ---- ansible output ---------------------------------------------------------------------
REAL = (FIXTURES / "ansible-verify-loop.txt").read_text()
VM = "boma-it-askari-1234abcd"


def test_parse_recap_real_output():
    assert ivm.parse_recap(REAL) == {
        VM: {
            "ok": 4,
            "changed": 2,
            "unreachable": 0,
            "failed": 1,
            "skipped": 0,
            "rescued": 0,
            "ignored": 1,
        }
    }


def test_parse_recap_sums_several_plays_and_hosts():
    out = (
        "h1 : ok=1 changed=1 unreachable=0 failed=0\n"
        "h2 : ok=1 changed=0 unreachable=0 failed=0 skipped=1 rescued=0 ignored=0\n"
        "h1 : ok=2 changed=3 unreachable=0 failed=0 skipped=0 rescued=0 ignored=0\n"
    )
    r = ivm.parse_recap(out)
    assert r["h1"]["changed"] == 4 and r["h1"]["ok"] == 3 and r["h2"]["skipped"] == 1


def test_parse_task_results_real_output():
    tasks = {t[0]: t for t in ivm.parse_task_results(REAL, VM)}
    assert tasks["Probe something"][1] == "ok"
    assert tasks["Change one thing"][1] == "changed"
    assert tasks["Ignored failure"][1] == "ok"  # ...ignoring
    name = "Assert the host's outcomes after the reboot"
    assert tasks[name][1] == "failed"
    assert [(lb, st) for lb, st, _ in tasks[name][3]] == [
        ("nftables enabled and active", "ok"),
        ("forward chain admits container traffic", "failed"),
        ("published :443 answers from the controller", "failed"),
    ]
    assert (
        tasks[name][3][1][2]
        == "FAILED forward chain admits container traffic: pure drop (no accept)"
    )
    assert ivm.failed_task_names(REAL, VM) == [name]
    assert ivm.parse_task_results(REAL, "some-other-host")[0][1] == "skipped"


def test_verify_checks_expand_loop_items():
    checks = ivm.verify_checks(REAL, VM)
    failed = [n for n, s, _ in checks if s == "failed"]
    assert failed == [
        "forward chain admits container traffic",
        "published :443 answers from the controller",
    ]
    assert ("a", "ok", "") in checks and ("Change one thing", "changed", "") in checks


def test_parse_task_results_fatal_single_line_and_delegation():
    out = (
        "TASK [Probe :443] ***\n"
        'fatal: [vm -> localhost]: FAILED! => {"changed": false, "msg": "Connection timed out"}\n'
        "TASK [next] ***\nskipping: [vm]\n"
    )
    (t1, t2) = ivm.parse_task_results(out, "vm")
    assert t1[:3] == ("Probe :443", "failed", "Connection timed out")
    assert t2[1] == "skipped"


# ---- results / summary / junit -------------------------------------------------------
def _result(**kw):
    r = ivm.new_result("cycle", "askari")
    r.update(vm="boma-it-askari-1a2b3c4d", accel="tcg", total_seconds=412.3, verdict="pass")
    r["phase_details"] = [
        {"name": "image", "seconds": 0.2, "status": "pass"},
        {"name": "boot", "seconds": 31.0, "status": "pass"},
        {"name": "apply:site.yml", "seconds": 200.0, "status": "pass"},
        {"name": "apply:offsite.yml", "seconds": 50.0, "status": "pass"},
        {"name": "reboot:graceful", "seconds": 28.0, "status": "pass"},
        {"name": "verify", "seconds": 12.0, "status": "pass"},
        {"name": "teardown", "seconds": 2.0, "status": "pass"},
    ]
    r.update(kw)
    return r


def test_result_shape_is_json_and_has_the_agreed_keys():
    r = ivm.new_result("cycle", "askari")
    json.dumps(r)
    for k in (
        "verdict",
        "failed_stage",
        "phases",
        "phase_details",
        "vm",
        "ip",
        "accel",
        "diagnostics",
        "exit_code",
        "failures",
        "verify_tasks",
        "total_seconds",
    ):
        assert k in r


def test_phase_totals_group_families():
    t = ivm.phase_totals(_result()["phase_details"])
    assert t == {
        "image": 0.2,
        "boot": 31.0,
        "apply": 250.0,
        "reboot": 28.0,
        "verify": 12.0,
        "teardown": 2.0,
    }
    assert list(t) == ["image", "boot", "apply", "reboot", "verify", "teardown"]


def test_format_summary_pass():
    assert ivm.format_summary(_result()) == (
        "integration-vm: PASS askari boma-it-askari-1a2b3c4d accel=tcg total=412s "
        "(image 0s, boot 31s, apply 250s, reboot 28s, verify 12s, teardown 2s)"
    )


def test_format_summary_failure_names_stage():
    s = ivm.format_summary(_result(verdict="error", failed_stage="dhcp-lease", vm=None))
    assert s.startswith("integration-vm: ERROR[dhcp-lease] askari - accel=tcg")


def test_format_bench_table():
    t = ivm.format_bench_table(_result())
    lines = t.splitlines()
    assert lines[0].split() == ["phase", "seconds", "status"]
    assert lines[3].split() == ["apply:site.yml", "200.0", "pass"]
    assert lines[-1].split() == ["total", "412.3", "pass"]


def test_render_junit_well_formed_with_failures():
    r = _result(verdict="fail", failed_stage="verify")
    r["phase_details"][5].update(status="fail", message="verify playbook failed at: x")
    r["verify_tasks"] = [
        {"name": "docker <active>", "status": "ok", "message": ""},
        {"name": "published :443", "status": "failed", "message": "timed out & dead"},
    ]
    root = ET.fromstring(ivm.render_junit(r))
    suite = root.find("testsuite")
    assert suite.get("name") == "integration-vm.askari"
    assert suite.get("tests") == "9" and suite.get("failures") == "2" and suite.get("errors") == "0"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["verify: published :443"].find("failure").get("message") == "timed out & dead"
    assert cases["boot"].find("failure") is None and cases["boot"].get("time") == "31.000"


def test_render_junit_infra_error_without_phases():
    r = ivm.new_result("cycle", "askari")
    r.update(verdict="error", failed_stage="libvirt", message="libvirtd not reachable")
    suite = ET.fromstring(ivm.render_junit(r)).find("testsuite")
    assert suite.get("errors") == "1"
    assert suite.find("testcase").get("name") == "libvirt"


# ---- accelerator ------------------------------------------------------------------------
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


def test_stage_bounds_scale_for_tcg_and_env_wins():
    kvm = ivm.stage_bounds("kvm", {})
    tcg = ivm.stage_bounds("tcg", {"BOMA_IT_TIMEOUT_DHCP_LEASE": "7"})
    assert tcg["cloud-init"] == kvm["cloud-init"] * ivm.TCG_SCALE
    assert tcg["virsh"] == kvm["virsh"] and tcg["dhcp-lease"] == 7.0


# ---- golden image recipe ------------------------------------------------------------------
def test_seal_spec_contents():
    s = ivm.seal_spec()
    f = s["files"]
    assert f["etc/machine-id"] == ""
    assert f["etc/fstab"] == "LABEL=root / ext4 defaults 0 1\n"
    cfg = f["etc/cloud/cloud.cfg.d/90-boma.cfg"]
    assert "datasource_list: [NoCloud, None]" in cfg
    assert "etc/ssh/ssh_host_*" in s["remove_globs"]
    links = s["symlinks"]
    assert links["etc/systemd/system/multi-user.target.wants/systemd-networkd.service"].endswith(
        "/systemd-networkd.service"
    )
    assert "etc/systemd/system/multi-user.target.wants/systemd-resolved.service" in links


def test_image_key_is_stable():
    assert ivm.image_key(ivm.image_inputs()) == ivm.image_key(ivm.image_inputs())
    assert len(ivm.image_key(ivm.image_inputs())) == 16


@pytest.mark.parametrize(
    "mutate",
    [
        lambda i: i.update(suite="forky"),
        lambda i: i.update(mirror="http://mirror.example/debian"),
        lambda i: i.update(packages=i["packages"] + ["vim"]),
        lambda i: i["seal"]["files"].update({"etc/fstab": "x"}),
        lambda i: i["seal"]["symlinks"].pop("etc/resolv.conf"),
        lambda i: i.update(recipe_version=i["recipe_version"] + 1),
        lambda i: i.update(disk_size="16G"),
        lambda i: i.update(kernel_args="quiet"),
    ],
)
def test_image_key_changes_with_each_input(mutate):
    inputs = ivm.image_inputs()
    before = ivm.image_key(inputs)
    mutate(inputs)
    assert ivm.image_key(inputs) != before


def test_fetch_key_differs_from_build_key():
    assert ivm.image_key(ivm.fetch_inputs()) != ivm.image_key(ivm.image_inputs())


def test_image_build_argv():
    a = ivm.mmdebstrap_argv("trixie", "/t/root", "http://deb.debian.org/debian", ["a", "b"])
    assert a[0] == "mmdebstrap" and "--variant=minbase" in a and "--include=a,b" in a
    assert a[-3:] == ["trixie", "/t/root", "http://deb.debian.org/debian"]
    assert ivm.mkfs_argv("/t/root", "/t/disk.raw", 8 << 30) == [
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        "root",
        "-E",
        "offset=1048576",
        "-d",
        "/t/root",
        "/t/disk.raw",
        f"{(8 << 20) - 1024}k",
    ]
    assert ivm.qemu_img_convert_argv("/t/r", "/t/q") == [
        "qemu-img",
        "convert",
        "-O",
        "qcow2",
        "/t/r",
        "/t/q",
    ]


def test_size_bytes():
    assert ivm.size_bytes("8G") == 8 * 1024**3 and ivm.size_bytes("512") == 512
    with pytest.raises(ValueError):
        ivm.size_bytes("8 GB")


def test_find_boot_file_resolves_symlink_inside_root(tmp_path):
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "vmlinuz-6.12.9-cloud-amd64").write_text("new")
    (tmp_path / "boot" / "vmlinuz-6.12.10-cloud-amd64").write_text("newer")
    assert ivm.find_boot_file(tmp_path, "vmlinuz", "vmlinuz").name == "vmlinuz-6.12.10-cloud-amd64"
    (tmp_path / "vmlinuz").symlink_to("/boot/vmlinuz-6.12.9-cloud-amd64")  # absolute: re-rooted
    assert (
        ivm.find_boot_file(tmp_path, "vmlinuz", "vmlinuz")
        == tmp_path / "boot" / "vmlinuz-6.12.9-cloud-amd64"
    )
    assert ivm.find_boot_file(tmp_path, "initrd.img", "initrd.img") is None


def test_apply_seal(tmp_path):
    (tmp_path / "etc" / "ssh").mkdir(parents=True)
    (tmp_path / "etc" / "ssh" / "ssh_host_rsa_key").write_text("k")
    (tmp_path / "etc" / "ssh" / "sshd_config").write_text("c")
    (tmp_path / "etc" / "machine-id").write_text("abc\n")
    (tmp_path / "etc" / "resolv.conf").write_text("nameserver 1.1.1.1\n")
    ivm.apply_seal(tmp_path, ivm.seal_spec())
    assert not (tmp_path / "etc" / "ssh" / "ssh_host_rsa_key").exists()
    assert (tmp_path / "etc" / "ssh" / "sshd_config").exists()
    assert (tmp_path / "etc" / "machine-id").read_text() == ""
    assert (tmp_path / "etc" / "resolv.conf").is_symlink()
    assert (tmp_path / "etc" / "apt" / "apt.conf.d" / "20auto-upgrades").is_file()
    ivm.apply_seal(tmp_path, ivm.seal_spec())  # idempotent


def test_expected_sha():
    text = "abc123  debian-13-genericcloud-amd64.qcow2\ndef456 *other.raw\nbad line here x\n"
    assert ivm._expected_sha(text, "debian-13-genericcloud-amd64.qcow2") == "abc123"
    assert ivm._expected_sha(text, "other.raw") == "def456"
    assert ivm._expected_sha(text, "missing.qcow2") is None


# ---- the process runner (real /bin processes, no hypervisor) ------------------------------
def test_run_times_out_and_kills_the_group():
    import time

    t0 = time.monotonic()
    r = ivm.run([sys_executable(), "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert r.timed_out and r.returncode == 124 and time.monotonic() - t0 < 0.5 + 3.5


def test_run_missing_tool_is_infra_error():
    with pytest.raises(ivm.InfraError) as e:
        ivm.run(["definitely-not-a-tool-xyz"], timeout=5)
    assert e.value.stage == "tools" and e.value.exit_code == 3


def test_run_check_names_stage():
    with pytest.raises(ivm.InfraError) as e:
        ivm.run(
            [sys_executable(), "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(4)"],
            timeout=10,
            check=True,
            stage="boot",
        )
    assert e.value.stage == "boot" and "exit 4" in e.value.msg and "boom" in e.value.msg


def test_run_stream_log_tees(tmp_path, capsys):
    log = tmp_path / "p.log"
    r = ivm.run(
        [sys_executable(), "-c", "print('hello'); import sys; print('err', file=sys.stderr)"],
        timeout=10,
        stream_log=log,
    )
    assert "hello" in r.stdout and "err" in r.stdout
    assert "hello" in log.read_text() and "hello" in capsys.readouterr().err


def sys_executable():
    import sys

    return sys.executable


# ---- rendered YAML parses to the intended structure (PyYAML comes with ansible in the
# venv; the DRIVER never imports it) -----------------------------------------------------
def test_rendered_inventory_is_valid_yaml():
    yaml = pytest.importorskip("yaml")
    args = ivm.ansible_ssh_args("/r un/vm", "vm")
    inv = yaml.safe_load(
        ivm.render_run_hosts(
            "boma-it-a-1",
            "192.168.150.9",
            "ansible",
            ["offsite_hosts", "docker_hosts"],
            host_vars={"ansible_ssh_common_args": args},
        )
    )
    for g in ("offsite_hosts", "docker_hosts"):
        hosts = inv["all"]["children"][g]["hosts"]
        assert list(hosts) == ["boma-it-a-1"]
        assert hosts["boma-it-a-1"]["ansible_ssh_common_args"] == args
        assert hosts["boma-it-a-1"]["ansible_host"] == "192.168.150.9"


def test_rendered_user_data_is_valid_cloud_config():
    yaml = pytest.importorskip("yaml")
    priv = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    ud = yaml.safe_load(ivm.render_user_data("ssh-ed25519 C c", "ansible", priv, "ssh-ed25519 H h"))
    assert ud["users"][0]["name"] == "ansible"
    assert ud["users"][0]["ssh_authorized_keys"] == ["ssh-ed25519 C c"]
    assert ud["ssh_keys"]["ed25519_private"] == priv
    assert ud["ssh_keys"]["ed25519_public"] == "ssh-ed25519 H h"
    assert ud["ssh_genkeytypes"] == ["ed25519"] and ud["manage_etc_hosts"] is True
    md = yaml.safe_load(ivm.render_meta_data("iid-x", "boma-it-x"))
    assert md == {"instance-id": "iid-x", "local-hostname": "boma-it-x"}


def test_cloud_cfg_is_valid_yaml():
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load(ivm.CLOUD_CFG)
    assert cfg == {"datasource_list": ["NoCloud", "None"]}  # network, growpart: cloud-init's


# ---- what a reboot changed (issue 5) -------------------------------------------------
GUEST = FIXTURES / "guest"
NONCE = "0123456789ab"


def _nft_items():
    return json.loads((GUEST / "nft-ruleset.json").read_text())["nftables"]


def _nft(items):
    return json.dumps({"nftables": items})


def _capture(**sections):
    """Capture-script output with the given {name: (rc, out)} sections."""
    out = []
    for name, (rc, body) in sections.items():
        out += [f"@@boma-{NONCE} begin {name}", body, "", f"@@boma-{NONCE} end {name} {rc} "]
    return "\n".join(out) + "\n"


def test_capture_script_bounds_every_command_and_runs_as_one_script():
    s = ivm.render_capture_script(NONCE, 30.4)
    assert s.startswith(f"M='@@boma-{NONCE}'\nT=30\n") and s.rstrip().endswith("exit 0")
    assert 'timeout -k 2 "$T" "$@" </dev/null' in s  # bounded, and never eats the script
    for sec in (
        "boot_id",
        "port_range",
        "nft_json",
        "nft_text",
        "docker",
        "containers",
        "sockets",
        "failed_units",
        "enabled_units",
        "enabled_active",
    ):
        assert f"sec {sec} " in s
    for cmd in (
        "nft -j list ruleset",
        "nft list ruleset",
        "ss -H -tulnp",
        "docker ps --format '{{.Names}} {{.Ports}}'",
        "systemctl --failed --plain --no-legend --no-pager",
        "systemctl list-unit-files --state=enabled --type=service --no-legend --no-pager",
        "systemctl is-active $units",
    ):
        assert cmd in s
    assert "sudo" not in s  # the whole script runs under ONE `sudo -n sh -s`
    assert ivm.render_capture_script(NONCE, 0.2).splitlines()[1] == "T=1"
    assert s.count("timeout -k 2") <= ivm.CAPTURE_COMMANDS


def _stub_guest(tmp_path, docker="running"):
    """A PATH with stub guest commands and only the real tools the script needs."""
    import shutil
    import textwrap

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("timeout", "mktemp", "awk", "head", "tr", "cat", "rm", "echo", "sh"):
        (bin_ / tool).symlink_to(shutil.which(tool))
    stubs = {
        "systemd-analyze": f"""case $1 in
                   time) cat {GUEST / "systemd-analyze-time.txt"} ;;
                   blame) cat {GUEST / "systemd-analyze-blame.txt"} ;;
                   critical-chain) echo 'multi-user.target @1min 2.1s' ;;
                   esac""",
        # nft reads stdin: if the script did not shield it, the rest of the script is eaten
        "nft": f"""cat >/dev/null
                   if [ "$1" = -j ]; then cat {GUEST / "nft-ruleset.json"}
                   else cat {GUEST / "nft-ruleset.txt"}; fi""",
        "ss": f"cat {GUEST / 'ss-tulnp.txt'}",
        "docker": f"""case $1 in
                   ps) cat {GUEST / "docker-ps.txt"} ;;
                   inspect) [ "$4" = caddy ] && echo '/caddy 172.18.0.2 ' ;;
                   esac""",
        "systemctl": f"""case "$*" in
                   "is-active --quiet docker.service") [ "{docker}" = running ] ;;
                   --failed*) echo 'fstrim.service loaded failed failed Discard unused blocks' ;;
                   list-unit-files*) cat {GUEST / "list-unit-files.txt"} ;;
                   is-active*) shift; for u in "$@"; do
                                 case $u in
                                   *@*) echo "bad unit $u" >&2; exit 1 ;;
                                   sshd-keygen*) echo inactive ;;
                                   *) echo active ;;
                                 esac
                               done; exit 3 ;;
                   esac""",
    }
    for name, body in stubs.items():
        if name == "docker" and docker == "absent":
            continue
        (bin_ / name).write_text("#!/bin/sh\n" + textwrap.dedent(body) + "\n")
        (bin_ / name).chmod(0o755)
    return bin_


def st_boot(secs):
    return ivm.boot_analysis(secs)


@pytest.mark.parametrize("docker", ["running", "stopped", "absent"])
def test_capture_script_runs_under_sh_and_parses(tmp_path, docker):
    import subprocess

    bin_ = _stub_guest(tmp_path, docker)
    p = subprocess.run(
        ["/bin/sh", "-s"],
        input=ivm.render_capture_script(NONCE, 5),
        env={"PATH": str(bin_)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    secs = ivm.parse_capture_output(p.stdout, NONCE)
    assert set(secs) == {
        "boot_id",
        "port_range",
        "nft_json",
        "nft_text",
        "docker",
        "sockets",
        "failed_units",
        "enabled_units",
        "enabled_active",
        "boot_time",
        "boot_blame",
        "boot_chain",
    } | ({"containers"} if docker == "running" else set())
    assert st_boot(secs)["startup"]["total"] == 66.001
    assert st_boot(secs)["blame_top"][0] == [30.811, "docker.service"]
    assert secs["enabled_active"]["rc"] == 3  # is-active: some unit inactive
    st = ivm.normalise_capture(secs, own_ips=["192.168.150.42"])
    assert st["boot_id"] and len(st["boot_id"]) == 36
    cats = st["categories"]
    assert "rule inet filter forward: meta iifname docker0 accept" in cats["nft"]
    dnat = 'rule ip nat DOCKER: iifname != "br-d2b0beece4b3" tcp dport 443 counter dnat to {}:443'
    assert dnat.format("<caddy>" if docker == "running" else "172.18.0.2") in cats["nft"]
    assert "table inet filter" in st["nft_text"]
    assert cats["failed_units"] == ["fstrim.service"]
    assert "sshd-keygen.service inactive" in cats["services"]
    assert "docker.service active" in cats["services"]
    assert not any(ln.startswith("getty@") for ln in cats["services"])  # template left out
    assert "udp VM_IP%enp1s0:68 systemd-network" in cats["sockets"]
    assert (
        cats["ports"]
        == {
            "running": ivm.normalise_docker_ports((GUEST / "docker-ps.txt").read_text()),
            "stopped": ["docker: not running"],
            "absent": ["docker: absent"],
        }[docker]
    )


def test_parse_capture_output_rc_stderr_and_cut_off():
    text = (
        f"noise before\n@@boma-{NONCE} begin a\nline 1\n\n@@boma-{NONCE} end a 0 \n"
        f"@@boma-{NONCE} begin b\n@@boma-ffffffffffff end b 0\n\n"
        f"@@boma-{NONCE} end b 1 nft: Operation not permitted \n"
        f"@@boma-{NONCE} begin c\npartial"
    )
    s = ivm.parse_capture_output(text, NONCE)
    assert s["a"] == {"rc": 0, "out": "line 1", "err": ""}
    # a marker with another nonce is content, not structure
    assert s["b"] == {
        "rc": 1,
        "out": "@@boma-ffffffffffff end b 0",
        "err": "nft: Operation not permitted",
    }
    assert s["c"]["rc"] is None and s["c"]["out"] == "partial"
    assert ivm.parse_capture_output("", NONCE) == {}


@pytest.mark.parametrize(
    "expr,text",
    [
        (
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}},
            "meta iifname docker0",
        ),
        (
            {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "br-1"}},
            "meta oifname != br-1",
        ),
        (
            {
                "match": {
                    "op": "in",
                    "left": {"ct": {"key": "state"}},
                    "right": ["related", "established"],
                }
            },
            "ct state { established, related }",
        ),
        (
            {
                "match": {
                    "op": "==",
                    "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                    "right": {"set": [8443, 443, 80]},
                }
            },
            "tcp dport { 80, 443, 8443 }",
        ),
        (
            {
                "match": {
                    "op": "==",
                    "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                    "right": {"prefix": {"addr": "172.17.0.0", "len": 16}},
                }
            },
            "ip saddr 172.17.0.0/16",
        ),
        (
            {
                "match": {
                    "op": ">=",
                    "left": {"payload": {"base": "th", "offset": 16, "len": 16}},
                    "right": {"range": [1024, 2048]},
                }
            },
            "@th,16,16 >= 1024-2048",
        ),
        (
            {
                "match": {
                    "op": "==",
                    "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                    "right": "local",
                }
            },
            "fib daddr type local",
        ),
        ({"counter": {"packets": 812, "bytes": 99211}}, "counter"),
        ({"counter": "named"}, "counter name named"),
        ({"jump": {"target": "DOCKER"}}, "jump DOCKER"),
        ({"accept": None}, "accept"),
        ({"masquerade": None}, "masquerade"),
        ({"dnat": {"addr": "172.18.0.2", "port": 443}}, "dnat to 172.18.0.2:443"),
        (
            {"dnat": {"family": "ip", "addr": "172.18.0.2", "port": 443}},
            "dnat ip to 172.18.0.2:443",
        ),
        ({"xt": {"type": "match", "name": "addrtype"}}, "xt match addrtype"),
        ({"log": {"prefix": "nft drop: "}}, 'log {"prefix":"nft drop: "}'),
        ({"reject": None}, "reject"),
        ({"last": {"used": 1234}}, "last"),
        (
            {"set": [{"elem": {"val": "10.0.0.1", "timeout": 60, "expires": 17}}]},
            '{ 10.0.0.1 {"timeout":60} }',
        ),
    ],
)
def test_nft_expr_text(expr, text):
    assert ivm.nft_expr_text(expr) == text


def test_normalise_nft_json_drops_volatile_fields():
    text = (GUEST / "nft-ruleset.json").read_text()
    lines = ivm.normalise_nft_json(text)
    joined = "\n".join(lines)
    for gone in ("handle", "packets", "bytes", "metainfo", "Bullmoose"):
        assert gone not in joined
    assert lines[0] == "table inet filter"  # tables sorted, not in creation order
    assert [ln for ln in lines if ln.startswith("table")] == [
        "table inet filter",
        "table ip filter",
        "table ip nat",
    ]
    fwd = lines.index("chain inet filter forward {type filter hook forward prio 0 policy drop}")
    assert lines[fwd + 1 : fwd + 6] == [
        "rule inet filter forward: ct state { established, related } accept",
        "rule inet filter forward: meta iifname docker0 accept",
        "rule inet filter forward: meta oifname docker0 accept",
        "rule inet filter forward: meta iifname br-* accept",
        "rule inet filter forward: meta oifname br-* accept",
    ]
    assert 'rule inet filter input: tcp dport 22 accept comment "ssh"' in lines
    # iptables-nft's compat expressions are opaque in JSON (no DNAT destination) ...
    assert (
        "rule ip nat DOCKER: meta iifname != br-d2b0beece4b3 tcp dport 443 counter xt target DNAT"
    ) in lines
    assert "chain ip nat POSTROUTING {type nat hook postrouting prio 100 policy accept}" in lines
    assert "chain ip filter DOCKER-USER" in lines
    # ... the text listing translates them; with it, those rules say where they go
    full = ivm.normalise_nft_json(text, None, (GUEST / "nft-ruleset.txt").read_text())
    assert [ln for ln in full if "xt " in ln] == []
    assert (
        'rule ip nat DOCKER: iifname != "br-d2b0beece4b3" tcp dport 443 counter '
        "dnat to 172.18.0.2:443"
    ) in full
    assert (
        'rule ip filter FORWARD: oifname "docker0" ct state related,established counter accept'
    ) in full
    assert "rule ip nat PREROUTING: fib daddr type local counter jump DOCKER" in full
    # only the 12 xt rules (addrtype, conntrack, DNAT, MASQUERADE) are taken from the text
    assert len(full) == len(lines)
    assert all(" xt " in ln for ln in set(lines) - set(full)) and len(set(full) - set(lines)) == 12


def _rebooted(items, boots=2):
    """What the same ruleset looks like after a reboot: base's table loaded first,
    Docker's rules re-created in another order, new handles and counter values."""
    items = json.loads(json.dumps(items))
    meta = [i for i in items if "metainfo" in i]
    inet = [i for i in items if "metainfo" not in i and list(i.values())[0]["family"] == "inet"]
    docker = [i for i in items if "metainfo" not in i and i not in inet]
    docker = [i for i in docker if "rule" not in i] + [i for i in docker if "rule" in i][::-1]
    out = meta + inet + docker
    for i in out:
        obj = list(i.values())[0]
        if "handle" in obj:
            obj["handle"] += 100 * boots
        for e in obj.get("expr", []):
            if "counter" in e:
                e["counter"] = {"packets": 7 * boots, "bytes": 999 * boots}
    return out


def test_normalise_nft_json_is_blind_to_what_a_reboot_reorders():
    items = _nft_items()
    assert ivm.normalise_nft_json(_nft(items)) == ivm.normalise_nft_json(_nft(_rebooted(items)))


def test_parse_nft_text_rules():
    text = """# Warning: table ip nat is managed by iptables-nft, do not touch!
table ip nat {
	chain DOCKER {
		iifname "docker0" counter packets 3 bytes 180 return
		iifname != "br-1" tcp dport 443 counter packets 0 bytes 0 dnat to 172.18.0.2:443
	}

	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		comment "a chain comment"
		ip saddr 172.18.0.0/16 oifname != "br-1" counter packets 0 bytes 0 masquerade
	}
}
table inet f {
	set allow {
		type ipv4_addr
		flags interval
		elements = { 10.0.0.0/8, 192.168.1.1,
\t\t\t     192.168.1.2 }
	}

	chain input {
		type filter hook input priority filter; policy drop;
		ip saddr @allow tcp dport { 22, 443 } accept
	}

	chain empty {
	}
}
"""
    assert ivm.parse_nft_text_rules(text) == {
        ("ip", "nat", "DOCKER"): [
            'iifname "docker0" counter return',
            'iifname != "br-1" tcp dport 443 counter dnat to 172.18.0.2:443',
        ],
        ("ip", "nat", "POSTROUTING"): [
            'ip saddr 172.18.0.0/16 oifname != "br-1" counter masquerade'
        ],
        ("inet", "f", "input"): ["ip saddr @allow tcp dport { 22, 443 } accept"],
        ("inet", "f", "empty"): [],
    }
    assert ivm.parse_nft_text_rules("") == {}


def test_xt_rules_fall_back_to_json_when_the_text_disagrees():
    js = (GUEST / "nft-ruleset.json").read_text()
    text = (GUEST / "nft-ruleset.txt").read_text()
    # the listing was taken while Docker added a rule: that chain's count differs
    extra = text.replace(
        '\t\tiifname "docker0" counter packets 0 bytes 0 return\n',
        '\t\tiifname "docker0" counter packets 0 bytes 0 return\n'
        '\t\tiifname "br-new" counter packets 0 bytes 0 return\n',
        1,
    )
    assert extra != text
    lines = ivm.normalise_nft_json(js, None, extra)
    assert (
        "rule ip nat DOCKER: meta iifname != br-d2b0beece4b3 tcp dport 443 counter xt target DNAT"
        in lines
    )
    assert not any("br-new" in ln for ln in lines)


def test_container_addresses_become_names():
    ips = ivm.parse_container_ips(
        "/caddy 172.18.0.2 \n/db 172.18.0.25 fd00::19\n/hostnet  \n/odd <no value>\n"
    )
    assert ips == {"172.18.0.2": "caddy", "172.18.0.25": "db", "fd00::19": "db"}
    line = (
        "ip saddr 172.18.0.2 ip daddr 172.18.0.25 dnat to 172.18.0.2:443 "
        "ip daddr 172.18.0.20 ip6 daddr fd00::19 ip6 daddr fd00::190 ip saddr 172.18.0.2/32"
    )
    assert ivm.name_container_addresses(line, ips) == (
        "ip saddr <caddy> ip daddr <db> dnat to <caddy>:443 ip daddr 172.18.0.20 "
        "ip6 daddr <db> ip6 daddr fd00::190 ip saddr <caddy>/32"
    )
    # the container came back at another address: the same rules
    items, text = _nft_items(), (GUEST / "nft-ruleset.txt").read_text()
    moved = json.loads(json.dumps(items).replace('"172.18.0.2"', '"172.18.0.3"'))
    moved_text = text.replace("172.18.0.2", "172.18.0.3")
    before = ivm.normalise_nft_json(_nft(items), {"172.18.0.2": "caddy"}, text)
    assert before == ivm.normalise_nft_json(_nft(moved), {"172.18.0.3": "caddy"}, moved_text)
    assert (
        'rule ip nat DOCKER: iifname != "br-d2b0beece4b3" udp dport 443 counter '
        "dnat to <caddy>:443" in before
    )
    # ... but a DNAT to an address no container holds any more is a difference
    stale = ivm.normalise_nft_json(_nft(moved), {"172.18.0.4": "caddy"}, moved_text)
    removed, added = ivm.diff_lines(before, stale)
    assert len(removed) == len(added) == 9 and all("172.18.0.3" in a for a in added)
    assert sum("dnat to 172.18.0.3" in a for a in added) == 3


def test_normalise_nft_json_keeps_rule_order_in_boma_tables():
    items = _nft_items()
    idx = [
        i
        for i, it in enumerate(items)
        if "rule" in it and it["rule"]["family"] == "inet" and it["rule"]["chain"] == "forward"
    ]
    swapped = list(items)
    swapped[idx[0]], swapped[idx[1]] = swapped[idx[1]], swapped[idx[0]]
    before, after = ivm.normalise_nft_json(_nft(items)), ivm.normalise_nft_json(_nft(swapped))
    assert sorted(before) == sorted(after) and before != after
    removed, added = ivm.diff_lines(before, after)
    assert len(removed) == len(added) == 1 and removed == added  # a moved rule


def test_normalise_nft_json_sets_objects_and_empty():
    text = json.dumps(
        {
            "nftables": [
                {"metainfo": {"version": "1.1.3"}},
                {"table": {"family": "inet", "name": "f", "handle": 9}},
                {
                    "set": {
                        "family": "inet",
                        "table": "f",
                        "name": "allow",
                        "type": "ipv4_addr",
                        "handle": 3,
                        "flags": ["interval"],
                        "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}, "192.168.1.1"],
                    }
                },
                {"chain": {"family": "inet", "table": "f", "name": "c", "handle": 1}},
                {
                    "counter": {
                        "family": "inet",
                        "table": "f",
                        "name": "hits",
                        "handle": 4,
                        "packets": 5,
                        "bytes": 6,
                    }
                },
            ]
        }
    )
    assert ivm.normalise_nft_json(text) == [
        "table inet f",
        "chain inet f c",
        'set inet f allow {"flags":["interval"],"type":"ipv4_addr"} elements '
        "{ 10.0.0.0/8, 192.168.1.1 }",
        "counter inet f hits {}",
    ]
    assert ivm.normalise_nft_json('{"nftables": [{"metainfo": {}}]}') == []
    with pytest.raises(ValueError):
        ivm.normalise_nft_json("nft: not JSON")


def test_normalise_docker_ports():
    out = ivm.normalise_docker_ports(
        (GUEST / "docker-ps.txt").read_text() + "netbird-signal \nzz-worker\n"
    )
    assert out == [
        "caddy 0.0.0.0:443->443/tcp",
        "caddy 0.0.0.0:443->443/udp",
        "caddy 0.0.0.0:80->80/tcp",
        "caddy [::]:443->443/tcp",
        "caddy [::]:443->443/udp",
        "caddy [::]:80->80/tcp",
        "netbird-signal -",
        "zz-worker -",
    ]
    assert ivm.normalise_docker_ports("docker: absent\n") == ["docker: absent"]
    assert ivm.normalise_docker_ports("") == []


def test_normalise_listeners_realistic():
    out = ivm.normalise_listeners(
        (GUEST / "ss-tulnp.txt").read_text(), (32768, 60999), own_ips=["192.168.150.42"]
    )
    assert out == sorted(
        [
            "udp 127.0.0.54:53 systemd-resolve",
            "udp 127.0.0.53%lo:53 systemd-resolve",
            "udp VM_IP%enp1s0:68 systemd-network",
            "udp 0.0.0.0:443 docker-proxy",
            "udp [::]:443 docker-proxy",
            "udp 0.0.0.0:5355 systemd-resolve",
            "udp [::]:5355 systemd-resolve",
            "tcp 127.0.0.54:53 systemd-resolve",
            "tcp 127.0.0.53%lo:53 systemd-resolve",
            "tcp 127.0.0.1:ephemeral containerd",
            "tcp 0.0.0.0:5355 systemd-resolve",
            "tcp 0.0.0.0:22 sshd",
            "tcp 0.0.0.0:443 docker-proxy",
            "tcp 0.0.0.0:80 docker-proxy",
            "tcp [::]:22 sshd",
            "tcp [::]:443 docker-proxy",
            "tcp [::]:80 docker-proxy",
            "tcp [::]:5355 systemd-resolve",
        ]
    )


def test_normalise_listeners_tlnp_without_netid_and_odd_rows():
    text = (
        'LISTEN 0 4096 0.0.0.0:443 0.0.0.0:* users:(("docker-proxy",pid=1234,fd=7))\n'
        'LISTEN 0 4096 0.0.0.0:443 0.0.0.0:* users:(("docker-proxy",pid=9,fd=7))\n'
        'LISTEN 0 128 *:8080 *:* users:(("nginx",pid=2,fd=6),("nginx",pid=1,fd=6),'
        '("nginx",pid=3,fd=6))\n'
        "LISTEN 0 64 0.0.0.0:2049 0.0.0.0:*\n"
        'LISTEN 0 5 [fe80::5054:ff:fe12:3456]%enp1s0:546 [::]:* users:(("x y",pid=5,fd=1))\n'
        'LISTEN 0 5 127.0.0.1:45000 0.0.0.0:* users:(("containerd",pid=7,fd=9))\n'
        "garbage\n"
    )
    assert ivm.normalise_listeners(text, (40000, 50000), own_ips=["127.0.0.1"]) == [
        "tcp *:8080 nginx",
        "tcp 0.0.0.0:2049 -",
        "tcp 0.0.0.0:443 docker-proxy",
        "tcp 127.0.0.1:ephemeral containerd",  # loopback is never "the VM's address"
        "tcp [fe80::5054:ff:fe12:3456]%enp1s0:546 x y",
    ]


def test_parse_port_range_and_failed_units():
    assert ivm.parse_port_range("32768\t60999\n") == (32768, 60999)
    assert ivm.parse_port_range("") == (32768, 60999)
    assert ivm.parse_failed_units(
        "fstrim.service loaded failed failed Discard\na.mount loaded failed failed A\n\n"
    ) == ["a.mount", "fstrim.service"]
    assert ivm.parse_failed_units("") == []


def test_pair_enabled_active():
    units = (GUEST / "list-unit-files.txt").read_text()
    names = [ln.split()[0] for ln in units.splitlines() if "@." not in ln]
    states = "\n".join("inactive" if n.startswith("sshd-keygen") else "active" for n in names)
    out = ivm.pair_enabled_active(units, states)
    assert "getty@.service active" not in out and len(out) == len(names) == 13
    assert out[0] == "cloud-config.service active" and "sshd-keygen.service inactive" in out
    assert ivm.pair_enabled_active(units, "active\n")[0].startswith("! services: 13 enabled")
    assert ivm.pair_enabled_active("", "") == []


def test_normalise_capture_records_failures_as_lines():
    st = ivm.normalise_capture(
        ivm.parse_capture_output(
            _capture(
                boot_id=(0, "b-1"),
                port_range=(0, "32768 60999"),
                nft_json=(1, "Error: Could not process rule: Operation not permitted"),
                docker=(124, ""),
                sockets=(0, "not ss output"),
                enabled_units=(0, "ssh.service enabled enabled"),
                enabled_active=(0, "active"),
            ),
            NONCE,
        )
    )
    c = st["categories"]
    assert st["boot_id"] == "b-1" and st["port_range"] == [32768, 60999]
    assert c["nft"] == ["! nft -j list ruleset: exit 1"]
    assert c["ports"] == ["! docker ps: timed out"]
    assert c["sockets"] == []
    assert c["failed_units"] == ["! systemctl --failed: not captured"]
    assert c["services"] == ["ssh.service active"]
    assert st["nft_text"] == "! nft list ruleset: not captured"
    bad = ivm.normalise_capture(
        ivm.parse_capture_output(
            _capture(
                nft_json=(0, "{not json"),
                enabled_units=(0, "a.service enabled enabled"),
                enabled_active=(124, ""),
            ),
            NONCE,
        )
    )["categories"]
    assert bad["nft"][0].startswith("! nft -j list ruleset: unparsable output")
    assert bad["services"] == ["! systemctl is-active: timed out"]


def test_diff_state_finds_flushes_readds_and_losses():
    before = {
        "nft": ["table inet filter", "rule inet filter forward: accept"],
        "ports": ["caddy 0.0.0.0:443->443/tcp"],
        "sockets": ["tcp 0.0.0.0:443 docker-proxy"],
        "failed_units": [],
        "services": ["docker.service active"],
    }
    after = {
        "nft": [
            "table inet filter",
            "rule inet filter forward: accept",
            "rule inet filter forward: accept",
        ],  # re-added: a duplicate
        "ports": [],
        "sockets": ["tcp 0.0.0.0:443 docker-proxy"],
        "failed_units": ["docker.service"],
        "services": ["docker.service failed"],
    }
    d = ivm.diff_state(before, after)
    assert list(d) == list(ivm.REBOOT_DIFF_CATEGORIES)
    assert d["nft"] == {"removed": [], "added": ["rule inet filter forward: accept"]}
    assert d["ports"] == {"removed": ["caddy 0.0.0.0:443->443/tcp"], "added": []}
    assert d["sockets"] == {"removed": [], "added": []}
    assert d["failed_units"]["added"] == ["docker.service"]
    assert d["services"] == {
        "removed": ["docker.service active"],
        "added": ["docker.service failed"],
    }
    assert ivm.diff_state(before, before) == {
        c: {"removed": [], "added": []} for c in ivm.REBOOT_DIFF_CATEGORIES
    }


def test_classify_diff_with_dict_and_list_tolerance():
    d = {c: {"removed": [], "added": []} for c in ivm.REBOOT_DIFF_CATEGORIES}
    d["sockets"]["added"] = ["udp 0.0.0.0:68 dhclient"]
    d["nft"]["removed"] = [
        "rule ip nat DOCKER: meta iifname docker0 counter return",
        "rule inet filter forward: meta iifname docker0 accept",
    ]
    tol, unexp = ivm.classify_diff(
        d, {"sockets": ["dhclient"], "nft": ["^rule ip6? (nat|filter) DOCKER"]}
    )
    assert tol == [
        "nft: - rule ip nat DOCKER: meta iifname docker0 counter return",
        "sockets: + udp 0.0.0.0:68 dhclient",
    ]
    assert unexp == ["nft: - rule inet filter forward: meta iifname docker0 accept"]
    # a pattern only applies to its own category; the sign is not part of the line
    tol, unexp = ivm.classify_diff(d, {"nft": ["dhclient"], "sockets": ["^[+-]"]})
    assert tol == [] and len(unexp) == 3
    tol, unexp = ivm.classify_diff(d, ["docker0"])  # a list applies everywhere
    assert unexp == ["sockets: + udp 0.0.0.0:68 dhclient"] and len(tol) == 2
    assert ivm.classify_diff(d, {}) == (
        [],
        [
            "nft: - rule ip nat DOCKER: meta iifname docker0 counter return",
            "nft: - rule inet filter forward: meta iifname docker0 accept",
            "sockets: + udp 0.0.0.0:68 dhclient",
        ],
    )


def test_capture_errors_are_unexpected_even_when_unchanged():
    err = "! ss -tulnp: exit 1: Cannot open netlink socket"
    before = {"sockets": [err], "nft": ["table inet filter"], "services": []}
    after = {
        "sockets": [err],
        "nft": ["table inet filter"],
        "services": ["! systemctl is-active: timed out"],
    }
    errors = ivm.capture_errors(before, after)
    assert errors == {"sockets": [err], "services": ["! systemctl is-active: timed out"]}
    d = ivm.diff_state(before, after)
    assert d["sockets"] == {"removed": [], "added": []}  # the same both times: no diff...
    tol, unexp = ivm.classify_diff(d, {}, errors)  # ...but not compared either
    assert unexp == [f"sockets: {err}", "services: + ! systemctl is-active: timed out"]
    tol, unexp = ivm.classify_diff(d, {"sockets": ["^! ss .*netlink"]}, errors)
    assert tol == [f"sockets: {err}"] and len(unexp) == 1


@pytest.mark.parametrize(
    "value,needle",
    [
        ({"socket": ["x"]}, "unknown categories ['socket']"),
        ({"sockets": "dhclient"}, "lists of non-empty regex strings (category 'sockets')"),
        ({"sockets": [""]}, "lists of non-empty regex strings"),
        ({"nft": ["(unclosed"]}, "invalid regex '(unclosed'"),
        (["ok", 3], "lists of non-empty regex strings (category '*')"),
    ],
)
def test_check_tolerance_spec_rejects(value, needle):
    with pytest.raises(ivm.UsageError) as e:
        ivm.check_tolerance_spec(value, "profile x.json")
    assert str(e.value).startswith("profile x.json: key 'reboot_diff_tolerate'") and needle in str(
        e.value
    )
    ivm.check_tolerance_spec({"sockets": ["dhclient"], "nft": ["^rule ip"]}, "p")
    ivm.check_tolerance_spec(["dhclient"], "p")


def test_load_profile_checks_tolerance_and_reboot_list(tmp_path):
    _write_profile_repo(
        tmp_path,
        {
            "a": {
                "groups": ["g"],
                "applies": [{"playbook": "site.yml"}],
                "reboot": ["graceful", "hard"],
                "reboot_diff_tolerate": {"sockets": ["dhclient"]},
            },
            "b": {"extends": "a", "reboot_diff_tolerate": {"x": []}},
        },
    )
    prof = ivm.load_profile("a", tmp_path / "tests/integration/profiles", tmp_path)
    assert prof["reboot"] == ["graceful", "hard"]
    assert prof["reboot_diff_tolerate"] == {"sockets": ["dhclient"]}
    with pytest.raises(ivm.UsageError) as e:
        ivm.load_profile("b", tmp_path / "tests/integration/profiles", tmp_path)
    assert "b.json: key 'reboot_diff_tolerate' has unknown categories" in str(e.value)


def _write_profile_repo(root, profiles):
    pdir = root / "tests" / "integration" / "profiles"
    pdir.mkdir(parents=True)
    (root / "tests" / "integration" / "verify.yml").write_text("---\n")
    (root / "playbooks").mkdir()
    (root / "playbooks" / "site.yml").write_text("---\n")
    for name, data in profiles.items():
        (pdir / f"{name}.json").write_text(json.dumps(data))


def _states():
    before = {
        "boot_id": "aaaa",
        "at": "t0",
        "categories": {
            "nft": [
                "table inet filter",
                "chain inet filter forward",
                "rule inet filter forward: a",
                "rule inet filter forward: b",
            ],
            "ports": [],
            "sockets": ["tcp 0.0.0.0:22 sshd"],
            "failed_units": [],
            "services": [],
        },
    }
    after = {"boot_id": "bbbb", "at": "t1", "categories": dict(before["categories"])}
    after["categories"]["nft"] = before["categories"]["nft"][:3]
    after["categories"]["sockets"] = ["tcp 0.0.0.0:22 sshd", "udp 0.0.0.0:68 dhclient"]
    return before, after


def test_render_state_diff_and_summary(tmp_path):
    before, after = _states()
    d = ivm.diff_state(before["categories"], after["categories"])
    tol, unexp = ivm.classify_diff(d, {"sockets": ["dhclient"]})
    text = ivm.render_state_diff(before, after, d, tol, unexp, "hard", 2, note="a note")
    assert text.startswith("reboot 2 (hard): boot_id aaaa -> bbbb\n")
    assert "a note" in text
    assert (
        "UNEXPECTED (1; not in the profile's reboot_diff_tolerate):\n"
        "  nft: - rule inet filter forward: b" in text
    )
    assert "tolerated (1; reboot_diff_tolerate):\n  sockets: + udp 0.0.0.0:68 dhclient" in text
    assert (
        "--- before/nft.json\n+++ after/nft.json\n" in text
        and "\n-rule inet filter forward: b\n" in text
    )
    assert "== ports: 0 removed, 0 added ==" in text
    s = ivm.reboot_diff_summary("hard", 2, d, tol, unexp, tmp_path / "reboot-2-hard")
    json.dumps(s)
    assert s["changed"] is True and s["mode"] == "hard" and s["index"] == 2
    assert s["categories"]["nft"] == {"added": 0, "removed": 1}
    assert s["categories"]["sockets"] == {"added": 1, "removed": 0}
    assert s["diff"].endswith("reboot-2-hard/diff.txt")
    same = ivm.diff_state(before["categories"], before["categories"])
    assert "no differences" in ivm.render_state_diff(before, before, same, [], [], "graceful", 1)
    assert ivm.reboot_diff_summary("graceful", 1, same, [], [], tmp_path)["changed"] is False


def test_render_junit_reboot_diff_failure_detail_and_warning_note():
    r = _result(verdict="fail", failed_stage="reboot-diff")
    r["phase_details"][4:] = [
        {"name": "reboot:graceful", "seconds": 20.0, "status": "pass"},
        {
            "name": "reboot-diff:graceful",
            "seconds": 0.1,
            "status": "pass",
            "message": "1 unexpected difference(s) (warn)",
        },
        {"name": "reboot:hard", "seconds": 8.0, "status": "pass"},
        {
            "name": "reboot-diff:hard",
            "seconds": 0.2,
            "status": "fail",
            "message": "2 unexpected difference(s) across the hard reboot: a; b",
            "detail": "nft: - rule a\nports: - caddy 0.0.0.0:443->443/tcp",
        },
    ]
    suite = ET.fromstring(ivm.render_junit(r)).find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases)[4:] == [
        "reboot:graceful",
        "reboot-diff:graceful",
        "reboot:hard",
        "reboot-diff:hard",
    ]
    f = cases["reboot-diff:hard"].find("failure")
    assert f.get("message").startswith("2 unexpected difference(s) across the hard reboot")
    assert f.text == "nft: - rule a\nports: - caddy 0.0.0.0:443->443/tcp"
    note = cases["reboot-diff:graceful"]
    assert note.find("failure") is None and "(warn)" in note.find("system-out").text
    assert suite.get("failures") == "1"


def test_result_has_reboot_diffs_and_settle_bound():
    assert ivm.new_result("cycle")["reboot_diffs"] == []
    b = ivm.stage_bounds("tcg", {})
    assert b["reboot-settle"] == ivm.DEFAULT_BOUNDS["reboot-settle"] * ivm.TCG_SCALE
    assert ivm.stage_bounds("kvm", {"BOMA_IT_TIMEOUT_REBOOT_SETTLE": "0"})["reboot-settle"] == 0


# ---- where a boot's time went (systemd-analyze) --------------------------------------


@pytest.mark.parametrize(
    "text,secs",
    [
        ("1min 3.402s", 63.402),
        ("987ms", 0.987),
        ("2.104s", 2.104),
        ("1h 2min", 3720.0),
        ("", None),
        ("n/a", None),
    ],
)
def test_parse_timespan(text, secs):
    assert ivm.parse_timespan(text) == secs


def test_parse_analyze_time_with_and_without_initrd():
    assert ivm.parse_analyze_time(
        "Startup finished in 1.975s (kernel) + 2.123s (initrd) + 10.3s (userspace) = 14.398s\n"
        "graphical.target reached after 10.2s in userspace.\n"
    ) == {"kernel": 1.975, "initrd": 2.123, "userspace": 10.3, "total": 14.398}
    assert ivm.parse_analyze_time(
        "Startup finished in 3.871s (kernel) + 1min 2.130s (userspace) = 1min 6.001s \n"
    ) == {"kernel": 3.871, "userspace": 62.13, "total": 66.001}
    assert ivm.parse_analyze_time("Bootup is not yet finished.\n") is None


def test_parse_blame_sorts_and_cuts():
    text = " 987ms a.service\n1min 2.5s b.service\n30.8s c.service\ngarbage\n"
    assert ivm.parse_blame(text, top=2) == [[62.5, "b.service"], [30.8, "c.service"]]


def test_a_capture_before_a_reboot_leaves_out_the_boot_analysis(tmp_path):
    import subprocess

    bin_ = _stub_guest(tmp_path, "running")
    p = subprocess.run(
        ["/bin/sh", "-s"],
        input=ivm.render_capture_script(NONCE, 5, analyze=False),
        env={"PATH": str(bin_)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    secs = ivm.parse_capture_output(p.stdout, NONCE)
    assert p.returncode == 0 and "nft_json" in secs and "enabled_active" in secs
    assert not {"boot_time", "boot_blame", "boot_chain"} & set(secs)
    assert ivm.normalise_capture(secs)["boot"] is None
