"""Issue 12, the driver's classes: the harness runs as root, so its own state files,
profiles, flags and environment are hostile until checked; every error reaches teardown;
the one-VM slot holds; bounds bound. One test (or a parametrized family) per class, each
failing on the driver as it was before the fix.

Orchestration runs against test_integration_vm_orchestration.Harness (fake virsh & co.);
a few checks that need an interrupt or a clock at an exact point run on the module.
"""

import dataclasses
import fcntl
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import load_script  # noqa: E402
from test_integration_vm_orchestration import (  # noqa: E402
    ASKARI,
    Harness,
    _fetch_env,
    assert_nothing_created,
    assert_one_line_error,
)

ivm = load_script("integration-vm.py", "integration_vm")


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def plant_run(h, dirname, data):
    d = h.run_root / dirname
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return d


def victim(h, name="victim"):
    v = h.tmp / name
    (v / "sub").mkdir(parents=True)
    (v / "precious").write_text("keep me\n")
    (v / "sub" / "precious").write_text("keep me too\n")
    return v


def intact(v):
    return (v / "precious").read_text() == "keep me\n" and (
        v / "sub" / "precious"
    ).read_text() == "keep me too\n"


# ---- class 1: its own state files ----------------------------------------------------------
def test_prune_and_down_only_touch_the_dir_the_run_json_was_found_in(h):
    abs_victim, rel_victim = victim(h, "abs"), victim(h, "rel")
    rel = os.path.relpath(rel_victim, h.run_root)
    good = {"host": "askari", "state": "up", "created_at": "2026-01-01T00:00:00+00:00"}
    plant_run(h, "boma-it-askari-0000000a", {**good, "name": str(abs_victim)})
    plant_run(h, "boma-it-askari-0000000b", {**good, "name": rel})
    for i, bad in enumerate(
        (
            "[]",
            "null",
            '{"name": 5}',
            '{"name": "boma-it-askari-0000000f"',
            b"\xff\xfe".decode("latin-1"),
        )
    ):
        plant_run(h, f"boma-it-askari-1000000{i}", bad)
    for cmd in (
        ["status"],
        ["down", "--run", str(abs_victim)],
        ["down", "--run", rel],
        ["down"],
        ["prune"],
    ):
        p = h.run(*cmd)
        assert p.returncode in (0, 2), (cmd, p.stderr)
        assert "Traceback" not in p.stderr, (cmd, p.stderr)
        assert intact(abs_victim) and intact(rel_victim), cmd
        assert not (abs_victim / "run.json").exists() and not (rel_victim / "run.json").exists()
    assert "skipping" in p.stderr and "its name is not its directory" in p.stderr
    assert "not a JSON object" in p.stderr


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


# ---- class 2: every error reaches teardown ---------------------------------------------------
def test_an_oserror_mid_run_is_exit_3_with_its_stage_and_the_vm_torn_down(h):
    blocker = h.tmp / "not-a-dir"
    blocker.write_text("")
    # The diagnostics root under a regular file: the first write there (the reboot's state
    # capture) raises NotADirectoryError, an OSError no harness code raises on purpose.
    p = h.run("cycle", "--host", "askari", BOMA_IT_DIAG_DIR=str(blocker / "diag"))
    assert p.returncode == 3, p.stderr
    line = assert_one_line_error(p)
    assert "reboot-diff:graceful: unexpected NotADirectoryError" in line, line
    (res,) = h.results()
    assert res["exit_code"] == 3 and res["verdict"] == "error"
    assert res["failed_stage"] == "reboot-diff:graceful"
    assert h.domains() == {}
    assert not any((h.cache / "runs").iterdir())


def test_an_unexpected_exception_becomes_an_infra_error_of_the_running_stage():
    result = ivm.new_result("cycle")
    with pytest.raises(ValueError), ivm.timed_phase(None, result, "apply:site.yml"):
        raise ValueError("bad value\nsecond line")
    e = ivm.as_harness_error(ValueError("x"), result)
    assert isinstance(e, ivm.InfraError) and e.exit_code == 3
    assert e.stage == "apply:site.yml" and str(e) == "apply:site.yml: unexpected ValueError: x"
    assert result["phase_details"][0]["status"] == "error"


# ---- class 3: profile paths stay inside the repository -----------------------------------
@pytest.mark.parametrize(
    "setup,needle",
    [
        ({"extra_vars_files": ["/etc/passwd"]}, "key 'extra_vars_files' names '/etc/passwd'"),
        ({"extra_vars_files": ["../../../../../../../../etc/passwd"]}, "resolves outside"),
        (
            {"extra_vars_files": ["overrides/link.yml"]},
            "key 'extra_vars_files' names 'overrides/link.yml'",
        ),
        ({"applies": [{"playbook": "../../../../../../../../etc/passwd"}]}, "applies[0].playbook"),
        ({"applies": [{"playbook": "link.yml"}]}, "applies[0].playbook"),
        ({"verify": "/etc/passwd"}, "key 'verify' names '/etc/passwd'"),
        ("extends-link", "resolves outside"),
        ({"extends": "../../../x"}, "key 'extends' must name a profile"),
    ],
)
def test_profile_paths_must_resolve_inside_the_repository(h, setup, needle):
    integ = h.repo / "tests" / "integration"
    outside = h.tmp / "outside.yml"
    outside.write_text("---\nsecret: 1\n")
    (integ / "overrides" / "link.yml").symlink_to(outside)
    (h.repo / "playbooks" / "link.yml").symlink_to(outside)
    if setup == "extends-link":
        (h.tmp / "evil.json").write_text(json.dumps(ASKARI))
        (integ / "profiles" / "evil.json").symlink_to(h.tmp / "evil.json")
        setup = {"extends": "evil", "groups": ASKARI["groups"]}
    (integ / "profiles" / "hostile.json").write_text(json.dumps({**ASKARI, **setup}))
    p = h.run("cycle", "--host", "hostile")
    assert p.returncode == 2, p.stderr
    assert needle in assert_one_line_error(p)
    assert_nothing_created(h)
    assert not h.calls("ansible-playbook")


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


# ---- class 4: every input validated before anything is created ----------------------------
@pytest.mark.parametrize(
    "var,value",
    [
        ("BOMA_IT_RAM_FLOOR_MIB", "abc"),
        ("BOMA_IT_RAM_FLOOR_MIB", "nan"),
        ("BOMA_IT_RAM_FLOOR_MIB", "-1"),
        ("BOMA_IT_MIN_DISK_MIB", "inf"),
        ("BOMA_IT_TIMEOUT_DHCP_LEASE", "nan"),
        ("BOMA_IT_TIMEOUT_DHCP_LEASE", "inf"),
        ("BOMA_IT_TIMEOUT_APPLY", "-5"),
        ("BOMA_IT_TIMEOUT_LOCK", "abc"),
        ("BOMA_IT_POLL", "0"),
        ("BOMA_IT_POLL", "nan"),
        ("BOMA_IT_SSH_PORT", "99999"),
        ("BOMA_IT_SSH_PORT", "0"),
        ("BOMA_IT_MAX_VMS", "0"),
        ("BOMA_IT_MAX_VMS", "1.5"),
        ("BOMA_IT_CACHE", ""),
        ("BOMA_IT_CACHE", "relative/cache"),
        ("BOMA_IT_DIAG_DIR", ""),
        ("BOMA_IT_CHECKPOINTS", "maybe"),
        ("BOMA_IT_IMAGE_SOURCE", "ftp"),
    ],
)
def test_bad_environment_values_are_exit_2_naming_the_variable(h, var, value):
    p = h.run("cycle", "--host", "askari", **{var: value})
    assert p.returncode == 2, (p.returncode, p.stderr)
    line = assert_one_line_error(p)
    assert f"{var}=" in line, line
    assert_nothing_created(h)
    assert not (h.tmp / "boma-it").exists() and not (h.tmp / "images").exists()


def test_junit_into_a_missing_directory_is_refused_before_anything_runs(h):
    p = h.run("cycle", "--host", "askari", "--junit", str(h.tmp / "nope" / "junit.xml"))
    assert p.returncode == 2, p.stderr
    assert "--junit" in assert_one_line_error(p)
    assert_nothing_created(h)


@pytest.mark.parametrize(
    "content,needle",
    [
        (b'{"groups": ["a"], "applies": [], "mem_mib": ' + b"9" * 4300 + b"}", "'mem_mib' must be"),
        (b'{"groups": ["a"], "applies": [], "vcpus": ' + b"9" * 5000 + b"}", "invalid JSON"),
        (b"[" * 100000 + b"]" * 100000, "invalid JSON"),
        ('{"groups": ["a"], "description": "café"}'.encode("latin-1"), "not UTF-8"),
    ],
)
def test_hostile_profile_json_is_exit_2_one_line(h, content, needle):
    (h.repo / "tests" / "integration" / "profiles" / "broken.json").write_bytes(content)
    p = h.run("cycle", "--host", "broken")
    assert p.returncode == 2, p.stderr
    assert needle in assert_one_line_error(p)
    assert_nothing_created(h)


def test_every_setting_is_declared_once_read_once_and_documented():
    src = (HERE.parent / "scripts" / "integration-vm.py").read_text()
    names = [row[0] for row in ivm.SETTINGS]
    assert len(names) == len(set(names))
    used = set(re.findall(r'"(BOMA_IT_[A-Z_]+[A-Z])"', src))
    assert used <= set(names), used - set(names)
    assert 'environ.get("BOMA_IT' not in src and 'environ["BOMA_IT' not in src
    for name in names:
        if not name.startswith("BOMA_IT_TIMEOUT_"):
            assert name in ivm.ENV_HELP, name
    for stage in ivm.DEFAULT_BOUNDS:
        assert stage in ivm.ENV_HELP and ivm.timeout_var(stage) in names
    st = ivm.read_settings({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.values = {}
    for dead in (
        "CACHE_DIR",
        "RUN_DIR",
        "DIAG_ROOT",
        "IMAGE_NAME",
        "PLAYBOOK_DIR",
        "PROD_GROUP_VARS",
        "MIN_FREE_MIB",
        "METADATA_KEY",
        "profile_path",
        "remove_checkpoint",
    ):
        assert not hasattr(ivm, dead), dead


def test_doctor_uses_the_run_guards_and_their_settings(h):
    (h.tmp / "meminfo").write_text("MemAvailable: 3276800 kB\n")  # 3200 MiB
    low = h.run("doctor")
    assert [ln.split()[1] for ln in low.stdout.splitlines() if ln.startswith("FAIL")] == ["RAM:"]
    ok = h.run("doctor", BOMA_IT_RAM_FLOOR_MIB="64")
    assert ok.returncode == 0, ok.stdout
    disk = h.run("doctor", BOMA_IT_RAM_FLOOR_MIB="64", BOMA_IT_MIN_DISK_MIB=str(1 << 30))
    failing = [ln for ln in disk.stdout.splitlines() if ln.startswith("FAIL")]
    assert disk.returncode == 3 and len(failing) == 1 and failing[0].startswith("FAIL disk:")


# ---- class 5: the one-VM slot ----------------------------------------------------------
def test_a_second_session_is_refused_while_the_first_holds_the_slot(h):
    h.cache.mkdir()
    with open(h.cache / "vm-slot-0.lock", "a+") as held:  # the first session, mid-boot
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = h.run("up", "--host", "askari")
    assert p.returncode == 3, p.stderr
    line = assert_one_line_error(p)
    assert line.startswith("integration-vm: error: guard:") and "VM slot" in line, line
    assert h.domains() == {}
    assert not [a for a in h.virsh_cmds() if a[0] in ("define", "start")]


def test_a_shut_off_harness_domain_still_takes_the_slot(h):
    assert h.run("up", "--host", "askari").returncode == 0
    st = h.state()
    (name,) = st["domains"]
    st["domains"][name]["state"] = "shut off"
    h.state_file.write_text(json.dumps(st))
    p = h.run("up", "--host", "askari-regression")
    assert p.returncode == 3, p.stderr
    assert "guard:" in assert_one_line_error(p)
    assert list(h.domains()) == [name]


# ---- class 7: bounds that bound ------------------------------------------------------------
def test_the_download_bound_covers_the_whole_transfer(h, monkeypatch, tmp_path):
    src = tmp_path / "big"
    src.write_bytes(b"x" * (3 << 20))  # three reads
    clock = iter(range(100))
    monkeypatch.setattr(ivm.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(ivm.InfraError) as e:
        ivm._download(src.as_uri(), tmp_path / "out", deadline=2.5, bound=2.5)
    assert "exceeded BOMA_IT_TIMEOUT_DOWNLOAD" in str(e.value)
    monkeypatch.undo()
    # ... and the driver passes BOMA_IT_TIMEOUT_DOWNLOAD to it
    import hashlib

    env = _fetch_env(
        h, b"q", hashlib.sha512(b"q").hexdigest() + "  debian-13-genericcloud-amd64.qcow2\n"
    )
    p = h.run("image", BOMA_IT_TIMEOUT_DOWNLOAD="0", **env)
    assert p.returncode == 3 and "BOMA_IT_TIMEOUT_DOWNLOAD" in assert_one_line_error(p)
    assert not [f for f in (h.cache / "images").rglob("*") if f.is_file()]


def test_an_interrupt_inside_popen_kills_the_child(monkeypatch):
    started, real = [], subprocess.Popen

    def popen(*a, **kw):
        proc = real(*a, **kw)
        started.append(proc)
        os.kill(os.getpid(), signal.SIGINT)  # lands before Popen has returned
        sum(range(1000))
        return proc

    monkeypatch.setattr(ivm.subprocess, "Popen", popen)
    try:
        with pytest.raises(KeyboardInterrupt):
            ivm.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=30)
        (proc,) = started
        assert proc.wait(timeout=10) < 0  # killed, not orphaned
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def test_a_failed_checkpoint_leaves_nothing_half_written(h):
    p = h.run("cycle", "--host", "askari", BOMA_IT_CHECKPOINTS="1", FAKE_RESTORE_FAIL="1")
    assert p.returncode == 3, p.stderr
    assert h.results()[-1]["failed_stage"] == "checkpoint"
    left = list((h.cache / "checkpoints").iterdir())
    assert left == [], left  # neither the key dir (with the run's keys) nor its staging dir


@pytest.mark.parametrize(
    "flag,env,code",
    [
        ("--expect-fail", {"FAKE_APPLY_FAIL": "1"}, 1),
        ("--expect-fail", {"FAKE_IDEMPOTENCE_CHANGED": "2"}, 1),
        ("--expect-fail", {"FAKE_REBOOT_CHANGE": "port-443-gone"}, 1),
        ("--expect-fail", {"FAKE_VERIFY_FAIL": "1"}, 0),
        ("--expect-fail=apply", {"FAKE_APPLY_FAIL": "1"}, 0),
        ("--expect-fail=reboot-diff", {"FAKE_REBOOT_CHANGE": "port-443-gone"}, 0),
        ("--expect-fail=apply", {"FAKE_VERIFY_FAIL": "1"}, 1),
    ],
)
def test_expect_fail_passes_only_on_the_named_stage(h, flag, env, code):
    p = h.run("cycle", "--host", "askari", flag, **env)
    assert p.returncode == code, p.stderr
    (res,) = h.results()
    assert res["exit_code"] == code and res["verdict"] == "fail"
    assert (h.domains() == {}) == (code == 0)  # an unexpected failure keeps the VM
