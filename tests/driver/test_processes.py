"""The process section: `run` (bounded, its own process group, logged) and its thin wrappers."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ivm


def test_virsh_argv_always_connects():
    assert ivm.virsh_argv("qemu:///system", "domstate", "x") == [
        "virsh",
        "--connect",
        "qemu:///system",
        "domstate",
        "x",
    ]


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


def test_a_poll_is_one_line_of_the_command_log_and_a_count(tmp_path):
    # A wait polls up to four times a second: the log keeps every command, but a run of
    # the same one is a line and a count, written when the next command comes.
    log = tmp_path / "commands.log"
    poll = ["virsh", "domifaddr", "vm", "--source", "lease"]
    for argv in (poll, poll, poll, ["ssh", "vm", "true"], poll):
        ivm._log_command(log, argv)
    lines = [ln.split(" ", 1)[1] for ln in log.read_text().splitlines()]
    assert lines == [
        "virsh domifaddr vm --source lease",
        "(the command above ran 2 more times until here)",
        "ssh vm true",
        "virsh domifaddr vm --source lease",
    ]


def test_a_count_still_pending_when_the_run_ends_is_written(tmp_path, monkeypatch):
    # The last command of a run may be a poll (a wait that timed out, a kept VM): its
    # count has no next command to write it, so the session's end does.
    log = tmp_path / "commands.log"
    poll = ["virsh", "domstate", "vm"]

    def polls(ctx, args, run):
        for _ in range(3):
            ivm._log_command(run.cmdlog, poll)

    monkeypatch.setitem(ivm.Session.SESSION_PHASES, "up", (polls,))
    run = ivm.Run(command="up", cmdlog=log)
    assert ivm.Session.run_phases(None, None, run) == ivm.EXIT_PASS
    lines = [ln.split(" ", 1)[1] for ln in log.read_text().splitlines()]
    assert lines == ["virsh domstate vm", "(the command above ran 2 more times until here)"]
    ivm._log_command(log, poll)  # a new run's first command is a line of its own
    assert log.read_text().splitlines()[-1].endswith(" virsh domstate vm")


def test_a_timeout_ends_even_when_another_session_holds_the_pipes(tmp_path, monkeypatch):
    # A shared SSH connection's master (its own session, so outside the killed group)
    # holds the session's stdout while the remote command runs on: the read after the
    # kill waited for an EOF that never came, and a CI run hung for good at a reboot.
    monkeypatch.setattr(ivm, "DRAIN_GRACE", 0.5)
    holder = tmp_path / "holder.pid"
    argv = ["sh", "-c", f"setsid sh -c 'echo $$ > {holder}; exec sleep 60' & sleep 60"]
    t0 = time.monotonic()
    try:
        res = ivm.run(argv, timeout=1)
        assert res.timed_out and res.returncode == 124
        assert time.monotonic() - t0 < 1 + 0.5 + 3  # its bound, the drain's grace, slack
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(holder.read_text()), signal.SIGKILL)


# ---- guest output is read with a cap (issue 27, class 2c) -------------------------------
def test_run_max_output_keeps_only_the_tail_of_each_stream():
    # 24 MiB on stdout, 3 MiB on stderr, stdin echoed: the driver keeps 1 MiB of each
    script = (
        "import sys; d = sys.stdin.read(); w = sys.stdout.write\n"
        "for i in range(24): w(('%02d' % i) * (1 << 19))\n"
        "sys.stderr.write('e' * (3 << 20) + 'END'); w('tail:' + d)\n"
    )
    r = ivm.run([sys_executable(), "-c", script], timeout=60, input="fed", max_output=1 << 20)
    assert r.returncode == 0 and not r.timed_out
    assert r.stdout.startswith("[... first ") and r.stdout.endswith("2323tail:fed")
    assert len(r.stdout) < (1 << 20) + 100 and len(r.stderr) < (1 << 20) + 100
    assert r.stderr.endswith("eeeEND")


def test_run_max_output_still_ends_at_its_bound():
    t0 = time.monotonic()
    r = ivm.run(
        [sys_executable(), "-c", "import time; print('x', flush=True); time.sleep(30)"],
        timeout=0.5,
        max_output=1 << 10,
    )
    assert r.timed_out and r.returncode == 124 and r.stdout == "x\n"
    assert time.monotonic() - t0 < 0.5 + 3.5
