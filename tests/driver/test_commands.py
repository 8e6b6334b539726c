"""Commands: bench, status, prune, down, doctor and the step-by-step subcommands."""

import json
import os
import pathlib
import re

import pytest
from conftest import (
    assert_nothing_created,
    assert_one_line_error,
    intact,
    ivm,
    victim,
)


def test_prune_touches_only_harness_domains(h):
    assert h.run("up", "--host", "askari").returncode == 0
    h.seed_foreign_domain("boma-it-foo")
    h.seed_foreign_domain("somebody-elses-vm")
    st = h.run("status")
    assert st.returncode == 0 and "boma-it-askari-" in st.stdout and "boma-it-foo" not in st.stdout
    n = len(h.virsh_cmds())
    p = h.run("prune")
    assert p.returncode == 0, p.stderr
    assert set(h.domains()) == {"boma-it-foo", "somebody-elses-vm"}
    assert "skipping boma-it-foo" in p.stdout
    # prune itself leaves a foreign domain alone: one ownership probe, never handed to
    # destroy_domain (whose own metadata check must not be the only guard)
    for foreign in ("boma-it-foo", "somebody-elses-vm"):
        assert [a[0] for a in h.virsh_cmds()[n:] if a[1:2] == [foreign]] == ["metadata"], foreign
    assert "not touching" not in p.stderr
    assert not h.run_root.exists() or not any(h.run_root.iterdir())
    assert not any((h.cache / "runs").iterdir())
    assert not any(
        a[0] in ("destroy", "undefine") and a[1] in ("boma-it-foo", "somebody-elses-vm")
        for a in h.virsh_cmds()
    )
    assert h.run("prune").returncode == 0  # idempotent


def test_prune_removes_the_pools_earlier_versions_left(h):
    outside = h.tmp / "vm-images"
    outside.mkdir()
    st = {
        "domains": {},
        "networks": {},
        "leases": {},
        "calls": {},
        "pools": {
            # what every run of an earlier version left: persistent, autostarted, dir gone
            "boma-it-askari-0a1b2c3d": {
                "target": str(h.cache / "runs" / "boma-it-askari-0a1b2c3d"),
                "active": True,
                "persistent": True,
                "autostart": True,
            },
            "boma-it-askari-4e5f6a7b": {
                "target": "/var/lib/boma-old-cache/runs/boma-it-askari-4e5f",
                "active": False,
                "persistent": True,
                "autostart": True,
            },
            "runs": {
                "target": str(h.cache / "runs"),
                "active": True,
                "persistent": True,
                "autostart": True,
            },
            # not ours: a live directory elsewhere, whatever its name
            "boma-it-mine": {
                "target": str(outside),
                "active": True,
                "persistent": True,
                "autostart": True,
            },
            "default": {
                "target": "/var/lib/libvirt/images",
                "active": False,
                "persistent": True,
                "autostart": True,
            },
        },
    }
    h.state_file.write_text(json.dumps(st))
    status = h.run("status")
    assert status.returncode == 0, status.stderr
    listed = {
        ln.split()[2].rstrip(":")
        for ln in status.stdout.splitlines()
        if ln.startswith("storage pool ")
    }
    assert listed == {"boma-it-askari-0a1b2c3d", "boma-it-askari-4e5f6a7b", "runs"}
    p = h.run("prune")
    assert p.returncode == 0, p.stderr
    assert set(h.state()["pools"]) == {"boma-it-mine", "default"}
    assert p.stdout.count("pruned storage pool") == 3
    assert not any(
        a[0].startswith("pool-")
        and a[0] != "pool-list"
        and a[0] != "pool-dumpxml"
        and a[1] in ("boma-it-mine", "default")
        for a in h.virsh_cmds()
    )
    assert h.run("prune").returncode == 0  # idempotent


def test_down_refuses_foreign_domain_and_is_idempotent(h):
    h.seed_foreign_domain("boma-it-foo")
    p = h.run("down", "--run", "boma-it-foo")
    assert p.returncode == 0
    assert "boma-it-foo" in h.domains()
    assert "no boma metadata" in p.stderr
    assert h.run("up", "--host", "askari").returncode == 0
    assert h.run("down", "--host", "askari").returncode == 0
    assert h.run("down", "--host", "askari").returncode == 0
    assert set(h.domains()) == {"boma-it-foo"}


def test_step_by_step_subcommands(h):
    up = h.run("up", "--host", "askari")
    assert up.returncode == 0, up.stderr
    name, ip = up.stdout.strip().splitlines()[0].split()
    assert ip == "127.0.0.1"
    assert h.run("apply", "--host", "askari").returncode == 0
    assert h.run("reboot", "--run", name).returncode == 0
    a = h.run("assert")
    assert a.returncode == 0, a.stderr
    assert h.results()[0]["command"] == "assert"
    c = h.run("console", "--host", "askari")
    assert "console log:" in c.stdout and "Linux version" in c.stdout
    assert h.run("down").returncode == 0
    again = h.run("apply", "--host", "askari")
    assert again.returncode == 2 and "no run found" in again.stderr


def test_doctor(h):
    p = h.run("doctor")
    assert p.returncode == 0, p.stdout
    lines = p.stdout.splitlines()
    assert all(ln.startswith(("OK  ", "FAIL")) for ln in lines), lines
    assert any("libvirtd: reachable at test:///fake" in ln for ln in lines)
    assert any(ln.startswith("OK   /dev/kvm") and "absent" in ln for ln in lines)
    kvm = h.tmp / "kvm"
    kvm.write_text("")
    os.chmod(kvm, 0o600)
    (h.tmp / "meminfo").write_text("MemAvailable: 1048576 kB\n")
    bad = h.run("doctor", FAKE_LIBVIRT_DOWN="1", BOMA_IT_KVM_DEV=str(kvm))
    assert bad.returncode == 3
    failing = [ln for ln in bad.stdout.splitlines() if ln.startswith("FAIL")]
    assert [f.split()[1].rstrip(":") for f in failing] == ["libvirtd", "/dev/kvm", "RAM"], failing
    assert all("fix:" in ln for ln in failing), failing
    assert "cannot open it" in failing[1]


def test_bench_prints_table(h):
    p = h.run("bench", "--host", "askari")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "phase" in out and "apply:site.yml" in out and "reboot:graceful" in out
    assert out.strip().splitlines()[-1].startswith("total")
    # Cold (forced rebuild) and warm (cache hit) image, and boot-to-stage figures.
    names = [ln.split()[0] for ln in out.splitlines()[1:] if ln.strip()]
    assert names.index("image:cold") < names.index("image") < names.index("boot")
    for stage in ("dhcp-lease", "tcp-22", "ssh-handshake", "cloud-init"):
        assert f"boot to {stage}" in out
    assert "reboot to ssh" in out and "reboot to system-running" in out


def test_prune_never_follows_a_symlinked_cache_tree(h):
    assert h.run("up", "--host", "askari").returncode == 0
    assert h.run("down").returncode == 0
    outside = {}
    for tree in ("checkpoints", "images", "runs"):
        v = victim(h, f"outside-{tree}")
        (v / "boma-it-askari-12345678").mkdir()
        (v / "boma-it-askari-12345678" / "precious").write_text("x")
        if (h.cache / tree).exists():
            os.rename(h.cache / tree, h.tmp / f"real-{tree}")
        (h.cache / tree).symlink_to(v)
        outside[tree] = v
    p = h.run("prune", "--images")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    for tree, v in outside.items():
        assert intact(v) and (v / "boma-it-askari-12345678" / "precious").exists(), tree
        assert f"not pruning {h.cache / tree}" in p.stderr


@pytest.mark.parametrize(
    "edit",
    ["roles/base/templates/link.j2", "roles/../scripts/x.sh", "roles/base/../../scripts/x.sh"],
)
def test_bench_warm_edit_must_resolve_under_roles_and_never_edits_the_tree(h, edit):
    (h.repo / "roles" / "base" / "templates").mkdir(parents=True)
    target = h.repo / "scripts" / "x.sh"
    target.write_text("#!/bin/sh\n")
    (h.repo / "roles" / "base" / "templates" / "link.j2").symlink_to(target)
    p = h.run("bench", "--host", "askari", "--warm-edit", edit, BOMA_IT_CHECKPOINTS="1")
    assert p.returncode == 2, p.stderr
    assert "--warm-edit" in assert_one_line_error(p)
    assert target.read_text() == "#!/bin/sh\n"
    assert_nothing_created(h)


def test_doctor_uses_the_run_guards_and_their_settings(h):
    (h.tmp / "meminfo").write_text("MemAvailable: 3276800 kB\n")  # 3200 MiB
    low = h.run("doctor")
    assert [ln.split()[1] for ln in low.stdout.splitlines() if ln.startswith("FAIL")] == ["RAM:"]
    ok = h.run("doctor", BOMA_IT_RAM_FLOOR_MIB="64")
    assert ok.returncode == 0, ok.stdout
    disk = h.run("doctor", BOMA_IT_RAM_FLOOR_MIB="64", BOMA_IT_MIN_DISK_MIB=str(1 << 30))
    failing = [ln for ln in disk.stdout.splitlines() if ln.startswith("FAIL")]
    assert disk.returncode == 3 and len(failing) == 1 and failing[0].startswith("FAIL disk:")


def test_bench_runs_cold_loop_and_warm_after_the_same_edit_and_leaves_nothing(hc):
    before = hc.repo / ivm.Commands.BENCH_DEFAULT_EDIT
    before.parent.mkdir(parents=True, exist_ok=True)
    before.write_text("table inet filter {}\n")
    text = before.read_text()
    p = hc.run("bench", "--host", "askari", timeout=180, FAKE_NO_MITOGEN="1")
    assert p.returncode == 0, p.stderr
    assert before.read_text() == text  # edits only ever in a copy
    out = p.stdout
    # the first loop (nothing edited) resumes the cold cycle's newest checkpoint; the
    # loop after the edit goes onto its VM and re-applies only the edited role's playbook;
    # the warm cycle resumes the checkpoint before it
    assert "loop-first resumed from applied-2" in out
    assert "loop onto the last loop's VM (re-applied offsite.yml)" in out
    assert "warm resumed from applied-1" in out
    assert ["phase", "cold", "loop-first", "loop", "warm"] in [
        ln.split() for ln in out.splitlines()
    ]
    assert "loop/cold = " in out and "warm/cold = " in out
    assert re.search(r"^loop-first/cold = [\d.]+$", out, re.M)  # no target of its own
    # Mitogen does not load: the bench says so instead of comparing linear with itself
    assert "transport: not compared (Mitogen does not load" in out
    # one run dir for both loops (the second reused the first's VM): its result.json is
    # the newest loop's
    results = hc.results()
    assert sorted(r["command"] for r in results) == ["bench", "bench", "loop"]
    (loop,) = [r for r in results if r["command"] == "loop"]
    assert loop["reused_vm"]["run"] == loop["vm"]
    copies = set(re.findall(r" in (/\S+/boma-bench-\w+)", p.stderr))
    assert len(copies) == 2 and not [c for c in copies if pathlib.Path(c).exists()]
    assert hc.domains() == {}
