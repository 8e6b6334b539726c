"""Ansible: the transient inventory, argv, output parsing, idempotence, transport and
strategy (Mitogen or linear), identical parsing under both.
"""

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest
from conftest import FIXTURES, HERE, ivm

REAL = (FIXTURES / "ansible-verify-loop.txt").read_text()

VM = "boma-it-askari-1234abcd"

SAVED = HERE / "fakes" / "ansible-output"

# Saved from one live askari VM, same playbooks, run once with each strategy
# (tests/fakes/ansible-output/README.md says how).
PAIRS = sorted({p.name.split(".", 1)[1] for p in SAVED.glob("*.txt")})


def test_idempotence_failure_after_reboot(h):
    p = h.run("cycle", "--host", "askari", FAKE_IDEMPOTENCE_CHANGED="1")
    assert p.returncode == 1, p.stderr
    (res,) = h.results()
    assert res["failed_stage"] == "idempotence"
    assert res["idempotence"]["changed"] == 2  # one per playbook
    assert "base : Install packages" in res["failures"]


def test_no_idempotence_flag_skips_the_reapply(h):
    p = h.run("cycle", "--host", "askari", "--no-idempotence", FAKE_IDEMPOTENCE_CHANGED="3")
    assert p.returncode == 0, p.stderr
    assert len(h.calls("ansible-playbook")) == 4  # two applies, verify live and after


def test_apply_failure_is_a_verdict_and_keeps_the_vm(h):
    p = h.run("cycle", "--host", "askari", FAKE_APPLY_FAIL="1")
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    (res,) = h.results()
    assert res["verdict"] == "fail" and res["failed_stage"] == "apply:site.yml"
    assert res["failures"] == ["base : Load nftables"] and res["kept"]
    assert len(h.domains()) == 1 and (h.diag / res["vm"] / "logs" / "apply-site.yml.log").is_file()


def test_render_run_hosts_single_host_in_groups():
    out = ivm.Ansible.render_run_hosts(
        "boma-it-askari-x", "192.168.150.42", "ansible", ["offsite_hosts"]
    )
    inv = json.loads(out)  # JSON: Ansible's yaml inventory plugin reads it
    assert inv == {
        "all": {
            "children": {
                "offsite_hosts": {
                    "hosts": {
                        "boma-it-askari-x": {
                            "ansible_host": {"__ansible_unsafe": "192.168.150.42"},
                            "ansible_user": {"__ansible_unsafe": "ansible"},
                        }
                    }
                }
            }
        }
    }
    # invariant: the real askari host must NOT appear
    assert ivm.Ansible.inventory_host_names(out) == {"boma-it-askari-x"}


def test_render_run_hosts_host_vars_are_strings():
    out = ivm.Ansible.render_run_hosts(
        "vm",
        "10.0.0.2",
        "ansible",
        ["g1", "g2"],
        host_vars={"ansible_ssh_common_args": "-o A='b\"c'", "ansible_port": 2222},
    )
    groups = json.loads(out)["all"]["children"]
    assert sorted(groups) == ["g1", "g2"]
    for g in groups.values():
        host = {k: v["__ansible_unsafe"] for k, v in g["hosts"]["vm"].items()}
        assert host["ansible_ssh_common_args"] == "-o A='b\"c'"
        assert host["ansible_port"] == "2222"


def test_inventory_host_names_of_rendered_inventory():
    out = ivm.Ansible.render_run_hosts(
        "boma-it-x-1", "1.2.3.4", "ansible", ["a", "b"], host_vars={"ansible_port": 22}
    )
    assert ivm.Ansible.inventory_host_names(out) == {"boma-it-x-1"}


def test_inventory_host_names_sees_a_smuggled_real_host():
    inv = json.dumps(
        {
            "all": {
                "children": {
                    "offsite_hosts": {
                        "hosts": {
                            "boma-it-x-1": {"ansible_host": "1.2.3.4"},
                            "askari": {"ansible_host": "77.42.120.136"},
                        }
                    },
                    "g": {"children": {"h": {"hosts": ["third"]}}},
                },
                "hosts": {"other": {}},
            }
        }
    )
    assert ivm.Ansible.inventory_host_names(inv) == {"boma-it-x-1", "askari", "other", "third"}
    with pytest.raises(ivm.InfraError) as e:
        ivm.Ansible.assert_single_host_inventory(inv, "boma-it-x-1")
    assert e.value.stage == "inventory"


def test_single_host_guard_refuses_an_inventory_that_is_not_json():
    with pytest.raises(ivm.InfraError) as e:
        ivm.Ansible.assert_single_host_inventory(
            "all:\n  hosts:\n    boma-it-x-1:\n", "boma-it-x-1"
        )
    assert e.value.stage == "inventory"


def test_ansible_ssh_args_keeps_multiplexing_and_pinning():
    s = ivm.Ansible.ansible_ssh_args("/r", "vm")
    assert s.startswith("-o ControlMaster=auto -o ControlPersist=60s")
    assert "StrictHostKeyChecking=yes" in s and "-p" not in s.split()


def test_ansible_playbook_argv_requires_limit():
    a = ivm.Ansible.ansible_playbook_argv(
        "/v/ansible-playbook",
        "/r/inventory/hosts.yml",
        "/p/site.yml",
        "vm",
        ["base"],
        ["/x.yml", "/y.yml"],
    )
    assert a == [
        "/v/ansible-playbook",
        "-i",
        "/r/inventory/hosts.yml",
        "/p/site.yml",
        "--limit",
        "vm",
        "--tags",
        "base",
        "-e",
        "@/x.yml",
        "-e",
        "@/y.yml",
    ]
    with pytest.raises(ivm.InfraError):
        ivm.Ansible.ansible_playbook_argv("ap", "inv", "pb", "", [], [])


def test_ansible_env():
    env = ivm.Ansible.ansible_env(
        {"PATH": "/bin", "ANSIBLE_SSH_ARGS": "-o StrictHostKeyChecking=no"},
        "/repo",
        "/repo/run/vm",
        "vm",
    )
    assert env["PATH"] == "/bin" and env["ANSIBLE_CONFIG"] == "/repo/ansible.cfg"
    assert env["ANSIBLE_CACHE_PLUGIN_CONNECTION"] == "/repo/run/vm/facts"
    assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True"
    assert "StrictHostKeyChecking=no" not in env["ANSIBLE_SSH_ARGS"]


def test_parse_recap_real_output():
    assert ivm.Ansible.parse_recap(REAL) == {
        VM: {
            "ok": 4,
            "changed": 2,
            "unreachable": 0,
            "failed": 1,
            "skipped": 0,
            "rescued": 0,
            "ignored": 1,
        }
    }


def test_parse_recap_sums_several_plays_and_hosts():
    out = (
        "h1 : ok=1 changed=1 unreachable=0 failed=0\n"
        "h2 : ok=1 changed=0 unreachable=0 failed=0 skipped=1 rescued=0 ignored=0\n"
        "h1 : ok=2 changed=3 unreachable=0 failed=0 skipped=0 rescued=0 ignored=0\n"
    )
    r = ivm.Ansible.parse_recap(out)
    assert r["h1"]["changed"] == 4 and r["h1"]["ok"] == 3 and r["h2"]["skipped"] == 1


def test_parse_task_results_real_output():
    tasks = {t[0]: t for t in ivm.Ansible.parse_task_results(REAL, VM)}
    assert tasks["Probe something"][1] == "ok"
    assert tasks["Change one thing"][1] == "changed"
    assert tasks["Ignored failure"][1] == "ok"  # ...ignoring
    name = "Assert the host's outcomes after the reboot"
    assert tasks[name][1] == "failed"
    assert [(lb, st) for lb, st, _ in tasks[name][3]] == [
        ("nftables enabled and active", "ok"),
        ("forward chain admits container traffic", "failed"),
        ("published :443 answers from the controller", "failed"),
    ]
    assert (
        tasks[name][3][1][2]
        == "FAILED forward chain admits container traffic: pure drop (no accept)"
    )
    assert ivm.Ansible.failed_task_names(REAL, VM) == [name]
    assert ivm.Ansible.parse_task_results(REAL, "some-other-host")[0][1] == "skipped"


def test_verify_checks_expand_loop_items():
    checks = ivm.Ansible.verify_checks(REAL, VM)
    failed = [n for n, s, _ in checks if s == "failed"]
    assert failed == [
        "forward chain admits container traffic",
        "published :443 answers from the controller",
    ]
    assert ("a", "ok", "") in checks and ("Change one thing", "changed", "") in checks


def test_parse_task_results_fatal_single_line_and_delegation():
    out = (
        "TASK [Probe :443] ***\n"
        'fatal: [vm -> localhost]: FAILED! => {"changed": false, "msg": "Connection timed out"}\n'
        "TASK [next] ***\nskipping: [vm]\n"
    )
    (t1, t2) = ivm.Ansible.parse_task_results(out, "vm")
    assert t1[:3] == ("Probe :443", "failed", "Connection timed out")
    assert t2[1] == "skipped"


# venv; the DRIVER never imports it) -----------------------------------------------------
def test_rendered_inventory_is_valid_yaml():
    yaml = pytest.importorskip("yaml")
    args = ivm.Ansible.ansible_ssh_args("/r un/vm", "vm")
    inv = yaml.safe_load(
        ivm.Ansible.render_run_hosts(
            "boma-it-a-1",
            "192.168.150.9",
            "ansible",
            ["offsite_hosts", "docker_hosts"],
            host_vars={"ansible_ssh_common_args": args},
        )
    )
    for g in ("offsite_hosts", "docker_hosts"):
        hosts = inv["all"]["children"][g]["hosts"]
        assert list(hosts) == ["boma-it-a-1"]
        host = {k: v["__ansible_unsafe"] for k, v in hosts["boma-it-a-1"].items()}
        assert host["ansible_ssh_common_args"] == args
        assert host["ansible_host"] == "192.168.150.9"


def test_transport_figures():
    t = ivm.Ansible.transport_figures({"linear": 88.0, "mitogen_linear": 16.0}, calls=40)
    assert t == {
        "linear": {"seconds": 88.0, "per_call": 2.2},
        "mitogen_linear": {"seconds": 16.0, "per_call": 0.4},
        "calls": 40,
        "speedup": 5.5,
    }


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
    assert ivm.Ansible.script_interpreter(line) == interp


def test_strategy_choice_uses_mitogen_when_the_probe_prints_its_plugin_dir():
    c = ivm.Ansible.strategy_choice("mitogen", 0, "/v/lib/ansible_mitogen/plugins/strategy\n")
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
    c = ivm.Ansible.strategy_choice("mitogen", rc, out, err)
    assert c["used"] == "linear" and c["plugin_dir"] is None and c["fallback"] == reason


def test_strategy_choice_default_never_probes_nor_falls_back():
    assert ivm.Ansible.strategy_choice("default") == {
        "requested": "default",
        "used": "linear",
        "plugin_dir": None,
        "fallback": None,
    }


def test_ansible_env_selects_the_strategy_explicitly_either_way():
    hostile = {"PATH": "/bin", "ANSIBLE_STRATEGY": "free", "ANSIBLE_STRATEGY_PLUGINS": "/tmp/evil"}
    mito = ivm.Ansible.strategy_choice("mitogen", 0, "/v/strategy\n")
    env = ivm.Ansible.ansible_env(hostile, "/repo", "/run", "vm", mito)
    assert env["ANSIBLE_STRATEGY"] == "mitogen_linear"
    assert env["ANSIBLE_STRATEGY_PLUGINS"] == "/v/strategy"
    env = ivm.Ansible.ansible_env(
        hostile, "/repo", "/run", "vm", ivm.Ansible.strategy_choice("default")
    )
    assert env["ANSIBLE_STRATEGY"] == "linear" and "ANSIBLE_STRATEGY_PLUGINS" not in env
    assert env["ANSIBLE_TIMEOUT"] == "30"  # an emulated guest answers slowly after a boot
    env = ivm.Ansible.ansible_env(hostile, "/repo", "/run", "vm")  # not resolved: linear
    assert env["ANSIBLE_STRATEGY"] == "linear" and "ANSIBLE_STRATEGY_PLUGINS" not in env


def _ctx(request="mitogen"):
    return types.SimpleNamespace(
        session=types.SimpleNamespace(strategy=None),  # the session's Run holds the choice
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
    c = ivm.Ansible.resolve_strategy(ctx, str(pb))
    assert c["used"] == "mitogen_linear"
    assert c["plugin_dir"] == "/venv/ansible_mitogen/plugins/strategy"
    assert ivm.Ansible.resolve_strategy(ctx, str(pb)) is c
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["-c " + ivm.Ansible.MITOGEN_PROBE]  # probed once, with the probe
    assert "strategy mitogen_linear" in capsys.readouterr().err


def test_the_pinned_mitogen_loads_under_the_venvs_own_ansible_playbook(capsys):
    # the real probe, with the interpreter of this venv's ansible-playbook: what a harness
    # run does first (the driver-level tests answer it from one such probe per worker)
    pb = pathlib.Path(sys.executable).parent / "ansible-playbook"
    c = ivm.Ansible.resolve_strategy(_ctx(), str(pb))
    assert c["used"] == "mitogen_linear", c
    assert (pathlib.Path(c["plugin_dir"]) / "mitogen_linear.py").is_file()


def test_resolve_strategy_falls_back_when_mitogen_does_not_import(tmp_path, capsys):
    pb = _playbook_with_interpreter(
        tmp_path, "echo \"ModuleNotFoundError: No module named 'ansible_mitogen'\" >&2\nexit 1\n"
    )
    c = ivm.Ansible.resolve_strategy(_ctx(), str(pb))
    assert c["used"] == "linear" and "No module named 'ansible_mitogen'" in c["fallback"]
    assert "fallback from mitogen" in capsys.readouterr().err


def test_resolve_strategy_falls_back_when_the_interpreter_is_missing(tmp_path):
    pb = tmp_path / "ansible-playbook"
    pb.write_text(f"#!{tmp_path}/no-such-python\n")
    c = ivm.Ansible.resolve_strategy(_ctx(), str(pb))
    assert c["used"] == "linear" and "no-such-python" in c["fallback"]


def test_resolve_strategy_default_does_not_probe(tmp_path):
    pb = _playbook_with_interpreter(tmp_path, 'touch "$(dirname "$0")/probed"\n')
    assert ivm.Ansible.resolve_strategy(_ctx("default"), str(pb))["used"] == "linear"
    assert not (tmp_path / "probed").exists()


def test_bad_strategy_request_is_a_usage_error():
    args = ivm.Options()
    with pytest.raises(ivm.UsageError, match="BOMA_IT_ANSIBLE_STRATEGY"):
        ivm.Env.ctx_from_env({"BOMA_IT_ANSIBLE_STRATEGY": "fast"}, args)
    args = ivm.Options(strategy="default")  # the flag wins over a valid variable...
    assert (
        ivm.Env.ctx_from_env({"BOMA_IT_ANSIBLE_STRATEGY": "mitogen"}, args).strategy_request
        == "default"
    )
    with pytest.raises(ivm.UsageError):  # ...but a bad variable is an error either way
        ivm.Env.ctx_from_env({"BOMA_IT_ANSIBLE_STRATEGY": "fast"}, args)


def _both(name):
    return [(SAVED / f"{s}.{name}").read_text() for s in ("linear", "mitogen")]


def test_saved_outputs_exist_for_both_strategies():
    assert {"verify-pass.txt", "verify-fail.txt", "apply-changed.txt"} <= set(PAIRS)
    for name in PAIRS:
        assert (SAVED / f"linear.{name}").is_file() and (SAVED / f"mitogen.{name}").is_file()


@pytest.mark.parametrize("name", PAIRS)
def test_task_results_and_recap_identical_under_both_strategies(name):
    linear, mitogen = _both(name)
    host = next(iter(ivm.Ansible.parse_recap(linear)))
    assert ivm.Ansible.parse_recap(linear) == ivm.Ansible.parse_recap(mitogen)
    strip = [
        [
            (n, st, items and [(lb, s) for lb, s, _ in items])
            for n, st, _, items in ivm.Ansible.parse_task_results(out, host)
        ]
        for out in (linear, mitogen)
    ]
    assert strip[0] == strip[1]
    assert ivm.Ansible.failed_task_names(linear, host) == ivm.Ansible.failed_task_names(
        mitogen, host
    )


@pytest.mark.parametrize("name", [n for n in PAIRS if n.startswith("verify")])
def test_verify_checks_and_junit_identical_under_both_strategies(name):
    linear, mitogen = _both(name)
    host = next(iter(ivm.Ansible.parse_recap(linear)))
    checks = [
        [(n, st) for n, st, _ in ivm.Ansible.verify_checks(o, host)] for o in (linear, mitogen)
    ]
    assert checks[0] == checks[1] and checks[0]
    failed = [n for n, st in checks[0] if st == "failed"]
    assert bool(failed) == name.startswith("verify-fail")
    # the failure message (what JUnit and result.json show) names the same outcome
    msgs = [
        {n: m for n, st, m in ivm.Ansible.verify_checks(o, host) if st == "failed"}
        for o in (linear, mitogen)
    ]
    assert msgs[0].keys() == msgs[1].keys()


def test_changed_tasks_for_idempotence_identical_under_both_strategies():
    linear, mitogen = _both("apply-changed.txt")
    host = next(iter(ivm.Ansible.parse_recap(linear)))
    changed = [
        [n for n, st, _, _ in ivm.Ansible.parse_task_results(o, host) if st == "changed"]
        for o in (linear, mitogen)
    ]
    assert changed[0] == changed[1] and changed[0]
    assert ivm.Ansible.parse_recap(linear)[host]["changed"] == len(changed[0])


def test_a_handlers_result_is_the_handlers_not_the_task_printed_before_it():
    # a changed handler used to be counted against the last task (here Caddy's container,
    # which did not change): an idempotence or upgrade report then named the wrong task
    linear, mitogen = _both("apply-changed.txt")
    host = next(iter(ivm.Ansible.parse_recap(linear)))
    for out in (linear, mitogen):
        changed = [
            n for n, st, _, _ in ivm.Ansible.parse_task_results(out, host) if st == "changed"
        ]
        assert changed == [
            "docker_host : firewall | Install the container-forward drop-in",
            "handler: docker_host : Reload nftables with the container-forward drop-in",
        ]


def test_no_inventory_value_is_ever_templated_by_the_real_ansible(tmp_path):
    # an address/path read back from a state file reaches the transient inventory: the
    # venv's own ansible must read it as data (issue 27: run.json's ip ran a command)
    ansible = pathlib.Path(sys.executable).parent / "ansible"
    # the pinned requirements always install ansible-core: a missing one is a broken venv
    assert ansible.is_file(), f"no {ansible}: rebuild the venv (make venv)"
    (tmp_path / "ansible.cfg").write_text("[defaults]\n")
    inv = tmp_path / "hosts.json"
    inv.write_text(
        ivm.Ansible.render_run_hosts(
            "boma-it-a-0000000a",
            "{{ 6 * 7 }}",
            "ansible",
            ["g"],
            host_vars={"ansible_connection": "local", "p": "/r{# c #}/{% raw %}x"},
        )
    )
    p = subprocess.run(
        [ansible, "-i", inv, "boma-it-a-0000000a", "-m", "debug"]
        + ["-a", "msg=[{{ ansible_host }}][{{ p }}]"],
        capture_output=True,
        text=True,
        env={**os.environ, "ANSIBLE_CONFIG": str(tmp_path / "ansible.cfg")},
        cwd=tmp_path,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert '"msg": "[{{ 6 * 7 }}][/r{# c #}/{% raw %}x]"' in p.stdout, p.stdout


# ---- tests that kill the mutations issue 27 found (class 8) ----------------------------
def test_a_verify_that_exits_nonzero_fails_even_with_a_clean_recap(h):
    # mutant: verify counting only the recap's failed= (ansible-playbook's rc ignored)
    up = h.run("up", "--host", "askari")
    assert up.returncode == 0, up.stderr
    p = h.run("assert", "--host", "askari", FAKE_VERIFY_RC="4")
    assert p.returncode == 1, p.stderr
    (r,) = h.results()
    assert r["verdict"] == "fail" and r["failed_stage"] == "verify", r
    assert "verify playbook failed (exit 4)" in p.stderr


def test_one_changed_task_on_the_reapply_fails_idempotence(h):
    # mutant: idempotence tolerating one changed task
    env = {"FAKE_IDEMPOTENCE_CHANGED": "1", "FAKE_IDEMPOTENCE_ONLY": "site.yml"}
    p = h.run("cycle", "--host", "askari", **env)
    assert p.returncode == 1, p.stderr
    (res,) = h.results()
    assert res["failed_stage"] == "idempotence"
    assert res["idempotence"] == {"changed": 1, "changed_tasks": ["base : Install packages"]}
