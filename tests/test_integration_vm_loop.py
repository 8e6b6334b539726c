"""The quick loop (issue 13): resume the newest valid checkpoint, apply what the edit
invalidated, one graceful reboot with its state diff, verify, leave the VM up; and the
bench that compares it with the cold and warm full cycles. Against the fake binaries."""

import json

# hc: the checkpoint suite's fake-harness fixture (checkpoints on), shared, not copied
from test_integration_vm_checkpoints import ckpt_manifests, edit, hc, ivm, result_of  # noqa: F401


def ran(h, *args, **env):
    """Run the driver; (process, the result.json of the run its summary line names).
    Never "the newest started_at": one-second resolution, and two quick runs tie."""
    p = h.run(*args, **env)
    return p, result_of(h, p)


def phases(result):
    return {p["name"]: p["status"] for p in result["phase_details"]}


def test_loop_without_a_checkpoint_boots_cold_reboots_once_and_keeps_the_vm(hc):
    p, r = ran(hc, "loop", "--host", "askari")
    assert p.returncode == 0, p.stderr
    assert r["command"] == "loop" and r["verdict"] == "pass" and r["kept"] is True
    assert r["reboot_modes"] == ["graceful"] and r["idempotence"] is None
    names = phases(r)
    assert "boot" in names and "verify" in names and "reboot:graceful" in names
    assert not [n for n in names if n.startswith(("idempotence", "reboot:hard", "teardown"))]
    # it wrote the chain the next loop resumes from, and says it is not the gate
    assert sorted(ckpt_manifests(hc)) == ["applied-1", "applied-2", "booted"]
    assert "This is NOT the gate" in p.stderr and "make test-integration HOST=askari" in p.stderr
    (vm,) = hc.domains()
    assert hc.domains()[vm]["state"] == "running"
    run = json.loads((hc.run_root / r["vm"] / "run.json").read_text())
    assert run["kept_by"] == "loop" and run["state"] == "up"


def test_the_next_loop_retires_the_last_one_and_resumes_what_the_edit_left_valid(hc):
    p, first = ran(hc, "loop", "--host", "askari")
    assert p.returncode == 0, p.stderr
    edit(hc.repo / "roles" / "docker_host" / "templates" / "x.j2")
    p, r = ran(hc, "loop", "--host", "askari")
    assert p.returncode == 0, p.stderr
    assert f"tearing down the previous quick loop's VM {first['vm']}" in p.stderr
    assert "resumed from checkpoint applied-1" in p.stderr
    assert r["vm"] != first["vm"] and r["resumed_from"]["stage"] == "applied-1"
    assert {n: s for n, s in phases(r).items() if n.startswith("apply:")} == {
        "apply:site.yml": "skipped",
        "apply:offsite.yml": "pass",
    }
    assert len(hc.domains()) == 1  # the first loop's VM is gone, this one is up
    old = json.loads((hc.run_root / first["vm"] / "run.json").read_text())
    assert old["state"] == "down"


def test_a_cycle_retires_a_loop_vm_but_never_a_kept_one(hc):
    p, kept = ran(hc, "cycle", "--host", "askari", "--keep")
    assert p.returncode == 0, p.stderr
    assert hc.run("down", "--run", kept["vm"]).returncode == 0
    p, loop = ran(hc, "loop", "--host", "askari")
    assert p.returncode == 0, p.stderr
    p = hc.run("cycle", "--host", "askari")
    assert p.returncode == 0, p.stderr
    assert f"previous quick loop's VM {loop['vm']}" in p.stderr
    assert hc.domains() == {}
    # an operator's --keep VM is not a loop's: a loop refuses to run beside it (one slot)
    assert hc.run("cycle", "--host", "askari", "--keep").returncode == 0
    p = hc.run("loop", "--host", "askari")
    assert p.returncode == 3 and "previous quick loop" not in p.stderr
    assert len(hc.domains()) == 1


def test_a_loop_whose_verify_fails_is_exit_1_and_keeps_the_vm(hc):
    p, r = ran(hc, "loop", "--host", "askari", FAKE_VERIFY_FAIL="1")
    assert p.returncode == 1, p.stderr
    assert r["verdict"] == "fail" and r["failed_stage"] == "verify" and r["kept"] is True
    assert r["failures"] == ["published :443 answers from the controller"]
    assert len(hc.domains()) == 1


def test_bench_runs_cold_loop_and_warm_after_the_same_edit_and_leaves_nothing(hc):
    before = hc.repo / ivm.BENCH_DEFAULT_EDIT
    before.parent.mkdir(parents=True, exist_ok=True)
    before.write_text("table inet filter {}\n")
    text = before.read_text()
    p = hc.run("bench", "--host", "askari", timeout=180)
    assert p.returncode == 0, p.stderr
    assert before.read_text() == text  # edits only ever in a copy
    out = p.stdout
    assert "loop resumed from applied-1" in out and "warm resumed from applied-1" in out
    assert "loop/cold = " in out and "warm/cold = " in out
    # the fakes have no Mitogen: the bench says so instead of comparing linear with itself
    assert "transport: not compared (Mitogen does not load" in out
    # (the order is the comparison's: cold, loop, warm; started_at may tie within a second)
    assert sorted(r["command"] for r in hc.results()) == ["bench", "bench", "loop"]
    assert hc.domains() == {}


def test_bench_comparison_puts_cold_loop_and_warm_side_by_side_with_the_targets():
    cold = {
        "total_seconds": 700.0,
        "transport": ivm.transport_figures({"linear": 100.0, "mitogen_linear": 20.0}),
        "phase_details": [
            {"name": "boot", "seconds": 40.0},
            {"name": "apply:site.yml", "seconds": 200.0},
            {"name": "transport:linear", "seconds": 100.0},
            {"name": "transport:mitogen_linear", "seconds": 20.0},
        ],
    }
    loop = {
        "total_seconds": 140.0,
        "resumed_from": {"stage": "applied-1"},
        "phase_details": [{"name": "resume", "seconds": 9.0}],
    }
    warm = {
        "total_seconds": 330.0,
        "resumed_from": {"stage": "applied-1"},
        "phase_details": [{"name": "resume", "seconds": 9.0}],
    }
    text = ivm.format_bench_comparison(cold, warm, "roles/x/y.j2", loop=loop)
    lines = text.splitlines()
    assert lines[1].split() == ["phase", "cold", "loop", "warm"]
    # the cold total is the cycle's own: the transport comparison is taken out
    assert [ln.split() for ln in lines if ln.startswith("total")] == [
        ["total", "580.0", "140.0", "330.0"]
    ]
    assert "loop/cold = 0.24 (target <= 0.25) (met)" in text
    assert "warm/cold = 0.57 (target <= 0.5) (NOT met)" in text
    assert "linear 2.5s vs mitogen 0.5s per call = 5.0x (target >= 4) (met)" in text


def test_transport_figures():
    t = ivm.transport_figures({"linear": 88.0, "mitogen_linear": 16.0}, calls=40)
    assert t == {
        "linear": {"seconds": 88.0, "per_call": 2.2},
        "mitogen_linear": {"seconds": 16.0, "per_call": 0.4},
        "calls": 40,
        "speedup": 5.5,
    }


# ---- where the reboots' time goes (issue 13) ------------------------------------------
def test_slow_boot_warnings_compare_each_reboot_with_the_last_pass():
    last = [
        {"mode": "graceful", "seconds_to_running": 60.0},
        {"mode": "hard", "seconds_to_running": 50.0},
    ]
    assert (
        ivm.slow_boot_warnings(
            last,
            [
                {"mode": "graceful", "seconds_to_running": 80.0},
                {"mode": "hard", "seconds_to_running": 60.0},
            ],
        )
        == []
    )
    (w,) = ivm.slow_boot_warnings(
        last,
        [
            {"mode": "graceful", "seconds_to_running": 100.0},
            {"mode": "hard", "seconds_to_running": 70.0},
        ],
    )
    assert w.startswith("the graceful reboot took 100s to `running`, 1.7x the last passing")
    # slower by the factor but not by the slack: no line (TCG noise on short boots)
    assert (
        ivm.slow_boot_warnings(
            [{"mode": "hard", "seconds_to_running": 10.0}],
            [{"mode": "hard", "seconds_to_running": 24.0}],
        )
        == []
    )
    assert ivm.slow_boot_warnings(None, [{"mode": "hard", "seconds_to_running": 99.0}]) == []
    assert (
        ivm.slow_boot_warnings(
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


def test_a_cycle_with_two_reboots_captures_three_times_not_four(hc):
    prof = hc.repo / "tests" / "integration" / "profiles" / "askari.json"
    data = json.loads(prof.read_text())
    data["reboot"] = ["graceful", "hard"]
    prof.write_text(json.dumps(data))
    p, r = ran(hc, "cycle", "--host", "askari", "--no-checkpoints")
    assert p.returncode == 0, p.stderr
    captures = [c for c in hc.calls("ssh") if "sudo -n sh -s" in c["argv"]]
    assert len(captures) == 3  # the graceful reboot's `after` is the hard one's `before`
    # only the captures after a boot run systemd-analyze (a before describes the old boot);
    # the hard reboot's before IS the graceful one's after, analysis included
    d = hc.diag / r["vm"]
    assert not (d / "reboot-1-graceful" / "before" / "boot-analysis.txt").exists()
    for side in ("reboot-1-graceful/after", "reboot-2-hard/before", "reboot-2-hard/after"):
        assert (d / side / "boot-analysis.txt").is_file(), side
    assert [d["mode"] for d in r["reboot_diffs"]] == ["graceful", "hard"]
    assert all(d["unexpected"] == [] for d in r["reboot_diffs"])
