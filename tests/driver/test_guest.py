"""Guest: run state, cloud-init, the domain's argv and metadata, the shared SSH connection,
the guest-side boot wait, the reboot's warnings and the boot history.
"""

import fcntl
import json
import os
import pathlib
import re
import subprocess
import threading
import time
import types
import xml.etree.ElementTree as ET

import pytest
from conftest import intact, ivm, ran, victim


def test_vm_name_prefix_and_suffix():
    assert ivm.Guest.vm_name("askari", "ab12cd34") == "boma-it-askari-ab12cd34"


def test_vm_name_generates_suffix():
    n = ivm.Guest.vm_name("askari")
    assert n.startswith("boma-it-askari-") and len(n.split("-")[-1]) == 8


def test_meta_data_has_instance_and_hostname():
    md = ivm.Guest.render_meta_data("iid-askari-x", "boma-it-askari-x")
    assert "instance-id: iid-askari-x" in md
    assert "local-hostname: boma-it-askari-x" in md


def test_user_data_injects_key_and_ansible_user():
    ud = ivm.Guest.render_user_data("ssh-ed25519 AAAA... claude@ubongo", "ansible")
    assert ud.startswith("#cloud-config")
    assert "name: ansible" in ud
    assert "ssh-ed25519 AAAA... claude@ubongo" in ud
    assert "NOPASSWD:ALL" in ud


def test_render_current_spec_format():
    assert ivm.Guest.render_current("boma-it-a-1", "10.0.0.2", "a").splitlines() == [
        "boma-it-a-1",
        "10.0.0.2",
        "a",
    ]


def test_user_data_with_host_key_block():
    priv = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAA\nBBB\n-----END OPENSSH PRIVATE KEY-----\n"
    ud = ivm.Guest.render_user_data(
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
    assert "ssh_keys" not in ivm.Guest.render_user_data("ssh-ed25519 K c", "ansible")


def test_ssh_options_pin_the_host_key():
    opts = ivm.Guest.ssh_options("/r", "boma-it-x-1", 2222)
    joined = " ".join(opts)
    assert "StrictHostKeyChecking=yes" in joined and "StrictHostKeyChecking=no" not in joined
    assert "UserKnownHostsFile=/r/known_hosts" in joined and "HostKeyAlias=boma-it-x-1" in joined
    assert "IdentitiesOnly=yes" in joined and "BatchMode=yes" in joined
    assert opts[opts.index("-i") + 1] == "/r/id_ed25519" and opts[-2:] == ["-p", "2222"]


def test_ssh_argv_ends_with_destination_and_command():
    a = ivm.Guest.ssh_argv("/r", "vm", "10.0.0.2", "cloud-init status --wait")
    assert a[0] == "ssh" and a[-2:] == ["ansible@10.0.0.2", "cloud-init status --wait"]


def test_known_hosts_line_uses_alias():
    assert ivm.Guest.known_hosts_line("vm", "ssh-ed25519 AAAA comment\n") == "vm ssh-ed25519 AAAA\n"


def test_ssh_keygen_and_disk_argv():
    assert ivm.Guest.ssh_keygen_argv("/r/k", "c") == [
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
    assert ivm.Guest.qemu_img_overlay_argv("/g.qcow2", "/o.qcow2") == [
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
    assert ivm.Guest.cloud_localds_argv("/s", "/u", "/m") == ["cloud-localds", "/s", "/u", "/m"]


def test_choose_osinfo():
    assert ivm.Guest.choose_osinfo("debian12\ndebian13, debiantesting\n") == "debian13"
    assert ivm.Guest.choose_osinfo("debian11\ndebian12\n") == "debian12"
    assert (
        ivm.Guest.choose_osinfo("debian11, debianbullseye\ndebian10, debianbuster\n") == "debian11"
    )
    assert ivm.Guest.choose_osinfo("fedora40\n") == "detect=on,require=off"
    assert ivm.Guest.choose_osinfo("") == "detect=on,require=off"


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
    return ivm.Guest.virt_install_argv(**base)


def test_virt_install_argv_boots_the_disk():
    a = _vi()
    assert a[:3] == ["virt-install", "--connect", "qemu:///system"]
    assert "--import" in a and a[-1] == "--print-xml"
    assert "path=/c/o.qcow2,format=qcow2,bus=virtio" in a
    assert "path=/c/seed.img,format=raw,bus=virtio,readonly=on" in a
    assert "network=boma-it,model=virtio,mac=52:54:00:01:02:03" in a
    assert a[a.index("--serial") + 1] == "pty,log.file=/c/console.log"
    assert a[a.index("--virt-type") + 1] == "qemu" and a[a.index("--graphics") + 1] == "none"
    assert "--boot" not in a and not any("kernel=" in x for x in a)  # its own GRUB (ADR-028)
    with pytest.raises(TypeError):  # no direct kernel boot to ask for any more
        _vi(kernel="/i/vmlinuz")


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
    meta = ivm.Utilities.render_metadata_xml("id1", "t", "p", "o")
    out = ivm.Guest.add_domain_metadata(dom, meta)
    root = ET.fromstring(out)
    found = root.find(f"metadata/{{{ivm.METADATA_URI}}}run")
    assert found is not None and found.get("id") == "id1"
    assert ivm.Guest.domain_name_from_xml(out) == "vm"


def test_add_domain_metadata_rejects_non_domain():
    with pytest.raises(ivm.InfraError):
        ivm.Guest.add_domain_metadata("garbage", "<m/>")


def test_rendered_user_data_is_valid_cloud_config():
    yaml = pytest.importorskip("yaml")
    priv = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    ud = yaml.safe_load(
        ivm.Guest.render_user_data("ssh-ed25519 C c", "ansible", priv, "ssh-ed25519 H h")
    )
    assert ud["users"][0]["name"] == "ansible"
    assert ud["users"][0]["ssh_authorized_keys"] == ["ssh-ed25519 C c"]
    assert ud["ssh_keys"]["ed25519_private"] == priv
    assert ud["ssh_keys"]["ed25519_public"] == "ssh-ed25519 H h"
    assert ud["ssh_genkeytypes"] == ["ed25519"] and ud["manage_etc_hosts"] is True
    md = yaml.safe_load(ivm.Guest.render_meta_data("iid-x", "boma-it-x"))
    assert md == {"instance-id": "iid-x", "local-hostname": "boma-it-x"}


def test_writes_of_its_own_files_replace_a_symlink_instead_of_following_it(h):
    targets = {}
    h.run_root.mkdir(parents=True)
    h.cache.mkdir()
    for link in (h.run_root / "current", h.cache / "net.xml", h.cache / "osinfo.json"):
        t = h.tmp / f"target-{link.name}"
        t.write_text("precious\n")
        link.symlink_to(t)
        targets[link] = t
    p = h.run("up", "--host", "askari")
    assert p.returncode == 0, p.stderr
    for link, t in targets.items():
        assert t.read_text() == "precious\n", link
        assert not link.is_symlink(), link
    assert (h.run_root / "current").read_text().startswith("boma-it-askari-")


def test_a_symlinked_run_dir_in_the_run_root_is_not_a_run(h):
    v = victim(h)
    (v / "run.json").write_text(
        json.dumps({"name": "boma-it-askari-0000000c", "host": "askari", "state": "up"})
    )
    before = (v / "run.json").read_text()
    h.run_root.mkdir(parents=True)
    (h.run_root / "boma-it-askari-0000000c").symlink_to(v)
    for cmd in (["down", "--run", "boma-it-askari-0000000c"], ["down"], ["prune"]):
        p = h.run(*cmd)
        assert p.returncode in (0, 2) and "Traceback" not in p.stderr, (cmd, p.stderr)
        assert intact(v) and (v / "run.json").read_text() == before, cmd


def test_slow_boot_warnings_compare_each_reboot_with_the_last_pass():
    last = [
        {"mode": "graceful", "seconds_to_running": 60.0},
        {"mode": "hard", "seconds_to_running": 50.0},
    ]
    assert (
        ivm.Guest.slow_boot_warnings(
            last,
            [
                {"mode": "graceful", "seconds_to_running": 80.0},
                {"mode": "hard", "seconds_to_running": 60.0},
            ],
        )
        == []
    )
    (w,) = ivm.Guest.slow_boot_warnings(
        last,
        [
            {"mode": "graceful", "seconds_to_running": 100.0},
            {"mode": "hard", "seconds_to_running": 70.0},
        ],
    )
    assert w.startswith("the graceful reboot took 100s to `running`, 1.7x the last passing")
    # slower by the factor but not by the slack: no line (TCG noise on short boots)
    assert (
        ivm.Guest.slow_boot_warnings(
            [{"mode": "hard", "seconds_to_running": 10.0}],
            [{"mode": "hard", "seconds_to_running": 24.0}],
        )
        == []
    )
    assert ivm.Guest.slow_boot_warnings(None, [{"mode": "hard", "seconds_to_running": 99.0}]) == []
    assert (
        ivm.Guest.slow_boot_warnings(
            [{"mode": "graceful", "seconds_to_running": 10.0}],
            [{"mode": "hard", "seconds_to_running": 99.0}],
        )
        == []
    )


def test_a_boot_much_slower_than_the_last_pass_is_a_warning_line_not_a_failure(hc):
    assert hc.run("cycle", "--host", "askari", "--no-checkpoints").returncode == 0
    (hist,) = (hc.cache / "boot-history").iterdir()
    assert hist.name == "askari-tcg.json"
    data = json.loads(hist.read_text())
    assert [r["mode"] for r in data["reboot_stages"]] == ["graceful"]
    data["reboot_stages"][0]["seconds_to_running"] = 0.1  # the last pass, as recorded
    hist.write_text(json.dumps(data))
    p, r = ran(
        hc,
        "cycle",
        "--host",
        "askari",
        "--no-checkpoints",
        FAKE_RUNNING_SLEEP="0.5",
        BOMA_IT_SLOW_BOOT_SLACK="0.2",
    )
    assert p.returncode == 0, p.stderr
    assert r["verdict"] == "pass"
    (w,) = r["warnings"]
    assert "graceful reboot took" in w and f"integration-vm: warning: {w}" in p.stderr
    # a pass records its own figures: the next run compares with this one
    assert json.loads(hist.read_text())["run"] == r["vm"]


def test_boot_and_reboot_time_the_kernel_banner_on_the_console(hc):
    """What went before the kernel (firmware, boot loader) is the console's to tell:
    systemd-analyze starts counting at the kernel."""
    p, r = ran(hc, "cycle", "--host", "askari", "--no-checkpoints")
    assert p.returncode == 0, p.stderr
    stages = r["boot_stages"]
    assert 0 <= stages["loader"] <= stages["kernel"] <= stages["dhcp-lease"]
    (reboot,) = r["reboot_stages"]
    assert 0 <= reboot["seconds_to_kernel"] <= reboot["seconds_to_ssh"]
    assert 0 <= reboot["seconds_to_off"] <= reboot["seconds_to_loader"]
    assert reboot["seconds_to_loader"] <= reboot["seconds_to_kernel"]
    assert re.search(
        r"reboot:graceful: new boot_id \w+: powered off after [\d.]+s, boot loader after "
        r"[\d.]+s, kernel after [\d.]+s, "
        r"SSH after [\d.]+s, system running after",
        p.stderr,
    )
    # a power cut starts a new QEMU process, which starts the console log afresh
    p, r = ran(hc, "cycle", "--host", "askari", "--no-checkpoints", "--reboot", "hard")
    assert p.returncode == 0, p.stderr
    (reboot,) = r["reboot_stages"]
    assert reboot["mode"] == "hard" and 0 <= reboot["seconds_to_kernel"] <= reboot["seconds_to_ssh"]


def test_a_boot_without_a_kernel_banner_records_no_kernel_time(hc):
    console_free = dict(FAKE_NO_CONSOLE_BANNER="1")
    p, r = ran(hc, "cycle", "--host", "askari", "--no-checkpoints", **console_free)
    assert p.returncode == 0, p.stderr
    assert "kernel" not in r["boot_stages"]
    assert r["reboot_stages"][0]["seconds_to_kernel"] is None and "kernel after" not in p.stderr
    assert r["reboot_stages"][0]["seconds_to_loader"] is None


# ---- the driver's shared SSH connection (ssh_mux_path, RunState.close_ssh) -------------
def _ssh_kind(call):
    """'exit' (ssh -O exit), 'shared' (through ControlPath) or 'own' (a connection of its own)."""
    argv = call["argv"]
    if "-O" in argv:
        return "exit"
    return "shared" if any(a.startswith("ControlPath=") for a in argv) else "own"


@pytest.fixture
def short_cache(h):
    # The control socket lives beside the run's disks, under the cache: the harness's
    # cache is a short path (as the real one), so the driver shares connections there.
    assert ivm.Guest.ssh_mux_path(h.cache / "runs" / ("x" * 24)) is not None
    return h.cache


def test_the_drivers_ssh_calls_share_one_connection_per_boot(h, short_cache):
    p = h.run("cycle", "--host", "askari")
    assert p.returncode == 0, p.stderr
    seq = []  # ssh kinds and the reboots between them, in call order
    for c in h.calls():
        if c["tool"] == "ssh":
            seq.append(_ssh_kind(c))
        elif c["tool"] == "virsh" and c["argv"][2] in ("shutdown", "destroy", "save"):
            seq.append(c["argv"][2])
    assert seq.count("shared") >= 6, seq
    # every reboot (graceful, then the power cut) ends the shared connection first ...
    for i, what in enumerate(seq):
        if what in ("shutdown", "save") or (what == "destroy" and "shared" in seq[i + 1 :]):
            assert seq[i - 1] == "exit", (i, seq)
    # ... the new boot is found over connections of their own, then shared again
    assert seq[seq.index("shutdown") + 1] == "own", seq
    # and the teardown ends it before the domain goes: no shared connection is left
    assert seq[-2:] == ["exit", "destroy"], seq
    assert not list(short_cache.rglob("ssh-mux"))


def test_a_shared_connection_to_a_boot_that_is_gone_hangs_until_the_bound(h, short_cache):
    # What close_ssh is for, as the fake models it: a master opened to the old boot
    # (here: left by hand) hangs the next call until the command's bound ends it.
    assert h.run("up", "--host", "askari").returncode == 0
    (rid,) = [d.name for d in h.run_root.iterdir() if d.is_dir()]
    (dom,) = h.domains()
    mux = short_cache / "runs" / rid / "ssh-mux"
    mux.write_text(f"{dom} 0")  # boot 0: the one before this
    bound = {"BOMA_IT_TIMEOUT_SSH_COMMAND": "1", "BOMA_IT_TIMEOUT_DIAG_COMMAND": "0.05"}
    t0 = time.monotonic()
    p = h.run("reboot", "--run", rid, **bound)
    assert p.returncode == 3 and time.monotonic() - t0 >= 1, p.stderr
    assert "could not capture the guest's state over SSH (timed out)" in p.stderr


def test_a_kept_vm_keeps_no_shared_connection(h, short_cache):
    p = h.run("cycle", "--host", "askari", FAKE_VERIFY_FAIL="1")
    assert p.returncode == 1 and len(h.domains()) == 1  # kept for inspection
    assert not list(short_cache.rglob("ssh-mux"))
    assert _ssh_kind(h.calls("ssh")[-1]) == "exit"


def test_a_socket_path_too_long_for_an_address_means_connections_of_their_own():
    assert ivm.Guest.ssh_mux_path("/r" * 30) == pathlib.Path("/r" * 30) / "ssh-mux"
    assert ivm.Guest.ssh_mux_path("/r" * 60) is None
    argv = ivm.Guest.ssh_argv("/r", "a", "10.0.0.2", "true", mux=pathlib.Path("/c/ssh-mux"))
    assert argv[-2:] == ["ansible@10.0.0.2", "true"]
    assert "ControlPath=/c/ssh-mux" in argv and "ControlMaster=auto" in argv
    assert not [a for a in ivm.Guest.ssh_argv("/r", "a", "ip", "true") if a.startswith("Control")]


def test_stop_jobs_are_read_from_systemds_status_lines():
    console = (
        "\x1b[0;32m  OK  \x1b[0m] Stopped \x1b[0;1;39mssh.service\x1b[0m - OpenBSD Secure Shell.\n"
        "[\x1b[0;1;31m*\x1b[0m     ] (1 of 2) A stop job is running for \x1b[0;1;39mdocker."
        "service\x1b[0m - Docker Application Container Engine (5s / 1min 30s)\r"
        "[ \x1b[0;1;31m*\x1b[0m    ] (2 of 2) A stop job is running for \x1b[0;1;39mSession 3 "
        "of User ansi…\x1b[0m (6s / 1min 30s)\r"
        "[  \x1b[0;1;31m*\x1b[0m   ] (1 of 2) A stop job is running for \x1b[0;1;39mdocker."
        "service\x1b[0m - Docker Application Container Engine (7s / 1min 30s)\r\n"
    )
    assert ivm.Guest.shutdown_stop_jobs(console) == [
        "docker.service - Docker Application Container Engine",
        "Session 3 of User ansi…",
    ]
    assert ivm.Guest.shutdown_stop_jobs("[  OK  ] Stopped docker.service.\n") == []
    assert ivm.Guest.shutdown_stop_jobs(None) == []


def test_a_reboots_diagnostics_are_never_reached_through_a_symlink(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rs = types.SimpleNamespace(diag_dir=tmp_path)
    assert ivm.Guest.reboot_dir(rs, 1, "graceful") == tmp_path / "reboot-1-graceful"
    (tmp_path / "reboot-1-graceful").symlink_to(elsewhere)
    with pytest.raises(ivm.InfraError, match="symlink"):
        ivm.Guest.reboot_dir(rs, 1, "graceful")


# ---- the harness's network: as NET_XML defines it ------------------------------------------
OLD_NET_XML = ivm.Network.NET_XML.replace("stp='off'", "stp='on'")  # before 2026-12-05 (ADR-030)


def test_a_network_definition_is_compared_on_what_the_harness_relies_on():
    libvirt_made = ivm.Network.NET_XML.replace(
        "<forward", "<uuid>0f0e</uuid>\n  <mac address='52:54:00:aa:bb:cc'/>\n  <forward"
    )
    assert ivm.Network.net_drift(libvirt_made) == []
    assert ivm.Network.net_drift(OLD_NET_XML) == ["stp=on"]
    assert ivm.Network.net_drift(ivm.Network.NET_XML.replace(" stp='off'", "")) == [
        "stp=on"
    ]  # its default
    assert ivm.Network.net_drift(ivm.Network.NET_XML.replace("150", "151")) == [
        "address=192.168.151.1",
        "dhcp=192.168.151.10-192.168.151.254",
    ]
    assert len(ivm.Network.net_drift("<network")) == len(ivm.Network.net_shape(ivm.Network.NET_XML))


def _seed_network(h, monkeypatch, xml, domains=None, active=True):
    """The fake libvirt holding boma-it as `xml`, and a context whose virsh is the fake."""
    for k, v in h.env.items():  # the driver's commands take this process's environment
        monkeypatch.setenv(k, v)
    net = {"active": active, "autostart": True, "xml": xml}
    st = {"domains": domains or {}, "networks": {"boma-it": net}, "leases": {}, "calls": {}}
    h.state_file.write_text(json.dumps(st))
    h.cache.mkdir(parents=True)
    return ivm.Env.ctx_from_env(h.env, ivm.Options())


@pytest.mark.parametrize("active", [True, False], ids=["active", "inactive"])
def test_a_network_an_older_harness_defined_is_redefined(h, monkeypatch, capsys, active):
    # ensure_network used to define boma-it only when it was missing, so a machine kept
    # the bridge with STP (each resume waited ~3 s for the port) until someone removed it.
    # Inactive: what a sandbox's fresh libvirtd holds (and libvirt lists no ports there).
    ctx = _seed_network(h, monkeypatch, OLD_NET_XML, active=active)
    ivm.Network.ensure_network(ctx)
    net = h.state()["networks"]["boma-it"]
    assert "stp='off'" in net["xml"] and net["active"] and net["autostart"]
    assert "network: boma-it redefined: it differed (stp=on)" in capsys.readouterr().err
    n = len(h.virsh_cmds())
    ivm.Network.ensure_network(ctx)  # as defined now: looked at, nothing redone
    assert [a[0] for a in h.virsh_cmds()[n:]] == ["net-info", "net-dumpxml"]


@pytest.mark.parametrize(
    "state, metadata, user",
    [
        ("running", False, "a VM's NIC"),  # any VM on it, the harness's or not
        ("shut off", True, "boma-it-askari-0123abcd"),  # a harness VM defined, not started
    ],
)
def test_a_drifted_network_is_kept_while_in_use(h, monkeypatch, capsys, state, metadata, user):
    vm = "boma-it-askari-0123abcd"
    xml = f"<domain><name>{vm}</name><interface><source network='boma-it'/></interface></domain>"
    meta = ivm.Utilities.render_metadata_xml("x", "2026-12-05T06:00:00+00:00", "askari", "root")
    dom = {"xml": xml, "state": state, "metadata": meta if metadata else None, "boot_id": "x"}
    ivm.Network.ensure_network(_seed_network(h, monkeypatch, OLD_NET_XML, {vm: dom}))
    assert h.state()["networks"]["boma-it"]["xml"] == OLD_NET_XML
    assert f"boma-it differs (stp=on); kept while in use: {user}" in capsys.readouterr().err
    assert not [a for a in h.virsh_cmds() if a[0] in ("net-destroy", "net-undefine")]


def test_a_network_another_run_redid_while_this_one_waited_is_left_alone(h, monkeypatch, capsys):
    # Two runs can both see the old definition; the second decides again once it holds
    # the lock, or it would undefine the network the first has just defined.
    ctx = _seed_network(h, monkeypatch, OLD_NET_XML)
    lock = open(h.cache / "lock", "a")  # noqa: SIM115 - held across the thread below
    fcntl.flock(lock, fcntl.LOCK_EX)  # the other run, mid-redefinition
    at_lock, real_file_lock = threading.Event(), ivm.Utilities.file_lock

    def file_lock(*args):  # its first look is done (no fake runs): it waits for the lock
        at_lock.set()
        return real_file_lock(*args)

    monkeypatch.setattr(ivm.Utilities, "file_lock", file_lock)
    worker = threading.Thread(target=ivm.Network.ensure_network, args=(ctx,))
    worker.start()
    assert at_lock.wait(timeout=10), "ensure_network never asked for the lock"
    st = h.state()
    st["networks"]["boma-it"]["xml"] = ivm.Network.NET_XML  # what the other run defined
    h.state_file.write_text(json.dumps(st))
    lock.close()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert not [a for a in h.virsh_cmds() if a[0] in ("net-destroy", "net-undefine")]
    assert "redefined" not in capsys.readouterr().err


def _boot_wait(tmp_path, **scenario):
    """The real guest-side boot wait, run by sh against a stub systemctl."""
    stub = tmp_path / "systemctl"
    stub.write_text(
        "#!/bin/sh\n"
        'case "$1 $2" in\n'
        '"is-system-running --wait")\n'
        '  [ -n "$STATE" ] && { echo "$STATE"; exit 0; }; exec sleep 9;;\n'
        '"is-active --quiet") [ -n "$TARGET_ACTIVE" ];;\n'
        '"list-jobs --no-legend") printf "%s" "$JOBS";;\n'
        '"show -P") eval "echo \\$TRIGGER_$(echo "$4" | tr .- __)";;\n'
        "esac\n"
    )
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", **scenario}
    script = ivm.Guest.boot_wait_script(poll=0.2)
    return subprocess.run(
        ["timeout", "1", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=10
    )


def test_the_guest_side_boot_wait_prints_the_state_once_the_boot_is_over(tmp_path):
    p = _boot_wait(tmp_path, STATE="degraded")
    assert (p.returncode, p.stdout) == (0, "degraded\n"), p.stderr


def test_the_guest_side_boot_wait_stops_early_when_only_timer_jobs_are_left(tmp_path):
    jobs = "513 apt-listchanges.service start running\n601 man-db.service start running\n"
    p = _boot_wait(
        tmp_path,
        TARGET_ACTIVE="1",
        JOBS=jobs,
        TRIGGER_apt_listchanges_service="apt-listchanges.timer",
        TRIGGER_man_db_service="man-db.timer",
    )
    assert (p.returncode, p.stdout) == (
        0,
        "starting\ntimer-jobs: apt-listchanges.service man-db.service\n",
    ), p.stderr


@pytest.mark.parametrize(
    "scenario",
    [
        # one job no timer started (a unit still starting): the boot is not over
        {
            "TARGET_ACTIVE": "1",
            "JOBS": "513 apt-listchanges.service start running\n"
            "530 boma-hung.service start running\n",
            "TRIGGER_apt_listchanges_service": "apt-listchanges.timer",
        },
        # only timer jobs, but the boot target is not reached yet
        {
            "JOBS": "513 apt-listchanges.service start running\n",
            "TRIGGER_apt_listchanges_service": "apt-listchanges.timer",
        },
        # the target reached and no job queued: systemd is about to say `running`
        {"TARGET_ACTIVE": "1", "JOBS": ""},
    ],
    ids=["a-job-no-timer-started", "target-not-reached", "no-jobs-yet"],
)
def test_the_guest_side_boot_wait_keeps_waiting_while_the_boot_is_not_over(tmp_path, scenario):
    p = _boot_wait(tmp_path, **scenario)
    assert (p.returncode, p.stdout) == (124, ""), p.stderr


# ---- state files are data, never code (issue 27, class 1) ------------------------------
def _tampered_run(h, **fields):
    """A real run (up), then its run.json edited as a user of the checkout could."""
    p = h.run("up", "--host", "askari")
    assert p.returncode == 0, p.stderr
    (f,) = h.run_root.glob("*/run.json")
    data = json.loads(f.read_text())
    data.update(fields)
    f.write_text(json.dumps(data))
    return data["name"]


@pytest.mark.parametrize(
    "fields, why",
    [
        ({"ip": "{{ lookup('ansible.builtin.pipe', 'id') }}127.0.0.1"}, "bad ip"),
        ({"ip": "127.0.0.1 -oProxyCommand=x"}, "bad ip"),
        ({"ip": "010.0.0.1"}, "bad ip"),
        ({"mac": "52:54:00:aa:bb:cc'/><x"}, "bad mac"),
        ({"mem_mib": "2048"}, "bad mem_mib"),
        ({"vcpus": True}, "bad vcpus"),
        ({"applied_steps": -1}, "bad applied_steps"),
        ({"accel": "kvm,x"}, "bad accel"),
        ({"domain": "askari"}, "bad domain"),
        ({"certs": "{% raw %}"}, "bad certs"),
        ({"image": "/etc/shadow"}, "bad image"),
    ],
)
def test_a_run_json_field_that_is_not_what_the_harness_writes_is_refused(h, fields, why):
    name = _tampered_run(h, **fields)
    p = h.run("assert", "--run", name)
    assert p.returncode == 2, p.stderr
    assert f"skipping {h.run_root / name}: {why}" in p.stderr
    assert not h.calls("ansible-playbook")


def test_a_runs_live_record_takes_only_its_declared_fields():
    # run.json's state is a RunRecord while the run lives: a misspelt field is an error at
    # once, not a key that save() would have kept in `extra` and no reader would look at.
    record = ivm.RunRecord("boma-it-askari-0123abcd", "askari")
    record.kept_by = "loop"
    with pytest.raises(AttributeError, match="kept_bi"):
        record.kept_bi = "loop"
    assert record.to_json()["kept_by"] == "loop" and "kept_bi" not in record.to_json()


def test_run_data_problem_checks_every_field_it_reads_back():
    good = {"name": "boma-it-a-0000000a", "host": "a", "ip": "192.168.150.9"}
    assert ivm.Guest.run_data_problem(good, good["name"]) is None
    assert ivm.Guest.run_data_problem({**good, "ip": None, "mac": None}, good["name"]) is None
    assert ivm.Guest.run_data_problem({**good, "ip": "1.2.3.4\n"}, good["name"]) == "bad ip"
    assert ivm.Guest.run_data_problem({**good, "boot_ids": ["{#x#}"]}, good["name"]).startswith(
        "bad boot_ids"
    )
    assert ivm.Guest.run_data_problem({**good, "extra": {"k": "\x1b[2J"}}, good["name"]).startswith(
        "bad extra"
    )


def test_state_fields_problem_covers_a_checkpoint_manifest():
    assert ivm.Guest.state_fields_problem({"ip": "{{ 1 }}", "key": "k"}) == "bad ip"
    assert (
        ivm.Guest.state_fields_problem({"domain": "boma-it-a-0000000a", "boot_id": "ab-12"}) is None
    )
    assert ivm.Guest.state_fields_problem({"stage": "{% x %}"}).startswith("bad stage")


# ---- guest output is hostile input (issue 27, class 2a) --------------------------------
def test_a_status_line_quoting_a_panic_is_not_a_panic(h):
    # a unit's status lines on the console quote the panic text: every boot is clean
    unit = "panicwatch.service - Alert on Kernel panic - not syncing lines"
    console = (
        f"[FAILED] Failed to start {unit}.\r\n"
        f"\x1b[0;1;31m*\x1b[0m] A start job is running for {unit} (5s / 1min 30s)\r\n"
    )
    # the first SSH attempt stalls: the boot wait polls, and looks at the console
    p = h.run("cycle", "--host", "askari", FAKE_CONSOLE_ON_START=console, FAKE_SSH_STALLS="1")
    assert p.returncode == 0, p.stderr
    (res,) = h.results()
    assert res["verdict"] == "pass" and "first_boot_panic" not in res


def test_only_the_kernels_own_lines_are_a_panic_or_an_int3_oops():
    def panic(text):
        m = ivm.Guest.KERNEL_PANIC.search(text)
        return m.group(1) if m else None

    assert panic("[   11.120851] Kernel panic - not syncing: Fatal exception\r\n") == (
        "Kernel panic - not syncing: Fatal exception"
    )
    assert panic("x\nKernel panic - not syncing: VFS: Unable to mount root fs\n")
    assert panic("[ 1.5] ---[ end Kernel panic - not syncing: Fatal exception ]---")
    for quoted in (
        "[FAILED] Stopping foo.service - Kernel panic - not syncing watcher\n",
        "\x1b[0;1;31m*\x1b[0m] A stop job is running for Kernel panic - not syncing\r",
        "[  OK  ] Stopped Kernel panic - not syncing.\n",
        "Dec 05 08:00:00 host logger[1]: Kernel panic - not syncing\n",
    ):
        assert panic(quoted) is None, quoted
    assert ivm.Guest.TCG_INT3_OOPS.search("[   11.110001] Oops: int3: 0000 [#1] PREEMPT SMP")
    assert not ivm.Guest.TCG_INT3_OOPS.search("[  OK  ] Started Oops: int3 reporter.\n")


def test_a_run_json_whose_name_is_not_a_harness_run_name_is_skipped(h):
    # mutant: run_data_problem without its RUN_NAME_RE check on the directory's name
    for name in ("askari", "boma-it-askari-XYZ", "boma-it-askari-0000000g"):
        d = h.run_root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "run.json").write_text(json.dumps({"name": name, "host": "askari", "state": "up"}))
    assert ivm.Guest.run_data_problem({"name": "askari", "host": "askari"}, "askari") == (
        "its name is not its directory's harness run name"
    )
    p = h.run("status")
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("its name is not its directory's harness run name") == 3, p.stderr
