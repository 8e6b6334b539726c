"""Reporting: result.json and run.json (one schema each), the summary line, JUnit (every
text one XML can carry), and the closing lines of every way a session ends, --expect-fail's
included.
"""

import json
import xml.etree.ElementTree as ET

import pytest
from conftest import _result, ivm, plain_ctx


def test_result_shape_is_json_and_has_the_agreed_keys():
    r = ivm.Reporting.new_result("cycle", "askari").to_json()
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


def test_format_summary_pass():
    assert ivm.Reporting.format_summary(_result()) == (
        "integration-vm: PASS askari boma-it-askari-1a2b3c4d accel=tcg total=412s "
        "(image 0s, boot 31s, apply 250s, reboot 28s, verify 12s, teardown 2s)"
    )


def test_format_summary_failure_names_stage():
    s = ivm.Reporting.format_summary(_result(verdict="error", failed_stage="dhcp-lease", vm=None))
    assert s.startswith("integration-vm: ERROR[dhcp-lease] askari - accel=tcg")


def test_render_junit_well_formed_with_failures():
    r = _result(verdict="fail", failed_stage="verify")
    r["phase_details"][5].update(status="fail", message="verify playbook failed at: x")
    r["verify_tasks"] = [
        {"name": "docker <active>", "status": "ok", "message": ""},
        {"name": "published :443", "status": "failed", "message": "timed out & dead"},
    ]
    root = ET.fromstring(ivm.Reporting.render_junit(r))
    suite = root.find("testsuite")
    assert suite.get("name") == "integration-vm.askari"
    assert suite.get("tests") == "9" and suite.get("failures") == "2" and suite.get("errors") == "0"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["verify: published :443"].find("failure").get("message") == "timed out & dead"
    assert cases["boot"].find("failure") is None and cases["boot"].get("time") == "31.000"


def test_render_junit_infra_error_without_phases():
    r = ivm.Reporting.new_result("cycle", "askari").to_json()
    r.update(verdict="error", failed_stage="libvirt", message="libvirtd not reachable")
    suite = ET.fromstring(ivm.Reporting.render_junit(r)).find("testsuite")
    assert suite.get("errors") == "1"
    assert suite.find("testcase").get("name") == "libvirt"


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
    suite = ET.fromstring(ivm.Reporting.render_junit(r)).find("testsuite")
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
    assert ivm.Reporting.new_result("cycle").reboot_diffs == []
    b = ivm.Env.stage_bounds("tcg", {})
    assert b["reboot-settle"] == ivm.DEFAULT_BOUNDS["reboot-settle"] * ivm.TCG_SCALE
    assert ivm.Env.stage_bounds("kvm", {"BOMA_IT_TIMEOUT_REBOOT_SETTLE": "0"})["reboot-settle"] == 0


# ---- run.json and result.json: one schema each -----------------------------------------
def test_new_result_is_the_result_records_defaults():
    r = ivm.Reporting.new_result("cycle", "askari")
    assert r == ivm.ResultRecord(command="cycle", host="askari")
    r = r.to_json()
    assert r["schema"] == 1 and r["verdict"] is None and r["phase_details"] == []
    assert "resumed_from" not in r and "ansible_strategy" not in r  # absent until they apply


def test_the_fields_ci_and_the_runbook_read_are_declared():
    result = set(ivm.ResultRecord.field_names())
    assert {"command", "verdict", "exit_code", "total_seconds", "vm", "phases"} <= result
    assert {"phase_details", "checkpoints", "resumed_from", "ansible_strategy"} <= result
    assert {"reboot_modes", "reboot_diffs", "reboot_stages", "transport"} <= result
    run = set(ivm.RunRecord.field_names())
    assert {"name", "host", "state", "ip", "accel", "domain", "resumed_from"} <= run
    assert {"boot_ids", "reboots", "checkpoints_read", "applied_steps", "kept_by"} <= run


def test_a_record_round_trips_an_older_harness_fields_but_refuses_its_own_typos():
    on_disk = {"name": "boma-it-askari-0123abcd", "host": "askari", "legacy": 1, "ip": None}
    back = ivm.RunRecord.from_json(on_disk).to_json()
    assert back["legacy"] == 1 and back["ip"] is None and back["state"] == "creating"
    assert "domain" not in back and "reboots" not in back
    with pytest.raises(ValueError, match="undeclared field.*legacy"):
        ivm.RunRecord.from_json(on_disk, strict=True)


def test_result_json_is_written_through_its_schema(tmp_path):
    ctx = plain_ctx(tmp_path)
    rs = ivm.RunState(ctx, ivm.RunRecord("boma-it-askari-0123abcd", "askari"))
    result = ivm.Reporting.new_result("cycle", "askari")
    ivm.Reporting.finish_result(ctx, result, rs, strategy={"used": "linear"})
    written = (rs.dir / "result.json").read_text()
    assert '"ansible_strategy"' in written and '"vm": "boma-it-askari-0123abcd"' in written


def test_a_misspelt_result_field_is_an_error_where_it_is_set():
    """The live result is a ResultRecord: its fields are attributes, and one nobody
    declared (a typo) raises where it is set, not a silent new key in result.json."""
    result = ivm.Reporting.new_result("cycle", "askari")
    result.verdict = "pass"
    assert result.to_json()["verdict"] == "pass"
    with pytest.raises(AttributeError, match="ResultRecord declares no field 'verdcit'"):
        result.verdcit = "fail"
    assert "verdcit" not in result.to_json()


# ---- the closing lines: every way a session ends, and what its last lines say (issue 30) ----
VM = "boma-it-askari-0123abcd"
APPLY_MSG = (
    "ansible-playbook site.yml failed (exit 2) at task 'base : preflight | Refuse mesh-only "
    "SSH'; log: /r/logs"
)
LIVE_MSG = "live verify playbook failed at: published :443 answers from the controller"
VERIFY_MSG = "verify playbook failed at: published :443 answers from the controller"
DIFF_MSG = (
    "1 unexpected difference(s) across the hard reboot: nft: - rule inet filter forward: "
    "meta iifname docker0 accept (diff: /d/diff.txt)"
)
IDEM_MSG = "2 task(s) changed on the re-apply after the reboot: base : a, base : b"
GUARD_MSG = "refusing to start: MemAvailable 1024 MiB minus the VM's 2048 MiB must leave 1024 MiB"
INSPECT = f"VM {VM} (run {VM}) kept for inspection:"
LOOP_RED = f"VM {VM} (run {VM}) kept for inspection; the next loop applies your fix onto it:"
NOT_THE_GATE = (
    "a quick loop has one graceful reboot, no power cut and no idempotence pass. This is NOT "
    "the gate: `make test-integration HOST=askari` (cycle) must pass before the change is done."
)
LOOP_KEPT = (
    NOT_THE_GATE + " The VM stays up at this state until the next loop, cycle or "
    "`make test-integration-clean`."
)
LOOP_GONE = NOT_THE_GATE + " Its VM was torn down."
SUMMARY_HEADS = {"PASS", "FAIL", "ERROR", "INTERRUPTED"}  # format_summary's first word


def _vf(stage, msg, failed=("x",)):
    return ivm.VerifyFailed(stage, msg, list(failed))


def _ci(stage="apply:site.yml"):
    return stage, KeyboardInterrupt()


# (command, the stage it stops at and what stops it, options) -> the lines after
# "integration-vm: " it ends with (its summary line apart), and the summary's head.
# fmt: off
ENDINGS = {
    "cycle passes":            ("cycle", None, {}, [], "PASS"),
    "cycle --keep passes":     ("cycle", None, {"keep": True},
                                [f"VM {VM} (run {VM}) kept (--keep):"], "PASS"),
    "bench passes":            ("bench", None, {}, [], "PASS"),
    "loop passes":             ("loop", None, {},
                                [f"VM {VM} (run {VM}) kept for the next loop:", LOOP_KEPT], "PASS"),
    "up passes":               ("up", None, {}, [], "PASS"),
    "apply passes":            ("apply", None, {}, [], "PASS"),
    "reboot passes":           ("reboot", None, {}, [], "PASS"),
    "assert passes":           ("assert", None, {}, [], "PASS"),
    "cycle: apply fails":      ("cycle", ("apply:site.yml", _vf("apply:site.yml", APPLY_MSG)), {},
                                [f"apply failed: {APPLY_MSG}", INSPECT], "FAIL[apply:site.yml]"),
    "cycle: REF's apply fails": ("cycle", ("from:site.yml", _vf("from:site.yml", APPLY_MSG)),
                                {"from_ref": {"ref": "main"}},
                                [f"apply of main (--from) failed: {APPLY_MSG}", INSPECT],
                                "FAIL[from:site.yml]"),
    "cycle: upgrade fails":    ("cycle", ("upgrade:site.yml", _vf("upgrade:site.yml", APPLY_MSG)),
                                {}, [f"apply failed (upgrade fails): {APPLY_MSG}", INSPECT],
                                "FAIL[upgrade:site.yml]"),
    "cycle: dead live":        ("cycle", ("verify:live", _vf("verify:live", LIVE_MSG)), {},
                                [f"verify failed (dead live): {LIVE_MSG}", INSPECT],
                                "FAIL[verify:live]"),
    "cycle: dies on reboot":   ("cycle", ("verify", _vf("verify", VERIFY_MSG)),
                                {"passed": ["verify:live"]},
                                [f"verify failed (dies on reboot): {VERIFY_MSG}", INSPECT],
                                "FAIL[verify]"),
    "cycle: reboot diff":      ("cycle", ("reboot-diff:hard", _vf("reboot-diff", DIFF_MSG)), {},
                                [f"reboot diff found differences: {DIFF_MSG}", INSPECT],
                                "FAIL[reboot-diff]"),
    "cycle: idempotence":      ("cycle", ("idempotence", _vf("idempotence", IDEM_MSG)),
                                {"idempotence": [2, "base : a", "base : b"]},
                                ["idempotence changed 2 tasks on the re-apply after the reboot: "
                                 "base : a, base : b", INSPECT], "FAIL[idempotence]"),
    "bench: idempotence, 1":   ("bench", ("idempotence", _vf("idempotence", "1 task(s) ...")),
                                {"idempotence": [1, "base : a"]},
                                ["idempotence changed 1 task on the re-apply after the reboot: "
                                 "base : a", INSPECT], "FAIL[idempotence]"),
    "cycle: idempotence's apply fails": (
                                "cycle", ("idempotence:site.yml",
                                          _vf("idempotence:site.yml", APPLY_MSG)), {},
                                [f"idempotence re-apply failed: {APPLY_MSG}", INSPECT],
                                "FAIL[idempotence:site.yml]"),
    "cycle: boot error":       ("cycle", ("boot", ivm.InfraError("dhcp-lease", "no lease")), {},
                                ["error: dhcp-lease: no lease"], "ERROR[dhcp-lease]"),
    "cycle --keep: boot error": ("cycle", ("boot", ivm.InfraError("dhcp-lease", "no lease")),
                                {"keep": True}, ["error: dhcp-lease: no lease", INSPECT],
                                "ERROR[dhcp-lease]"),
    "cycle: Ctrl-C":           ("cycle", _ci(), {}, ["interrupted during apply:site.yml"],
                                "INTERRUPTED[apply:site.yml]"),
    "cycle --keep: Ctrl-C":    ("cycle", _ci(), {"keep": True},
                                ["interrupted during apply:site.yml",
                                 f"VM {VM} (run {VM}) kept (--keep):"],
                                "INTERRUPTED[apply:site.yml]"),
    "cycle: refused (usage)":  ("cycle", ("prepare", ivm.UsageError("bad --run")), {"vm": False},
                                ["error: bad --run"], None),
    "loop: dead live":         ("loop", ("verify:live", _vf("verify:live", LIVE_MSG)), {},
                                [f"verify failed (dead live): {LIVE_MSG}", LOOP_RED, LOOP_KEPT],
                                "FAIL[verify:live]"),
    "loop: apply fails":       ("loop", ("apply:site.yml", _vf("apply:site.yml", APPLY_MSG)), {},
                                [f"apply failed: {APPLY_MSG}", LOOP_RED, LOOP_KEPT],
                                "FAIL[apply:site.yml]"),
    "loop: reboot diff":       ("loop", ("reboot-diff:graceful", _vf("reboot-diff", DIFF_MSG)), {},
                                [f"reboot diff found differences: {DIFF_MSG}", LOOP_RED,
                                 LOOP_KEPT], "FAIL[reboot-diff]"),
    "loop: dies on reboot":    ("loop", ("verify", _vf("verify", VERIFY_MSG)),
                                {"passed": ["verify:live"]},
                                [f"verify failed (dies on reboot): {VERIFY_MSG}", LOOP_RED,
                                 LOOP_KEPT], "FAIL[verify]"),
    "loop: refused by a guard": ("loop", ("boot", ivm.InfraError("guard", GUARD_MSG)),
                                {"vm": False}, [f"error: guard: {GUARD_MSG}", NOT_THE_GATE],
                                "ERROR[guard]"),
    "loop: boot error":        ("loop", ("boot", ivm.InfraError("tcp-22", "no answer")), {},
                                ["error: tcp-22: no answer", LOOP_GONE], "ERROR[tcp-22]"),
    "loop: Ctrl-C":            ("loop", _ci(), {}, ["interrupted during apply:site.yml", LOOP_GONE],
                                "INTERRUPTED[apply:site.yml]"),
    "up: boot error":          ("up", ("boot", ivm.InfraError("tcp-22", "no answer")), {},
                                ["error: tcp-22: no answer"], "ERROR[tcp-22]"),
    "apply: apply fails":      ("apply", ("apply:site.yml", _vf("apply:site.yml", APPLY_MSG)), {},
                                [f"apply failed: {APPLY_MSG}", INSPECT], "FAIL[apply:site.yml]"),
    "apply: Ctrl-C":           ("apply", _ci(), {},
                                ["interrupted during apply:site.yml",
                                 f"VM {VM} (run {VM}) left up (this command did not create it):"],
                                "INTERRUPTED[apply:site.yml]"),
    "assert: verify fails":    ("assert", ("verify", _vf("verify", VERIFY_MSG)), {},
                                [f"verify failed: {VERIFY_MSG}", INSPECT], "FAIL[verify]"),
    "reboot: reboot diff":     ("reboot", ("reboot-diff:hard", _vf("reboot-diff", DIFF_MSG)), {},
                                [f"reboot diff found differences: {DIFF_MSG}", INSPECT],
                                "FAIL[reboot-diff]"),
    "reboot: reboot error":    ("reboot", ("reboot:graceful",
                                           ivm.InfraError("reboot:graceful", "boot_id unchanged")),
                                {}, ["error: reboot:graceful: boot_id unchanged", INSPECT],
                                "ERROR[reboot:graceful]"),
    "cycle --expect-fail=verify:live, dead live": (
                                "cycle", ("verify:live", _vf("verify:live", LIVE_MSG)),
                                {"expect_fail": "verify:live"},
                                [f"verify failed (dead live): {LIVE_MSG}"],
                                "FAIL (expected fail)[verify:live]"),
    "cycle --expect-fail=apply, apply fails": (
                                "cycle", ("apply:site.yml", _vf("apply:site.yml", APPLY_MSG)),
                                {"expect_fail": "apply"}, [f"apply failed: {APPLY_MSG}"],
                                "FAIL (expected fail)[apply:site.yml]"),
    "cycle --expect-fail, passes": (
                                "cycle", None, {"expect_fail": "verify"},
                                ["verify PASSED but --expect-fail=verify was given"],
                                "PASS (expected FAIL at verify)"),
    "cycle --expect-fail, apply fails": (
                                "cycle", ("apply:site.yml", _vf("apply:site.yml", APPLY_MSG)),
                                {"expect_fail": "verify"},
                                [f"apply failed: {APPLY_MSG}", INSPECT,
                                 "failed at apply:site.yml, not at the expected stage verify "
                                 "(--expect-fail)"],
                                "FAIL (expected FAIL at verify)[apply:site.yml]"),
}
# fmt: on


def _end_session(tmp_path, monkeypatch, command, stop, opts):
    """A session of `command` whose phases stop as `stop` says ((stage, exception): the
    exception raised inside that stage's timed phase; None: it passes), with diagnostics
    and teardown stubbed. Its stdout and stderr."""
    monkeypatch.setattr(ivm.Session, "_ignore_signals", lambda: None)
    monkeypatch.setattr(ivm.Diagnostics, "collect_diagnostics", lambda ctx, rs, why: "/diag")
    monkeypatch.setattr(ivm.Machine, "destroy", lambda m: None)
    ctx = plain_ctx(tmp_path)
    rs = ivm.RunState(ctx, ivm.RunRecord(VM, "askari", ip="192.0.2.7", state="up"))

    def phase(ctx, args, run):
        if opts.get("vm", True):
            run.attach(rs)
        if "from_ref" in opts:
            run.result.from_ref = opts["from_ref"]
        for name in opts.get("passed", ()):
            with ivm.Utilities.timed_phase(ctx, run.result, name):
                pass
        if "idempotence" in opts:
            n, *tasks = opts["idempotence"]
            run.result.idempotence = {"changed": n, "changed_tasks": tasks}
        if stop is not None:
            with ivm.Utilities.timed_phase(ctx, run.result, stop[0]):
                raise stop[1]

    monkeypatch.setitem(ivm.Session.SESSION_PHASES, command, (phase, ivm.Session.phase_finish))
    args = ivm.Options(
        host="askari", keep=opts.get("keep", False), expect_fail=opts.get("expect_fail")
    )
    ivm.Session.run_session(ctx, args, command)


@pytest.mark.parametrize("ending", ENDINGS)
def test_each_ending_says_what_happened(ending, tmp_path, monkeypatch, capsys):
    command, stop, opts, lines, summary = ENDINGS[ending]
    _end_session(tmp_path, monkeypatch, command, stop, opts)
    out = capsys.readouterr()
    said = [
        ln.removeprefix("integration-vm: ")
        for ln in (out.err + out.out).splitlines()
        if ln.startswith("integration-vm: ")
    ]
    heads = [s for s in said if s.split(" ", 1)[0].split("[")[0] in SUMMARY_HEADS]
    assert [s for s in said if s not in heads] == lines
    assert [h.split(" askari ")[0] for h in heads] == ([summary] if summary else [])


# ---- every text in junit.xml is one XML can carry (issue 27, class 2b) -----------------
def test_junit_parses_whatever_the_guest_printed(h):
    # stop-job descriptions and timer-job names come from the guest's console/SSH output
    hostile = "evil\x01\x02\x0b\x0c\x1b[31m\x7f\ufffe unit"
    j = h.tmp / "j.xml"
    p = h.run(
        "cycle",
        "--host",
        "askari",
        "--no-idempotence",
        "--junit",
        str(j),
        FAKE_SHUTDOWN_STOP_JOB=hostile,
        FAKE_TIMER_JOBS="tick\x05.service",
    )
    assert p.returncode == 0, p.stderr
    root = ET.parse(j).getroot()  # CI loses the whole report when this raises
    text = ET.tostring(root, encoding="unicode")
    assert "evil" in text and "tick.service" in text


def test_render_junit_drops_what_xml_forbids_and_bounds_every_text():
    r = _result(verdict="fail", failed_stage="verify")
    r["phase_details"][5].update(
        status="fail", message="m\x00\x08" + "x" * 1000, detail="d\x1f" + "y" * 10**6
    )
    r["verify_tasks"] = [{"name": "t\x03" * 2000, "status": "failed", "message": "\x0e"}]
    xml = ivm.Reporting.render_junit(r)
    root = ET.fromstring(xml)
    assert len(xml) < 200_000
    case = [c for c in root.iter("testcase") if c.get("name") == "verify"][0]
    assert case.find("failure").get("message") == "m" + "x" * 299
    assert case.find("failure").text.startswith("d" + "y" * 100)
    assert "more characters cut" in case.find("failure").text
