"""Session: preflight, phases, the failure policy, the one-VM slot, the Run and
SessionOptions, the verdict that survives the end of a run, a whole cycle end to end.
"""

import contextlib
import dataclasses
import fcntl
import json
import pathlib
import signal
import time
import types
import xml.etree.ElementTree as ET

import pytest
from conftest import assert_nothing_created, assert_one_line_error, ivm, plain_ctx


def test_passing_cycle(h):
    # a real `python3 scripts/integration-vm.py` (its entry point, exit status and output
    # streams); most other tests run the driver in-process
    p = h.run("cycle", "--host", "askari", "--junit", str(h.tmp / "junit.xml"), in_process=False)
    assert p.returncode == 0, p.stderr
    summary = p.stdout.strip().splitlines()[-1]
    assert summary.startswith("integration-vm: PASS askari boma-it-askari-"), summary
    assert "accel=tcg" in summary and "boot " in summary and "verify " in summary
    # order of the important calls
    seq = [
        c["tool"]
        + ":"
        + (
            c["argv"][2]
            if c["tool"] == "virsh"
            else c.get("playbook", "").rsplit("/", 1)[-1] or c["argv"][0]
        )
        for c in h.calls()
    ]
    keys = [
        "mmdebstrap:--variant=minbase",
        "virsh:net-define",
        "qemu-img:create",
        "cloud-localds",
        "virsh:define",
        "virsh:start",
        "virsh:domifaddr",
        "ansible-playbook:site.yml",
        "ansible-playbook:offsite.yml",
        "virsh:shutdown",
        "virsh:start",
        "ansible-playbook:verify.yml",
        "virsh:undefine",
    ]
    pos, idx = -1, []
    for k in keys:
        hits = [i for i, s in enumerate(seq) if s.startswith(k) and i > pos]
        assert hits, f"{k} missing after position {pos}: {seq}"
        pos = hits[0]
        idx.append(pos)
    # teardown happened, disks gone, run dir kept with result
    assert h.domains() == {}
    assert not any((h.cache / "runs").iterdir())
    (res,) = h.results()
    assert res["verdict"] == "pass" and res["exit_code"] == 0 and res["failed_stage"] is None
    assert set(res["phases"]) >= {
        "image",
        "boot",
        "apply",
        "reboot",
        "verify",
        "idempotence",
        "teardown",
    }
    assert res["phases"]["reboot"] >= 0 and res["accel"] == "tcg" and res["ip"] == "127.0.0.1"
    assert res["idempotence"]["changed"] == 0
    diag_copy = json.loads((h.diag / res["vm"] / "result.json").read_text())
    assert diag_copy["verdict"] == "pass"
    run_json = json.loads((h.run_root / res["vm"] / "run.json").read_text())
    assert run_json["state"] == "down" and len(run_json["boot_ids"]) == 2
    assert run_json["boot_ids"][0] != run_json["boot_ids"][1]
    # current points at the run (spec format)
    name, ip, host = (h.run_root / "current").read_text().splitlines()
    assert (name, ip, host) == (res["vm"], "127.0.0.1", "askari")
    # the reboot changed nothing that matters: new handles, counters, pids, kernel-picked
    # ports and Docker's re-created rule order (the fake's reboot noise) normalise away
    (diff,) = res["reboot_diffs"]
    assert diff["mode"] == "graceful" and diff["index"] == 1 and diff["changed"] is False
    assert diff["unexpected"] == [] and diff["tolerated"] == [] and not diff["recaptured"]
    assert set(diff["capture_seconds"]) == {"before", "after"}
    assert all(isinstance(v, float) for v in diff["capture_seconds"].values())
    assert set(diff["categories"]) == {"nft", "ports", "sockets", "failed_units", "services"}
    assert all(c == {"added": 0, "removed": 0} for c in diff["categories"].values())
    # ... and a PASSING run keeps its before/after/diff in its diagnostics dir
    rd = h.diag / res["vm"] / "reboot-1-graceful"
    assert diff["dir"] == str(rd) and diff["diff"] == str(rd / "diff.txt")
    assert "no differences" in (rd / "diff.txt").read_text()
    # where the boot's time went: `systemd-analyze time` beside the capture, summary here;
    # blame and critical-chain (~3 s of a TCG guest each) only after a reboot that failed
    assert diff["boot"]["startup"] == {"kernel": 3.871, "userspace": 62.13, "total": 66.001}
    assert diff["boot"]["blame_top"] == []
    analysis = (rd / "after" / "boot-analysis.txt").read_text()
    assert (
        "$ systemd-analyze critical-chain\n(not captured: a reboot diff's second capture"
        in analysis
    )
    for side in ("before", "after"):
        for f in (
            "nft-ruleset.txt",
            "nft.json",
            "ports.json",
            "sockets.json",
            "failed_units.json",
            "services.json",
            "capture-raw.txt",
        ):
            assert (rd / side / f).is_file(), (side, f)
        assert "chain forward" in (rd / side / "nft-ruleset.txt").read_text()
        nft = json.loads((rd / side / "nft.json").read_text())
        assert "rule inet filter forward: meta iifname docker0 accept" in nft
        for cat in ("nft", "ports", "sockets", "services"):
            lines = json.loads((rd / side / f"{cat}.json").read_text())
            assert lines and not [ln for ln in lines if ln.startswith("!")], (side, cat, lines)
    assert json.loads((rd / "before" / "sockets.json").read_text()) == json.loads(
        (rd / "after" / "sockets.json").read_text()
    )
    assert "handle" in (rd / "after" / "capture-raw.txt").read_text()  # raw kept as it came
    # one SSH round trip per capture, all under one sudo
    captures = [c for c in h.calls("ssh") if c["argv"][-1] == "sudo -n sh -s"]
    assert len(captures) == 2
    assert run_json["reboots"][0]["diff"] == {"changed": False, "unexpected": 0, "dir": str(rd)}
    # JUnit parses: one case per phase (reboot and its diff included) and per verify check
    root = ET.parse(h.tmp / "junit.xml").getroot()
    names = [tc.get("name") for tc in root.iter("testcase")]
    assert "boot" in names and "verify" in names and any(n.startswith("verify: ") for n in names)
    assert names.index("reboot:graceful") + 1 == names.index("reboot-diff:graceful")
    assert {
        "verify: docker enabled and active",
        "verify: published :443 answers from the controller",
    } <= set(names)
    assert not [tc for tc in root.iter("testcase") if len(tc)]  # nothing failed


def test_cycle_safety_invariants(h):
    p = h.run("cycle", "--host", "askari")
    assert p.returncode == 0, p.stderr
    everything = json.dumps(h.calls())
    assert "StrictHostKeyChecking=no" not in everything
    assert "UserKnownHostsFile=/dev/null" not in everything
    for c in h.calls("ssh"):
        if "-O" in c["argv"]:  # ends the shared connection: its local socket, no host
            assert c["argv"][-3:] == ["-O", "exit", "boma-it-guest"], c["argv"]
            continue
        assert "StrictHostKeyChecking=yes" in c["argv"]
        assert any(
            a.startswith("UserKnownHostsFile=") and a.endswith("/known_hosts") for a in c["argv"]
        )
    pbs = h.calls("ansible-playbook")
    # site, offsite, verify live, verify after the reboots, site + offsite (idempotence)
    assert [pathlib.Path(c["playbook"]).name for c in pbs] == [
        "site.yml",
        "offsite.yml",
        "verify.yml",
        "verify.yml",
        "site.yml",
        "offsite.yml",
    ]
    vm = pbs[0]["limit"]
    assert vm.startswith("boma-it-askari-")
    for c in pbs:
        a = c["argv"]
        assert a[a.index("--limit") + 1] == vm
        groups = json.loads(c["inventory"])["all"]["children"]
        assert [list(g["hosts"]) for g in groups.values()] == [[vm], [vm]]  # one per group
        assert "77.42.120.136" not in c["inventory"]
        assert a[a.index("-i") + 1].endswith("/inventory/hosts.json")
        assert "StrictHostKeyChecking=yes" in c["env"]["ANSIBLE_SSH_ARGS"]
        assert c["env"]["ANSIBLE_HOST_KEY_CHECKING"] == "True"
        assert c["env"]["ANSIBLE_CONFIG"].endswith("/ansible.cfg")
        assert c["env"]["ANSIBLE_CACHE_PLUGIN_CONNECTION"].endswith("/facts")
        extra = [a[i + 1] for i, x in enumerate(a) if x == "-e"]
        assert [pathlib.Path(e).name for e in extra] == [
            "askari.yml",
            "internal.yml",
            "test-values.yml",
        ]
    # group_vars symlinked, production vault excluded; real inventory untouched
    gv = h.run_root / vm / "inventory" / "group_vars"
    assert (gv / "all" / "vars.yml").is_symlink()
    assert (gv / "offsite_hosts" / "vars.yml").is_symlink()
    assert not (gv / "all" / "vault.yml").exists()
    assert "askari" in (h.repo / "inventories" / "production" / "offsite.yml").read_text()
    # the domain carried ownership metadata from the moment it was defined
    define = [c for c in h.calls("virsh") if c["argv"][2] == "define"][0]
    assert "boma:run" in pathlib.Path(define["argv"][3]).read_text()
    # the guest got the pinned host key through cloud-init
    ud = (h.run_root / vm / "user-data").read_text()
    pub = (h.run_root / vm / "ssh_host_ed25519_key.pub").read_text().split()[1]
    assert "ssh_keys:" in ud and pub in ud and "ssh_genkeytypes: [ed25519]" in ud
    assert (h.run_root / vm / "known_hosts").read_text().startswith(f"{vm} ssh-ed25519 {pub}")
    # virt-install got the seed as a virtio disk, boots the disk's own GRUB, TCG
    vi = [c["argv"] for c in h.calls("virt-install") if "--print-xml" in c["argv"]][0]
    assert any(a.endswith("seed.img,format=raw,bus=virtio,readonly=on") for a in vi)
    assert vi[vi.index("--virt-type") + 1] == "qemu"
    assert vi[vi.index("--osinfo") + 1] == "debian13"
    assert "--boot" not in vi and not any(a.startswith("kernel=") for a in vi)


def test_expect_fail_turns_verify_failure_into_success_and_tears_down(h):
    p = h.run("cycle", "--host", "askari-regression", "--expect-fail", FAKE_VERIFY_FAIL="1")
    assert p.returncode == 0, p.stderr
    assert h.domains() == {}
    p2 = h.run("cycle", "--host", "askari-regression", "--expect-fail")
    assert p2.returncode == 1


def test_keep_on_infra_error_keeps_the_vm(h):
    p = h.run("cycle", "--host", "askari", "--keep", FAKE_BOOT_ID_STICKY="1")
    assert p.returncode == 3
    assert len(h.domains()) == 1


def test_second_up_is_refused_while_one_runs(h):
    assert h.run("up", "--host", "askari").returncode == 0
    p = h.run("up", "--host", "askari-regression")
    assert p.returncode == 3
    line = assert_one_line_error(p)
    assert "already running" in line and "BOMA_IT_MAX_VMS=1" in line
    assert len(h.domains()) == 1


def test_two_concurrent_ups_do_not_race(h):
    procs = [h.popen("up", "--host", "askari", FAKE_DEFINE_SLEEP="1") for _ in range(2)]
    rcs = sorted(p.wait(timeout=60) for p in procs)
    assert rcs == [0, 3], [p.stderr.read() for p in procs]
    assert len(h.domains()) == 1


def test_max_vms_allows_two(h):
    assert h.run("up", "--host", "askari", BOMA_IT_MAX_VMS="2").returncode == 0
    assert h.run("up", "--host", "askari", BOMA_IT_MAX_VMS="2").returncode == 0
    assert len(h.domains()) == 2
    ambiguous = h.run("down")
    assert ambiguous.returncode == 0  # same host: newest run
    assert len(h.domains()) == 1


def test_an_oserror_mid_run_is_exit_3_with_its_stage_and_the_vm_torn_down(h):
    blocker = h.tmp / "not-a-dir"
    # The diagnostics root becomes a regular file mid-run: the first write below it (the
    # graceful reboot's shutdown console) raises NotADirectoryError, an OSError no
    # harness code raises on purpose. (At the start it is a usage error: test_settings.)
    env = {"BOMA_IT_DIAG_DIR": str(blocker / "diag"), "FAKE_SHUTDOWN_BREAKS_DIR": str(blocker)}
    p = h.run("cycle", "--host", "askari", **env)
    assert p.returncode == 3, p.stderr
    line = assert_one_line_error(p)
    assert "reboot:graceful: unexpected NotADirectoryError" in line, line
    (res,) = h.results()
    assert res["exit_code"] == 3 and res["verdict"] == "error"
    assert res["failed_stage"] == "reboot:graceful"
    assert h.domains() == {}
    assert not any((h.cache / "runs").iterdir())


def test_an_unexpected_exception_becomes_an_infra_error_of_the_running_stage():
    result = ivm.Reporting.new_result("cycle")
    with pytest.raises(ValueError), ivm.Utilities.timed_phase(None, result, "apply:site.yml"):
        raise ValueError("bad value\nsecond line")
    e = ivm.Session.as_harness_error(ValueError("x"), result)
    assert isinstance(e, ivm.InfraError) and e.exit_code == 3
    assert e.stage == "apply:site.yml" and str(e) == "apply:site.yml: unexpected ValueError: x"
    assert result.phase_details[0]["status"] == "error"


def test_junit_into_a_missing_directory_is_refused_before_anything_runs(h):
    p = h.run("cycle", "--host", "askari", "--junit", str(h.tmp / "nope" / "junit.xml"))
    assert p.returncode == 2, p.stderr
    assert "--junit" in assert_one_line_error(p)
    assert_nothing_created(h)


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


# ---- issue 27, class 4: the verdict survives the end of a run ----------------------------
def _new_run_dir(h, before, what):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for d in set(h.run_root.iterdir()) - before:
            with contextlib.suppress(OSError, ValueError):
                if what(json.loads((d / "run.json").read_text())):
                    return d
        time.sleep(0.05)
    raise AssertionError("the run never got there")


def test_ctrl_c_while_the_checkpoint_cleanup_waits_keeps_the_written_verdict(hc):
    """A passed, torn-down cycle waited for the gc's lock (up to BOMA_IT_TIMEOUT_LOCK,
    600 s) before it wrote anything: a Ctrl-C there exited 130 with no result.json and
    no summary line. The verdict is written first; an interrupt after it skips the
    cleanup and the exit code stays the verdict's."""
    assert hc.run("cycle", "--host", "askari").returncode == 0
    before = set(hc.run_root.iterdir())
    with open(hc.cache / "checkpoints.lock", "a") as other:  # another run's checkpoint
        fcntl.flock(other, fcntl.LOCK_EX)
        p = hc.popen("cycle", "--host", "askari", BOMA_IT_TIMEOUT_LOCK="60")
        d = _new_run_dir(hc, before, lambda data: data.get("state") == "down")
        time.sleep(1.5)  # torn down: now at the end-of-run work
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.splitlines()[-1].startswith("integration-vm: PASS askari"), (out, err)
    r = json.loads((d / "result.json").read_text())
    assert r["verdict"] == "pass" and r["exit_code"] == 0
    assert "interrupted after the verdict: checkpoint cleanup skipped" in err, err


def test_the_checkpoint_cleanup_waits_for_its_lock_briefly_then_skips_with_a_note(hc):
    assert hc.run("cycle", "--host", "askari").returncode == 0
    with open(hc.cache / "checkpoints.lock", "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        t0 = time.monotonic()
        p = hc.run("cycle", "--host", "askari", BOMA_IT_TIMEOUT_LOCK="60", timeout=120)
        took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    notes = [ln for ln in p.stderr.splitlines() if "checkpoint cleanup skipped" in ln]
    assert len(notes) == 1 and "another run holds" in notes[0], p.stderr
    assert took < ivm.Session.END_GC_LOCK_WAIT + 15, took
    assert p.stdout.splitlines()[-1].startswith("integration-vm: PASS askari")


# ---- the session as data: the Run, the phase lists, the failure policy, SessionOptions ----


class _Slot:
    closed = False

    def close(self):
        self.closed = True


@pytest.fixture
def calls(monkeypatch):
    """Diagnostics, teardown and the inspection help, recorded instead of run."""
    seen = []
    monkeypatch.setattr(ivm.Session, "_ignore_signals", lambda: None)
    monkeypatch.setattr(
        ivm.Diagnostics,
        "collect_diagnostics",
        lambda ctx, rs, why: seen.append(("diag", why)) or "/d",
    )
    monkeypatch.setattr(ivm.Machine, "destroy", lambda m: seen.append(("down", m.rs.name)))
    monkeypatch.setattr(
        ivm.Reporting, "inspection_help", lambda ctx, rs, kept: seen.append(("help", rs.name))
    )
    return seen


def _run(command="cycle", rs=True, expect_fail=False):
    result = ivm.Reporting.new_result(command, "askari")
    result.expect_fail = expect_fail
    state = types.SimpleNamespace(name="boma-it-askari-0123abcd") if rs else None
    return ivm.Run(command=command, result=result, rs=state)


ARGS = ivm.Options(keep=False)


# ---- the failure policy -----------------------------------------------------------------
def test_the_failure_policy_is_one_table():
    p = ivm.Session.FAILURE_POLICY
    assert (p["verify"].verdict, p["verify"].diagnostics, p["verify"].end) == (
        "fail",
        True,
        "keep",
    )
    assert (p["infra"].diagnostics, p["infra"].end, p["infra"].exit_code) == (True, "destroy", 3)
    assert (p["usage"].diagnostics, p["usage"].end, p["usage"].exit_code) == (False, "leave", 2)
    assert (p["interrupt"].diagnostics, p["interrupt"].end) == (False, "destroy")
    assert p["interrupt"].exit_code == ivm.EXIT_INTERRUPTED
    assert ivm.Session.ERROR_KINDS == {ivm.EXIT_INFRA: "infra", ivm.EXIT_USAGE: "usage"}


def test_verify_failure_collects_diagnostics_and_keeps_the_vm(tmp_path, calls, capsys):
    run = _run()
    e = ivm.VerifyFailed("verify", "2 tasks failed", ["a", "b"])
    assert ivm.Session.on_failure(plain_ctx(tmp_path), ARGS, run, "verify", e) == ivm.EXIT_VERIFY
    assert calls == [("diag", "verify: 2 tasks failed"), ("help", run.rs.name)]
    r = run.result
    assert (r.verdict, r.failed_stage, r.failures, r.kept) == (
        "fail",
        "verify",
        ["a", "b"],
        True,
    )
    assert "integration-vm: verify failed: 2 tasks failed" in capsys.readouterr().err


def test_the_verify_failure_expect_fail_names_is_torn_down(tmp_path, calls):
    run = _run(expect_fail="verify")
    e = ivm.VerifyFailed("verify", "failed as planted")
    ivm.Session.on_failure(plain_ctx(tmp_path), ARGS, run, "verify", e)
    assert ("down", run.rs.name) in calls and run.result.kept is False


def test_infra_error_destroys_what_this_invocation_created_unless_keep(tmp_path, calls):
    e = ivm.InfraError("boot", "no lease")
    run = _run()
    assert ivm.Session.on_failure(plain_ctx(tmp_path), ARGS, run, "infra", e) == ivm.EXIT_INFRA
    assert calls == [("diag", "boot: no lease"), ("down", run.rs.name)]
    calls.clear()
    kept = _run()
    ivm.Session.on_failure(plain_ctx(tmp_path), ivm.Options(keep=True), kept, "infra", e)
    assert calls == [("diag", "boot: no lease"), ("help", kept.rs.name)]
    calls.clear()
    theirs = _run("apply")  # apply acts on a VM another invocation created: kept
    ivm.Session.on_failure(plain_ctx(tmp_path), ARGS, theirs, "infra", e)
    assert ("down", theirs.rs.name) not in calls and theirs.result.kept is True


def test_usage_error_leaves_the_run_as_it_is_without_a_word(tmp_path, calls, capsys):
    for run in (_run(rs=False), _run()):
        e = ivm.UsageError("bad --run")
        assert ivm.Session.on_failure(plain_ctx(tmp_path), ARGS, run, "usage", e) == ivm.EXIT_USAGE
        assert run.result.verdict == "error" and run.result.kept is False
    assert calls == []
    assert capsys.readouterr().err.count("integration-vm: error: bad --run") == 2


def test_interrupt_tears_down_without_diagnostics_and_says_so(tmp_path, calls, capsys):
    run = _run()
    run.result.phase_details.append({"name": "apply:site.yml", "status": "interrupted"})
    assert ivm.Session.on_failure(plain_ctx(tmp_path), ARGS, run, "interrupt", None) == 130
    assert calls == [("down", run.rs.name)]
    assert run.result.failed_stage == "apply:site.yml"
    err = capsys.readouterr().err
    assert "\nintegration-vm: interrupted" in err and f"tearing down {run.rs.name}" in err


# ---- the phase list ---------------------------------------------------------------------
def test_each_session_command_is_an_ordered_phase_list():
    ph = ivm.Session.SESSION_PHASES
    assert set(ph) == {"up", "apply", "reboot", "assert", "cycle", "loop", "bench"}
    for command, phases in ph.items():
        assert phases[0] is ivm.Session.phase_prepare and phases[-1] is ivm.Session.phase_finish
        first_vm = (
            ivm.Session.phase_provision
            if command in ivm.CREATING_COMMANDS
            else ivm.Session.phase_attach
        )
        assert first_vm in phases
    gate = [p.__name__ for p in ph["cycle"]]
    assert (
        gate.index("phase_converge")
        < gate.index("phase_reboots")
        < gate.index("phase_assert")
        < gate.index("phase_idempotence")
    )
    assert ph["bench"] == ph["cycle"] and ivm.Session.phase_idempotence not in ph["loop"]


def test_a_session_runs_its_phases_on_one_run_and_ends_by_the_policy(tmp_path, calls, monkeypatch):
    ctx, seen, slot = plain_ctx(tmp_path), [], _Slot()

    def first(ctx, args, run):
        assert ctx.session is run and ctx.bounds is run.bounds  # the active run's bounds
        run.rs, run.slot = (
            types.SimpleNamespace(name="boma-it-askari-0123abcd", close_ssh=lambda: None),
            slot,
        )
        seen.append("first")

    def second(ctx, args, run):
        raise ivm.InfraError("apply:site.yml", "unreachable")

    def never(ctx, args, run):
        seen.append("never")

    monkeypatch.setitem(ivm.Session.SESSION_PHASES, "up", (first, second, never))
    monkeypatch.setattr(ivm.Guest, "note_boot_times", lambda *a: None)
    # the VM slot is held until after the teardown
    monkeypatch.setattr(ivm.Machine, "destroy", lambda m: seen.append(("down", slot.closed)))
    args = ivm.Options(keep=False, host="askari")
    run = ivm.Session.run_session(ctx, args, "up")
    assert seen == ["first", ("down", False)] and slot.closed
    assert run.exit_code == ivm.EXIT_INFRA and run.reported
    assert run.result.failed_stage == "apply:site.yml" and run.result.exit_code == 3
    assert ctx.session is None  # the session bound a copy of the caller's context, not it


def test_a_usage_error_before_anything_exists_writes_no_summary(tmp_path, monkeypatch, capsys):
    def bad(ctx, args, run):
        raise ivm.UsageError("no such host")

    monkeypatch.setattr(ivm.Session, "_ignore_signals", lambda: None)
    monkeypatch.setitem(ivm.Session.SESSION_PHASES, "up", (bad,))
    args = ivm.Options(keep=False, host="nope")
    assert ivm.Session.session(plain_ctx(tmp_path), args, "up") == ivm.EXIT_USAGE
    out = capsys.readouterr()
    assert out.out == "" and out.err == "integration-vm: error: no such host\n"


# ---- the run owns its state, Ctx only configuration ---------------------------------------
def test_ctx_carries_no_run_state(tmp_path):
    with pytest.raises(dataclasses.FrozenInstanceError):
        plain_ctx(tmp_path).poll = 1.0  # configuration, fixed for the process
    fields = {f.name for f in dataclasses.fields(ivm.Ctx)}
    gone = {"bounds", "cmdlog", "checkpoint_chain", "bench_phase", "bench_transport"}
    assert not fields & (gone | {"last_result", "strategy"})
    run_fields = {f.name for f in dataclasses.fields(ivm.Run)}
    assert {"rs", "slot", "result", "bounds", "cmdlog", "checkpoint_chain", "strategy"} <= (
        run_fields
    )


def test_attaching_a_run_state_moves_the_command_log(tmp_path):
    ctx = plain_ctx(tmp_path)
    assert ctx.cmdlog is None and ctx.bounds == {}
    run = ivm.Run(bounds={"virsh": 5.0})
    ctx = dataclasses.replace(ctx, session=run)
    run.attach(ivm.RunState(ctx, ivm.RunRecord("boma-it-askari-0123abcd", None)))
    assert ctx.cmdlog == tmp_path / ".run" / "boma-it-askari-0123abcd" / "logs" / "commands.log"
    assert ctx.bounds == {"virsh": 5.0}


def test_bench_legs_are_session_options_not_ctx_flags():
    cold, only, after = (
        ivm.Commands.BENCH_COLD,
        ivm.Commands.BENCH_ONLY,
        ivm.Commands.BENCH_AFTER_EDIT,
    )
    assert cold.cold_image and cold.fresh_checkpoints and cold.time_transports
    assert only.cold_image and only.time_transports and not only.fresh_checkpoints
    for leg in after.values():  # the loop and the warm cycle: cached image, keep the chain
        assert not (leg.cold_image or leg.fresh_checkpoints or leg.time_transports)
        assert leg.gc_outdated is False
    assert ivm.SessionOptions() == ivm.SessionOptions(gc_outdated=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cold.cold_image = False
