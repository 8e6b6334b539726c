"""The session as data: a Run per session (not a holder dict, not fields on Ctx), the
phase list per command, the one failure-policy table and the bench's SessionOptions."""

import dataclasses
import types

import pytest
from conftest import load_script

ivm = load_script("integration-vm.py", "integration_vm")


def _ctx(tmp_path):
    return ivm.Ctx(
        repo=tmp_path,
        run_parent=tmp_path / ".run",
        cache=tmp_path / "cache",
        diag_root=tmp_path / "diag",
        uri="test:///",
        environ={},
    )


class _Slot:
    closed = False

    def close(self):
        self.closed = True


@pytest.fixture
def calls(monkeypatch):
    """Diagnostics, teardown and the inspection help, recorded instead of run."""
    seen = []
    monkeypatch.setattr(ivm, "_ignore_signals", lambda: None)
    monkeypatch.setattr(
        ivm, "collect_diagnostics", lambda ctx, rs, why: seen.append(("diag", why)) or "/d"
    )
    monkeypatch.setattr(ivm, "down_run", lambda ctx, rs: seen.append(("down", rs.name)))
    monkeypatch.setattr(ivm, "inspection_help", lambda ctx, rs: seen.append(("help", rs.name)))
    return seen


def _run(command="cycle", rs=True, expect_fail=False):
    result = ivm.new_result(command, "askari")
    result["expect_fail"] = expect_fail
    state = types.SimpleNamespace(name="boma-it-askari-0123abcd") if rs else None
    return ivm.Run(command=command, result=result, rs=state)


ARGS = types.SimpleNamespace(keep=False)


# ---- the failure policy -----------------------------------------------------------------
def test_the_failure_policy_is_one_table():
    p = ivm.FAILURE_POLICY
    assert (p["verify"].verdict, p["verify"].diagnostics, p["verify"].end) == (
        "fail",
        True,
        "keep",
    )
    assert (p["infra"].diagnostics, p["infra"].end, p["infra"].exit_code) == (True, "destroy", 3)
    assert (p["usage"].diagnostics, p["usage"].end, p["usage"].exit_code) == (False, "leave", 2)
    assert (p["interrupt"].diagnostics, p["interrupt"].end) == (False, "destroy")
    assert p["interrupt"].exit_code == ivm.EXIT_INTERRUPTED
    assert ivm.ERROR_KINDS == {ivm.EXIT_INFRA: "infra", ivm.EXIT_USAGE: "usage"}


def test_verify_failure_collects_diagnostics_and_keeps_the_vm(tmp_path, calls, capsys):
    run = _run()
    e = ivm.VerifyFailed("verify", "2 tasks failed", ["a", "b"])
    assert ivm.on_failure(_ctx(tmp_path), ARGS, run, "verify", e) == ivm.EXIT_VERIFY
    assert calls == [("diag", "verify: 2 tasks failed"), ("help", run.rs.name)]
    r = run.result
    assert (r["verdict"], r["failed_stage"], r["failures"], r["kept"]) == (
        "fail",
        "verify",
        ["a", "b"],
        True,
    )
    assert "integration-vm: verify failed: 2 tasks failed" in capsys.readouterr().err


def test_the_verify_failure_expect_fail_names_is_torn_down(tmp_path, calls):
    run = _run(expect_fail="verify")
    e = ivm.VerifyFailed("verify", "failed as planted")
    ivm.on_failure(_ctx(tmp_path), ARGS, run, "verify", e)
    assert ("down", run.rs.name) in calls and run.result["kept"] is False


def test_infra_error_destroys_what_this_invocation_created_unless_keep(tmp_path, calls):
    e = ivm.InfraError("boot", "no lease")
    run = _run()
    assert ivm.on_failure(_ctx(tmp_path), ARGS, run, "infra", e) == ivm.EXIT_INFRA
    assert calls == [("diag", "boot: no lease"), ("down", run.rs.name)]
    calls.clear()
    kept = _run()
    ivm.on_failure(_ctx(tmp_path), types.SimpleNamespace(keep=True), kept, "infra", e)
    assert calls == [("diag", "boot: no lease"), ("help", kept.rs.name)]
    calls.clear()
    theirs = _run("apply")  # apply acts on a VM another invocation created: kept
    ivm.on_failure(_ctx(tmp_path), ARGS, theirs, "infra", e)
    assert ("down", theirs.rs.name) not in calls and theirs.result["kept"] is True


def test_usage_error_leaves_the_run_as_it_is_without_a_word(tmp_path, calls, capsys):
    for run in (_run(rs=False), _run()):
        e = ivm.UsageError("bad --run")
        assert ivm.on_failure(_ctx(tmp_path), ARGS, run, "usage", e) == ivm.EXIT_USAGE
        assert run.result["verdict"] == "error" and run.result["kept"] is False
    assert calls == []
    assert capsys.readouterr().err.count("integration-vm: error: bad --run") == 2


def test_interrupt_tears_down_without_diagnostics_and_says_so(tmp_path, calls, capsys):
    run = _run()
    run.result["phase_details"].append({"name": "apply:site.yml", "status": "interrupted"})
    assert ivm.on_failure(_ctx(tmp_path), ARGS, run, "interrupt", None) == 130
    assert calls == [("down", run.rs.name)]
    assert run.result["failed_stage"] == "apply:site.yml"
    err = capsys.readouterr().err
    assert "\nintegration-vm: interrupted" in err and f"tearing down {run.rs.name}" in err


# ---- the phase list ---------------------------------------------------------------------
def test_each_session_command_is_an_ordered_phase_list():
    ph = ivm.SESSION_PHASES
    assert set(ph) == {"up", "apply", "reboot", "assert", "cycle", "loop", "bench"}
    for command, phases in ph.items():
        assert phases[0] is ivm.phase_prepare and phases[-1] is ivm.phase_finish
        first_vm = ivm.phase_provision if command in ivm.CREATING_COMMANDS else ivm.phase_attach
        assert first_vm in phases
    gate = [p.__name__ for p in ph["cycle"]]
    assert (
        gate.index("phase_converge")
        < gate.index("phase_reboots")
        < gate.index("phase_assert")
        < gate.index("phase_idempotence")
    )
    assert ph["bench"] == ph["cycle"] and ivm.phase_idempotence not in ph["loop"]


def test_a_session_runs_its_phases_on_one_run_and_ends_by_the_policy(tmp_path, calls, monkeypatch):
    ctx, seen, slot = _ctx(tmp_path), [], _Slot()

    def first(ctx, args, run):
        assert ctx.run is run and ctx.bounds is run.bounds  # the active run's bounds
        run.rs, run.slot = types.SimpleNamespace(name="boma-it-askari-0123abcd"), slot
        seen.append("first")

    def second(ctx, args, run):
        raise ivm.InfraError("apply:site.yml", "unreachable")

    def never(ctx, args, run):
        seen.append("never")

    monkeypatch.setitem(ivm.SESSION_PHASES, "up", (first, second, never))
    monkeypatch.setattr(ivm, "note_boot_times", lambda *a: None)
    # the VM slot is held until after the teardown
    monkeypatch.setattr(ivm, "down_run", lambda ctx, rs: seen.append(("down", slot.closed)))
    args = types.SimpleNamespace(keep=False, host="askari", junit=None)
    run = ivm.run_session(ctx, args, "up")
    assert seen == ["first", ("down", False)] and slot.closed
    assert run.exit_code == ivm.EXIT_INFRA and run.reported
    assert run.result["failed_stage"] == "apply:site.yml" and run.result["exit_code"] == 3
    assert ctx.run is None  # the session bound a copy of the caller's context, not it


def test_a_usage_error_before_anything_exists_writes_no_summary(tmp_path, monkeypatch, capsys):
    def bad(ctx, args, run):
        raise ivm.UsageError("no such host")

    monkeypatch.setattr(ivm, "_ignore_signals", lambda: None)
    monkeypatch.setitem(ivm.SESSION_PHASES, "up", (bad,))
    args = types.SimpleNamespace(keep=False, host="nope", junit=None)
    assert ivm.session(_ctx(tmp_path), args, "up") == ivm.EXIT_USAGE
    out = capsys.readouterr()
    assert out.out == "" and out.err == "integration-vm: error: no such host\n"


# ---- the run owns its state, Ctx only configuration ---------------------------------------
def test_ctx_carries_no_run_state(tmp_path):
    with pytest.raises(dataclasses.FrozenInstanceError):
        _ctx(tmp_path).poll = 1.0  # configuration, fixed for the process
    fields = {f.name for f in dataclasses.fields(ivm.Ctx)}
    gone = {"bounds", "cmdlog", "checkpoint_chain", "bench_phase", "bench_transport"}
    assert not fields & (gone | {"last_result", "strategy"})
    run_fields = {f.name for f in dataclasses.fields(ivm.Run)}
    assert {"rs", "slot", "result", "bounds", "cmdlog", "checkpoint_chain", "strategy"} <= (
        run_fields
    )


def test_attaching_a_run_state_moves_the_command_log(tmp_path):
    ctx = _ctx(tmp_path)
    assert ctx.cmdlog is None and ctx.bounds == {}
    run = ivm.Run(bounds={"virsh": 5.0})
    ctx = dataclasses.replace(ctx, run=run)
    run.attach(ivm.RunState(ctx, {"name": "boma-it-askari-0123abcd"}))
    assert ctx.cmdlog == tmp_path / ".run" / "boma-it-askari-0123abcd" / "logs" / "commands.log"
    assert ctx.bounds == {"virsh": 5.0}


def test_bench_legs_are_session_options_not_ctx_flags():
    cold, only, after = ivm.BENCH_COLD, ivm.BENCH_ONLY, ivm.BENCH_AFTER_EDIT
    assert cold.cold_image and cold.fresh_checkpoints and cold.time_transports
    assert only.cold_image and only.time_transports and not only.fresh_checkpoints
    for leg in after.values():  # the loop and the warm cycle: cached image, keep the chain
        assert not (leg.cold_image or leg.fresh_checkpoints or leg.time_transports)
        assert leg.gc_outdated is False
    assert ivm.SessionOptions() == ivm.SessionOptions(gc_outdated=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cold.cold_image = False


# ---- run.json and result.json: one schema each -----------------------------------------
def test_new_result_is_the_result_records_defaults():
    r = ivm.new_result("cycle", "askari")
    assert r == ivm.ResultRecord(command="cycle", host="askari").to_json()
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


def test_result_json_is_written_through_its_schema(tmp_path, capsys):
    ctx = _ctx(tmp_path)
    rs = ivm.RunState(ctx, {"name": "boma-it-askari-0123abcd", "host": "askari"})
    result = ivm.new_result("cycle", "askari")
    ivm.finish_result(ctx, result, rs, strategy={"used": "linear"})
    written = (rs.dir / "result.json").read_text()
    assert '"ansible_strategy"' in written and '"vm": "boma-it-askari-0123abcd"' in written
    (rs.dir / "result.json").unlink()
    result["typo_field"] = 1  # a field nobody declared is not written silently
    ivm.finish_result(ctx, result, rs)
    assert not (rs.dir / "result.json").exists()
    assert "undeclared field(s) typo_field" in capsys.readouterr().err
