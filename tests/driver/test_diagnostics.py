"""Diagnostics and teardown: what a failed run leaves behind, how a run goes away, and the
guards that keep teardown to the harness's own files.
"""

import json
import os
import pathlib
import signal
import time
import types
import xml.etree.ElementTree as ET

import pytest
from conftest import intact, victim


def test_verify_failure_keeps_vm_and_writes_diagnostics(h):
    p = h.run(
        "cycle",
        "--host",
        "askari",
        "--junit",
        str(h.tmp / "j.xml"),
        FAKE_VERIFY_FAIL="1",
        in_process=False,
    )  # exit status 1 from a real process
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    (res,) = h.results()
    assert res["verdict"] == "fail" and res["failed_stage"] == "verify"
    assert res["failures"] == ["published :443 answers from the controller"]
    assert res["kept"] is True
    vm = res["vm"]
    assert h.domains()[vm]["state"] == "running"  # kept for inspection
    diag = pathlib.Path(res["diagnostics"])
    assert diag == h.diag / vm
    for f in (
        "SUMMARY.txt",
        "nft-ruleset.txt",
        "nft-ruleset.json",
        "journal-this-boot.txt",
        "journal-previous-boot.txt",
        "console.log",
        "domain.xml",
        "domifaddr.txt",
        "net-dhcp-leases.txt",
        "failed-units.txt",
        "cloud-init.log",
        "result.json",
    ):
        assert (diag / f).is_file(), f
    assert "policy drop" in (diag / "nft-ruleset.txt").read_text()
    assert "nft-ruleset.txt" in (diag / "SUMMARY.txt").read_text()
    assert "virsh --connect test:///fake console " + vm in p.stderr
    assert "StrictHostKeyChecking=yes" in p.stderr and "down --run " + vm in p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("integration-vm: FAIL[verify] askari")
    root = ET.parse(h.tmp / "j.xml").getroot()
    failed = [tc.get("name") for tc in root.iter("testcase") if tc.find("failure") is not None]
    assert "verify: published :443 answers from the controller" in failed
    # the kept VM can be torn down; twice is fine
    assert h.run("down", "--run", vm).returncode == 0
    assert vm not in h.domains()
    d2 = h.run("down", "--run", vm)
    assert d2.returncode == 0 and "already down" in d2.stdout


def cycle_in_its_apply(h):
    """A cycle as its own process, once its first apply is running (a minute long)."""
    proc = h.popen("cycle", "--host", "askari", FAKE_APPLY_SLEEP="60")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not h.calls("ansible-playbook"):
        time.sleep(0.05)
    assert h.calls("ansible-playbook"), "apply never started"
    time.sleep(0.3)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_apply_tears_down(h, sig):
    proc = cycle_in_its_apply(h)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert h.domains() == {}
    assert not any((h.cache / "runs").iterdir())
    (res,) = h.results()
    assert res["verdict"] == "interrupted" and res["failed_stage"] == "apply:site.yml"
    pb_pid = h.calls("ansible-playbook")[0]["pid"]
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pb_pid, 0)


def test_a_sigterm_after_the_readers_of_its_output_are_gone_still_tears_down(h):
    # rehearsal 6 (2026-12-07): .ci/run's EXIT trap stopped a background job; the pytest
    # reading the driver's pipes died first, the driver's interrupt line hit the closed
    # pipe, and the run ended (exit 120) with its VM up and no result.json
    proc = cycle_in_its_apply(h)
    proc.stdout.close()
    proc.stderr.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    assert h.domains() == {}
    (res,) = h.results()
    assert res["verdict"] == "interrupted" and res["failed_stage"] == "apply:site.yml"


def plant_run(h, dirname, data):
    d = h.run_root / dirname
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return d


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


def test_a_guest_that_floods_its_diagnostics_commands_leaves_a_bounded_bundle(
    tmp_path, monkeypatch
):
    # 2c: a guest printing without end into every diagnostics command
    from conftest import ivm

    monkeypatch.setattr(ivm.Diagnostics, "DIAG_GUEST_MAX", 5 << 20)
    calls = []

    def ssh(cmd, timeout):
        calls.append(cmd)
        return ivm.Proc([], 0, "g" * (2 << 20), "", False)

    rs = types.SimpleNamespace(ssh=ssh)
    ctx = types.SimpleNamespace(bounds={"diag-command": 5})
    notes = []
    ivm.Diagnostics._collect_guest_files(ctx, rs, tmp_path, notes)
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total <= 5 << 20
    assert len(calls) == 3 and len(notes) == len(ivm.Diagnostics.GUEST_DIAG_COMMANDS) - 3
    assert "bytes are full" in notes[0]


def test_the_console_log_in_the_bundle_is_its_tail(tmp_path):
    src = tmp_path / "console.log"
    src.write_bytes(b"a" * 5000 + b"the end")
    ivm_copy = tmp_path / "copy"
    from conftest import ivm

    ivm.Diagnostics.copy_tail(src, ivm_copy, 100)
    data = ivm_copy.read_bytes()
    assert data.startswith(b"[... first 4907 bytes cut]\n") and data.endswith(
        b"a" * 93 + b"the end"
    )
