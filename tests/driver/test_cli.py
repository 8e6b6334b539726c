"""CLI: the parser, its usage errors and help text."""

import argparse
import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ASKARI, DRIVER, assert_nothing_created, assert_one_line_error, ivm


@pytest.mark.parametrize(
    "setup,args,code,needle",
    [
        (
            None,
            ["cycle", "--host", "nosuch"],
            2,
            "no profile tests/integration/profiles/nosuch.json (known: askari, askari-regression)",
        ),
        ("badjson", ["cycle", "--host", "broken"], 2, "broken.json: invalid JSON at line 3"),
        ("missingkey", ["cycle", "--host", "broken"], 2, "missing required key 'applies'"),
        ("badtype", ["cycle", "--host", "broken"], 2, "key 'mem_mib' must be int"),
        (
            "badplaybook",
            ["cycle", "--host", "broken"],
            2,
            "playbooks/nope.yml, which does not exist",
        ),
        ("badextends", ["cycle", "--host", "broken"], 2, "key 'extends' names 'ghost'"),
        (
            None,
            ["cycle", "--host", "askari", "--certs", "le-prod-wildcard"],
            2,
            "--allow-prod-certs",
        ),
        (None, ["cycle", "--host", "Bad/Name"], 2, "invalid host name"),
        ("notool", ["cycle", "--host", "askari"], 3, "required tool 'cloud-localds' not found"),
        ("libvirtdown", ["cycle", "--host", "askari"], 3, "libvirtd not reachable at test:///fake"),
        ("lowram", ["up", "--host", "askari"], 3, "MemAvailable"),
        ("noansible", ["cycle", "--host", "askari"], 3, "ansible-playbook not found"),
        (
            "novault",
            ["cycle", "--host", "askari", "--certs", "le-staging"],
            2,
            "--certs le-staging needs the production vault password (scripts/vault-password.sh: "
            "vault-password: no vault password",
        ),
    ],
)
def test_bad_input(h, setup, args, code, needle):
    prof = h.repo / "tests" / "integration" / "profiles" / "broken.json"
    env = {}
    if setup == "badjson":
        prof.write_text('{\n  "groups": ["a"],\n  "applies": [}\n')
    elif setup == "missingkey":
        prof.write_text(json.dumps({"groups": ["a"]}))
    elif setup == "badtype":
        prof.write_text(json.dumps({**ASKARI, "mem_mib": "2048"}))
    elif setup == "badplaybook":
        prof.write_text(json.dumps({**ASKARI, "applies": [{"playbook": "nope.yml"}]}))
    elif setup == "badextends":
        prof.write_text(json.dumps({"extends": "ghost"}))
    elif setup == "notool":
        (h.bin / "cloud-localds").unlink()
    elif setup == "libvirtdown":
        env["FAKE_LIBVIRT_DOWN"] = "1"
    elif setup == "lowram":
        (h.tmp / "meminfo").write_text("MemAvailable: 2097152 kB\n")
    elif setup == "noansible":
        (h.bin / "ansible-playbook").unlink()
    elif setup == "novault":  # the real client script, with no password file and no rbw
        shutil.copy(DRIVER.parent / "vault-password.sh", h.repo / "scripts")
        for tool in ("bash", "head"):
            (h.bin / tool).symlink_to(shutil.which(tool))
    p = h.run(*args, **env)
    assert p.returncode == code, (p.returncode, p.stderr)
    line = assert_one_line_error(p)
    assert needle in line, line
    assert_nothing_created(h)


def test_unknown_cert_tier_is_argparse_exit_2(h):
    p = h.run("cycle", "--host", "askari", "--certs", "bogus")
    assert p.returncode == 2 and "invalid choice" in p.stderr and "Traceback" not in p.stderr
    assert_nothing_created(h)


def test_help_lists_exit_codes_and_subcommands(h):
    p = h.run("--help")
    assert p.returncode == 0
    for needle in (
        "exit codes:",
        "130",
        "the code under test failed",
        "infrastructure failure",
        "usage or configuration error",
    ):
        assert needle in p.stdout
    for sub in (
        "image",
        "up",
        "apply",
        "reboot",
        "assert",
        "cycle",
        "bench",
        "loop",
        "down",
        "console",
        "prune",
        "status",
        "doctor",
    ):
        assert re.search(rf"^    {sub} ", p.stdout, re.M), sub  # its line in the list
        sp = h.run(sub, "--help")
        assert sp.returncode == 0 and "exit codes:" in sp.stdout
    cyc = h.run("cycle", "--help").stdout
    for flag in (
        "--host",
        "--run",
        "--certs",
        "--keep",
        "--no-reboot",
        "--reboot",
        "--no-idempotence",
        "--accel",
        "--connect",
        "--allow-prod-certs",
        "--junit",
        "--reboot-diff",
    ):
        assert flag in cyc
    flat = " ".join(cyc.split())
    for needle in (
        '"reboot": ["graceful", "hard"]',
        "reboot_diff_tolerate",
        "reboot_diffs",
        "stage reboot-diff",
        "reboot-<n>-<mode>/{before,after}/ and diff.txt",
        "--reboot-diff=warn",
        "an unexpected state difference across a reboot",
    ):
        assert needle in flat, needle
    assert "reboot_diff_tolerate" in h.run("reboot", "--help").stdout


# ---- a Ctrl-C from the first moment on (issue 30) -----------------------------------------
def _blocked_sigint():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1])
def test_run_as_a_user_runs_it_a_ctrl_c_during_pythons_own_start_is_one_line(h, delay):
    """The script through its own shebang (`scripts/integration-vm.py ...`), no launcher
    of the test's: a SIGINT while the interpreter starts and compiles the file (the first
    ~0.15 s) is held by the shebang's `env --block-signal` until the script's first lines
    take it. With a plain `#!/usr/bin/env python3` this printed a KeyboardInterrupt
    traceback."""
    (h.tmp / "py").mkdir(exist_ok=True)
    py = h.tmp / "py" / "python3"
    if not py.exists():
        py.symlink_to(sys.executable)
    proc = subprocess.Popen(
        [str(h.script), "cycle", "--host", "askari"],
        env={**h.env, "PATH": f"{h.env['PATH']}:{py.parent}", "FAKE_APPLY_SLEEP": "5"},
        cwd=h.tmp,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    if delay <= 0.02 and proc.returncode == -signal.SIGINT:
        # it landed before env had blocked it (its first millisecond once it runs; on a
        # loaded machine env may not have run at all 20 ms after the fork): env dies of
        # it, silently (the shell reports 130); nothing of the driver ran
        assert (out, err) == ("", "")
        return
    assert proc.returncode == 130, (proc.returncode, err, out)
    said = [ln for ln in err.splitlines() if ln.startswith("integration-vm: ")]
    assert said == ["integration-vm: interrupted"], err
    assert h.domains() == {}


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3, 0.6, 1.2])
def test_a_ctrl_c_at_any_moment_of_the_start_is_one_line_and_exit_130(h, delay):
    """SIGINT to a freshly started driver: during its imports, its parser, its session's
    first phases. Before any line of the script runs come the interpreter's own start and
    the compile of the script, which no handler in it can cover; the signal is held (blocked,
    as a launcher may start it) through those, so each delay tests the script's own part:
    delay 0 reaches it at its first statement, before the imports; 1.2 s, a session's first
    phases (here, loaded: ~0.7 s to the session)."""
    proc = subprocess.Popen(
        h.cmd("cycle", "--host", "askari"),
        env={**h.env, "FAKE_APPLY_SLEEP": "5"},
        cwd=h.tmp,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_blocked_sigint,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err, out)
    assert "Traceback" not in err, err
    said = [ln for ln in err.splitlines() if ln.startswith("integration-vm: ")]
    assert len(said) == 1 and said[0].startswith("integration-vm: interrupted"), err
    assert h.domains() == {}


def test_options_declare_the_flags_of_every_subcommand_and_no_other():
    # main() builds one frozen Options from argparse's namespace: a flag added to the
    # parser and not to Options would fail its command at start (from_args: TypeError).
    parser = ivm.CLI.build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    dests = {"cmd"}
    for sub in subparsers.choices.values():
        dests |= {a.dest for a in sub._actions if a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(ivm.Options)}
    options = ivm.Options.from_args(parser.parse_args(["up", "--host", "askari"]))
    assert (options.cmd, options.host, options.no_warm) == ("up", "askari", True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.host = "other"
