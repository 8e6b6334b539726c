"""The harness's Ansible transport (ADR-027): Mitogen by default, ansible-core's linear
strategy on request or when Mitogen cannot load, and output parsing that does not care
which one ran (saved outputs of both strategies, same VM, same playbooks)."""

import os
import pathlib
import types

import pytest
from conftest import load_script

HERE = pathlib.Path(__file__).resolve().parent
ivm = load_script("integration-vm.py", "integration_vm")

SAVED = HERE / "fakes" / "ansible-output"


# ---- choosing the strategy ----------------------------------------------------------
@pytest.mark.parametrize(
    "line,interp",
    [
        ("#!/work/main/.venv/bin/python3\n", "/work/main/.venv/bin/python3"),
        ("#!/usr/bin/env python3\n", "python3"),
        ("#!/usr/bin/env -S python3 -S\n", "python3"),
        ("#!/usr/bin/python3 -E\n", "/usr/bin/python3"),
        ("import sys\n", None),
        ("#!\n", None),
    ],
)
def test_script_interpreter(line, interp):
    assert ivm.script_interpreter(line) == interp


def test_strategy_choice_uses_mitogen_when_the_probe_prints_its_plugin_dir():
    c = ivm.strategy_choice("mitogen", 0, "/v/lib/ansible_mitogen/plugins/strategy\n")
    assert c == {
        "requested": "mitogen",
        "used": "mitogen_linear",
        "plugin_dir": "/v/lib/ansible_mitogen/plugins/strategy",
        "fallback": None,
    }


@pytest.mark.parametrize(
    "rc,out,err,reason",
    [
        (
            1,
            "",
            "Traceback...\nModuleNotFoundError: No module named 'ansible_mitogen'\n",
            "Mitogen does not load: ModuleNotFoundError: No module named 'ansible_mitogen'",
        ),
        (0, "not a path\n", "", "Mitogen does not load: rc 0"),
        (None, "", "", "cannot tell ansible-playbook's interpreter (no #! line)"),
        (
            "missing",
            "",
            "python3 not found on PATH",
            "Mitogen does not load: python3 not found on PATH",
        ),
    ],
)
def test_strategy_choice_falls_back_to_linear_and_says_why(rc, out, err, reason):
    c = ivm.strategy_choice("mitogen", rc, out, err)
    assert c["used"] == "linear" and c["plugin_dir"] is None and c["fallback"] == reason


def test_strategy_choice_default_never_probes_nor_falls_back():
    assert ivm.strategy_choice("default") == {
        "requested": "default",
        "used": "linear",
        "plugin_dir": None,
        "fallback": None,
    }


def test_ansible_env_selects_the_strategy_explicitly_either_way():
    hostile = {"PATH": "/bin", "ANSIBLE_STRATEGY": "free", "ANSIBLE_STRATEGY_PLUGINS": "/tmp/evil"}
    mito = ivm.strategy_choice("mitogen", 0, "/v/strategy\n")
    env = ivm.ansible_env(hostile, "/repo", "/run", "vm", mito)
    assert env["ANSIBLE_STRATEGY"] == "mitogen_linear"
    assert env["ANSIBLE_STRATEGY_PLUGINS"] == "/v/strategy"
    env = ivm.ansible_env(hostile, "/repo", "/run", "vm", ivm.strategy_choice("default"))
    assert env["ANSIBLE_STRATEGY"] == "linear" and "ANSIBLE_STRATEGY_PLUGINS" not in env
    assert env["ANSIBLE_TIMEOUT"] == "30"  # an emulated guest answers slowly after a boot
    env = ivm.ansible_env(hostile, "/repo", "/run", "vm")  # not resolved: linear
    assert env["ANSIBLE_STRATEGY"] == "linear" and "ANSIBLE_STRATEGY_PLUGINS" not in env


def _ctx(request="mitogen"):
    return types.SimpleNamespace(
        run=types.SimpleNamespace(strategy=None),  # the session's Run holds the choice
        strategy_request=request,
        cmdlog=None,
        environ={"PATH": os.environ.get("PATH", "")},
        t0=0.0,
    )


def _playbook_with_interpreter(tmp_path, body):
    """An ansible-playbook whose #! interpreter is a shell script answering the probe."""
    interp = tmp_path / "python"
    interp.write_text("#!/bin/sh\n" + body)
    interp.chmod(0o755)
    pb = tmp_path / "ansible-playbook"
    pb.write_text(f"#!{interp}\n")
    pb.chmod(0o755)
    return pb


def test_resolve_strategy_probes_ansible_playbooks_own_interpreter_once(tmp_path, capsys):
    pb = _playbook_with_interpreter(
        tmp_path,
        'echo "$1 $2" >> "$(dirname "$0")/calls"\necho /venv/ansible_mitogen/plugins/strategy\n',
    )
    ctx = _ctx()
    c = ivm.resolve_strategy(ctx, str(pb))
    assert c["used"] == "mitogen_linear"
    assert c["plugin_dir"] == "/venv/ansible_mitogen/plugins/strategy"
    assert ivm.resolve_strategy(ctx, str(pb)) is c
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["-c " + ivm.MITOGEN_PROBE]  # probed once, with the probe
    assert "strategy mitogen_linear" in capsys.readouterr().err


def test_resolve_strategy_falls_back_when_mitogen_does_not_import(tmp_path, capsys):
    pb = _playbook_with_interpreter(
        tmp_path, "echo \"ModuleNotFoundError: No module named 'ansible_mitogen'\" >&2\nexit 1\n"
    )
    c = ivm.resolve_strategy(_ctx(), str(pb))
    assert c["used"] == "linear" and "No module named 'ansible_mitogen'" in c["fallback"]
    assert "fallback from mitogen" in capsys.readouterr().err


def test_resolve_strategy_falls_back_when_the_interpreter_is_missing(tmp_path):
    pb = tmp_path / "ansible-playbook"
    pb.write_text(f"#!{tmp_path}/no-such-python\n")
    c = ivm.resolve_strategy(_ctx(), str(pb))
    assert c["used"] == "linear" and "no-such-python" in c["fallback"]


def test_resolve_strategy_default_does_not_probe(tmp_path):
    pb = _playbook_with_interpreter(tmp_path, 'touch "$(dirname "$0")/probed"\n')
    assert ivm.resolve_strategy(_ctx("default"), str(pb))["used"] == "linear"
    assert not (tmp_path / "probed").exists()


def test_bad_strategy_request_is_a_usage_error():
    args = types.SimpleNamespace(strategy=None, connect=None, accel=None)
    with pytest.raises(ivm.UsageError, match="BOMA_IT_ANSIBLE_STRATEGY"):
        ivm.ctx_from_env({"BOMA_IT_ANSIBLE_STRATEGY": "fast"}, args)
    args.strategy = "default"  # the flag wins over a valid variable...
    assert (
        ivm.ctx_from_env({"BOMA_IT_ANSIBLE_STRATEGY": "mitogen"}, args).strategy_request
        == "default"
    )
    with pytest.raises(ivm.UsageError):  # ...but a bad variable is an error either way
        ivm.ctx_from_env({"BOMA_IT_ANSIBLE_STRATEGY": "fast"}, args)


# ---- output parsing is the same under both strategies -------------------------------
# Saved from one live askari VM, same playbooks, run once with each strategy
# (tests/fakes/ansible-output/README.md says how).
PAIRS = sorted({p.name.split(".", 1)[1] for p in SAVED.glob("*.txt")})


def _both(name):
    return [(SAVED / f"{s}.{name}").read_text() for s in ("linear", "mitogen")]


def test_saved_outputs_exist_for_both_strategies():
    assert {"verify-pass.txt", "verify-fail.txt", "apply-changed.txt"} <= set(PAIRS)
    for name in PAIRS:
        assert (SAVED / f"linear.{name}").is_file() and (SAVED / f"mitogen.{name}").is_file()


@pytest.mark.parametrize("name", PAIRS)
def test_task_results_and_recap_identical_under_both_strategies(name):
    linear, mitogen = _both(name)
    host = next(iter(ivm.parse_recap(linear)))
    assert ivm.parse_recap(linear) == ivm.parse_recap(mitogen)
    strip = [
        [
            (n, st, items and [(lb, s) for lb, s, _ in items])
            for n, st, _, items in ivm.parse_task_results(out, host)
        ]
        for out in (linear, mitogen)
    ]
    assert strip[0] == strip[1]
    assert ivm.failed_task_names(linear, host) == ivm.failed_task_names(mitogen, host)


@pytest.mark.parametrize("name", [n for n in PAIRS if n.startswith("verify")])
def test_verify_checks_and_junit_identical_under_both_strategies(name):
    linear, mitogen = _both(name)
    host = next(iter(ivm.parse_recap(linear)))
    checks = [[(n, st) for n, st, _ in ivm.verify_checks(o, host)] for o in (linear, mitogen)]
    assert checks[0] == checks[1] and checks[0]
    failed = [n for n, st in checks[0] if st == "failed"]
    assert bool(failed) == name.startswith("verify-fail")
    # the failure message (what JUnit and result.json show) names the same outcome
    msgs = [
        {n: m for n, st, m in ivm.verify_checks(o, host) if st == "failed"}
        for o in (linear, mitogen)
    ]
    assert msgs[0].keys() == msgs[1].keys()


def test_changed_tasks_for_idempotence_identical_under_both_strategies():
    linear, mitogen = _both("apply-changed.txt")
    host = next(iter(ivm.parse_recap(linear)))
    changed = [
        [n for n, st, _, _ in ivm.parse_task_results(o, host) if st == "changed"]
        for o in (linear, mitogen)
    ]
    assert changed[0] == changed[1] and changed[0]
    assert ivm.parse_recap(linear)[host]["changed"] == len(changed[0])
