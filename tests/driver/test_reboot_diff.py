"""Reboot diff: what a reboot changed (firewall, ports, listeners, units) and where a boot's
time went.
"""

import json
import pathlib
import xml.etree.ElementTree as ET

import pytest
from conftest import ASKARI, FIXTURES, assert_one_line_error, ivm, ran

GUEST = FIXTURES / "guest"

NONCE = "0123456789ab"


def _profile(h, name, **extra):
    (h.repo / "tests" / "integration" / "profiles" / f"{name}.json").write_text(
        json.dumps({**ASKARI, **extra})
    )


def test_blame_and_critical_chain_run_only_where_a_reboot_diff_failed(h):
    """A reboot's after-capture runs `systemd-analyze time` only (blame and critical-chain
    cost a TCG guest ~3 s each, in every reboot); the second capture of a reboot whose diff
    found differences, and the failed run's bundle, have them."""
    p = h.run("cycle", "--host", "askari", FAKE_REBOOT_CHANGE="port-443-gone")
    assert p.returncode == 1, p.stderr
    (res,) = h.results()
    rd = pathlib.Path(res["diagnostics"]) / "reboot-1-graceful"
    first = (rd / "after-first" / "boot-analysis.txt").read_text()
    assert "Startup finished in 3.871s" in first and "docker.service" not in first
    assert "30.811s docker.service" in (rd / "after" / "boot-analysis.txt").read_text()
    assert res["reboot_diffs"][0]["boot"]["blame_top"][0] == [30.811, "docker.service"]
    assert (pathlib.Path(res["diagnostics"]) / "blame.txt").is_file()  # the bundle


def test_reboot_diff_unexpected_change_fails_and_keeps_the_vm(h):
    p = h.run(
        "cycle",
        "--host",
        "askari",
        "--junit",
        str(h.tmp / "j.xml"),
        FAKE_REBOOT_CHANGE="forward-accept-gone,port-443-gone",
    )
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    (res,) = h.results()
    assert res["verdict"] == "fail" and res["failed_stage"] == "reboot-diff" and res["kept"]
    assert h.domains()[res["vm"]]["state"] == "running"
    lost_accept = "nft: - rule inet filter forward: meta iifname docker0 accept"
    assert (
        lost_accept in res["message"]
        and "sockets: - tcp 0.0.0.0:443 docker-proxy" in res["message"]
    )
    assert lost_accept in res["failures"]
    assert p.stdout.strip().splitlines()[-1].startswith("integration-vm: FAIL[reboot-diff] askari")
    verdict = [
        ln
        for ln in p.stderr.splitlines()
        if ln.startswith("integration-vm: reboot diff found differences: ")
    ]
    assert (
        len(verdict) == 1 and "12 unexpected difference(s) across the graceful reboot" in verdict[0]
    )
    # verify ran live, before the reboot, and passed; the reboot diff stopped the run
    verifies = [c for c in h.calls("ansible-playbook") if c["playbook"].endswith("verify.yml")]
    assert len(verifies) == 1 and res["verify_live_tasks"] and not res["verify_tasks"]
    (diff,) = res["reboot_diffs"]
    assert diff["changed"] and diff["recaptured"] and len(diff["unexpected"]) == 12
    assert diff["categories"]["nft"] == {"added": 0, "removed": 4}
    assert diff["categories"]["ports"] == {"added": 0, "removed": 4}
    assert diff["categories"]["sockets"] == {"added": 0, "removed": 4}
    # diagnostics: the forward chain as it stood before and after, and the diff
    diag = pathlib.Path(res["diagnostics"])
    rd = diag / "reboot-1-graceful"
    assert 'iifname "docker0" accept' in (rd / "before" / "nft-ruleset.txt").read_text()
    text = (rd / "diff.txt").read_text()
    assert (
        "UNEXPECTED (12;" in text
        and "\n-rule inet filter forward: meta iifname docker0 accept\n" in text
    )
    assert (rd / "after-first" / "nft.json").is_file()  # captured twice before failing
    assert "reboot-1-graceful/diff.txt" in (diag / "SUMMARY.txt").read_text()
    case = [
        tc
        for tc in ET.parse(h.tmp / "j.xml").getroot().iter("testcase")
        if tc.get("name") == "reboot-diff:graceful"
    ][0]
    failure = case.find("failure")
    assert failure.get("message").startswith("12 unexpected difference(s)")
    assert lost_accept in failure.text.splitlines()


def test_reboot_diff_tolerated_change_passes(h):
    _profile(h, "askari", reboot_diff_tolerate={"sockets": ["dhclient"]})
    p = h.run("cycle", "--host", "askari", FAKE_REBOOT_CHANGE="dhclient")
    assert p.returncode == 0, p.stderr
    (res,) = h.results()
    (diff,) = res["reboot_diffs"]
    assert diff["changed"] is True and diff["unexpected"] == [] and not diff["recaptured"]
    assert diff["tolerated"] == ["sockets: + udp 0.0.0.0:68 dhclient"]
    assert "1 tolerated difference(s)" in p.stderr


def test_reboot_diff_warn_reports_without_failing(h):
    p = h.run(
        "cycle",
        "--host",
        "askari",
        "--reboot-diff",
        "warn",
        "--no-idempotence",
        "--junit",
        str(h.tmp / "j.xml"),
        FAKE_REBOOT_CHANGE="service-inactive",
    )
    assert p.returncode == 0, p.stderr
    (res,) = h.results()
    (diff,) = res["reboot_diffs"]
    assert diff["unexpected"] == [
        "services: - docker.service active",
        "services: + docker.service inactive",
    ]
    assert "warning (--reboot-diff=warn)" in p.stderr
    case = [
        tc
        for tc in ET.parse(h.tmp / "j.xml").getroot().iter("testcase")
        if tc.get("name") == "reboot-diff:graceful"
    ][0]
    assert (
        case.find("failure") is None and "docker.service inactive" in case.find("system-out").text
    )


def test_reboot_diff_settles_a_late_port(h):
    p = h.run("cycle", "--host", "askari", "--no-idempotence", FAKE_REBOOT_CHANGE="late-443")
    assert p.returncode == 0, p.stderr
    (res,) = h.results()
    (diff,) = res["reboot_diffs"]
    assert diff["recaptured"] and diff["changed"] is False and diff["unexpected"] == []
    rd = pathlib.Path(diff["dir"])
    assert "gone by the second capture: 8" in (rd / "diff.txt").read_text()
    assert "tcp 0.0.0.0:443 docker-proxy" not in (rd / "after-first" / "sockets.json").read_text()
    assert "tcp 0.0.0.0:443 docker-proxy" in (rd / "after" / "sockets.json").read_text()


SETTLED_WHEN = "test -e /run/libvirt/network/boma-it.xml"


def test_a_profiles_settled_condition_is_waited_for_before_the_capture_not_captured_twice(h):
    # ubongo's libvirtd brings its autostarted network up after systemd says `running`:
    # without the wait the first capture misses it and the diff captures again 60 s later
    _profile(h, "askari", reboot_settled_when=SETTLED_WHEN)
    p = h.run("cycle", "--host", "askari", "--no-idempotence", FAKE_REBOOT_CHANGE="late-443")
    assert p.returncode == 0, p.stderr
    (res,) = h.results()
    (diff,) = res["reboot_diffs"]
    assert not diff["recaptured"] and diff["unexpected"] == []
    assert not (pathlib.Path(diff["dir"]) / "after-first").exists()
    (stage,) = res["reboot_stages"]
    assert stage["seconds_to_settled"] >= stage["seconds_to_running"]
    assert f"settled after {stage['seconds_to_settled']}s" in p.stderr
    (wait,) = [c["argv"][-1] for c in h.calls("ssh") if "sudo -n timeout" in c["argv"][-1]]
    assert wait.startswith("sudo -n timeout 1 sh -c 'until test -e /run/libvirt/"), wait


def test_a_settled_condition_that_never_holds_is_one_line_and_the_diff_looks_twice(h):
    _profile(h, "askari", reboot_settled_when=SETTLED_WHEN)
    p = h.run(
        "cycle",
        "--host",
        "askari",
        "--no-idempotence",
        FAKE_REBOOT_CHANGE="late-443",
        FAKE_SETTLED="never",
    )
    assert p.returncode == 0, p.stderr
    assert "reboot_settled_when still false after 1s (exit 124): capturing anyway" in p.stderr
    (res,) = h.results()
    (diff,) = res["reboot_diffs"]
    assert diff["recaptured"] and diff["unexpected"] == []
    assert res["reboot_stages"][0]["seconds_to_settled"] is None


def test_a_profile_without_a_settled_condition_runs_no_wait(h):
    assert h.run("cycle", "--host", "askari", "--no-idempotence").returncode == 0
    assert not [c for c in h.calls("ssh") if "sudo -n timeout" in c["argv"][-1]]


def test_profile_reboot_list_runs_graceful_then_hard_with_a_diff_each(h):
    _profile(h, "askari", reboot=["graceful", "hard"])
    p = h.run("cycle", "--host", "askari", "--no-idempotence", "--junit", str(h.tmp / "j.xml"))
    assert p.returncode == 0, p.stderr
    cmds = [a[0] for a in h.virsh_cmds()]
    i = cmds.index("shutdown")  # graceful first: the guest's own shutdown, then start
    j = cmds.index("destroy", i)  # then the power cut
    assert i < cmds.index("start", i) < j < cmds.index("start", j)
    (res,) = h.results()
    assert res["reboot_modes"] == ["graceful", "hard"]
    assert [(d["index"], d["mode"], d["changed"]) for d in res["reboot_diffs"]] == [
        (1, "graceful", False),
        (2, "hard", False),
    ]
    assert [pathlib.Path(d["dir"]).name for d in res["reboot_diffs"]] == [
        "reboot-1-graceful",
        "reboot-2-hard",
    ]
    for d in res["reboot_diffs"]:
        assert pathlib.Path(d["diff"]).is_file()
    run_json = json.loads((h.run_root / res["vm"] / "run.json").read_text())
    assert len(run_json["boot_ids"]) == 3 and len(set(run_json["boot_ids"])) == 3
    assert [r["mode"] for r in run_json["reboots"]] == ["graceful", "hard"]
    names = [tc.get("name") for tc in ET.parse(h.tmp / "j.xml").getroot().iter("testcase")]
    reboots = [n for n in names if n.startswith("reboot")]
    assert reboots == ["reboot:graceful", "reboot-diff:graceful", "reboot:hard", "reboot-diff:hard"]
    assert names.index("reboot-diff:hard") < names.index("verify")


def test_state_capture_failure_is_an_infra_error(h):
    p = h.run("cycle", "--host", "askari", FAKE_CAPTURE_FAIL="1")
    assert p.returncode == 3, p.stderr
    line = assert_one_line_error(p)
    assert line.startswith("integration-vm: error: reboot: could not capture the guest's state")
    assert "a password is required" in line
    assert h.domains() == {}


def _nft_items():
    return json.loads((GUEST / "nft-ruleset.json").read_text())["nftables"]


def _nft(items):
    return json.dumps({"nftables": items})


def _capture(**sections):
    """Capture-script output with the given {name: (rc, out)} sections."""
    out = []
    for name, (rc, body) in sections.items():
        out += [f"@@boma-{NONCE} begin {name}", body, "", f"@@boma-{NONCE} end {name} {rc} "]
    return "\n".join(out) + "\n"


def test_capture_script_bounds_every_command_and_runs_as_one_script():
    s = ivm.Reboot.render_capture_script(NONCE, 30.4)
    assert s.startswith(f"M='@@boma-{NONCE}'\nT=30\n") and s.rstrip().endswith("exit 0")
    assert 'timeout -k 2 "$T" "$@" </dev/null' in s  # bounded, and never eats the script
    for sec in (
        "boot_id",
        "port_range",
        "nft_json",
        "nft_text",
        "docker",
        "containers",
        "sockets",
        "failed_units",
        "enabled_units",
        "enabled_active",
    ):
        assert f"sec {sec} " in s
    for cmd in (
        "nft -j list ruleset",
        "nft list ruleset",
        "ss -H -tulnp",
        "docker ps --format '{{.Names}} {{.Ports}}'",
        "systemctl --failed --plain --no-legend --no-pager",
        "systemctl list-unit-files --state=enabled --type=service --no-legend --no-pager",
        "systemctl is-active $units",
    ):
        assert cmd in s
    assert "sudo" not in s  # the whole script runs under ONE `sudo -n sh -s`
    assert ivm.Reboot.render_capture_script(NONCE, 0.2).splitlines()[1] == "T=1"
    assert s.count("timeout -k 2") <= ivm.Reboot.CAPTURE_COMMANDS


def _stub_guest(tmp_path, docker="running"):
    """A PATH with stub guest commands and only the real tools the script needs."""
    import shutil
    import textwrap

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("timeout", "mktemp", "awk", "head", "tr", "cat", "rm", "echo", "sh"):
        (bin_ / tool).symlink_to(shutil.which(tool))
    stubs = {
        "systemd-analyze": f"""case $1 in
                   time) cat {GUEST / "systemd-analyze-time.txt"} ;;
                   blame) cat {GUEST / "systemd-analyze-blame.txt"} ;;
                   critical-chain) echo 'multi-user.target @1min 2.1s' ;;
                   esac""",
        # nft reads stdin: if the script did not shield it, the rest of the script is eaten
        "nft": f"""cat >/dev/null
                   if [ "$1" = -j ]; then cat {GUEST / "nft-ruleset.json"}
                   else cat {GUEST / "nft-ruleset.txt"}; fi""",
        "ss": f"cat {GUEST / 'ss-tulnp.txt'}",
        "docker": f"""case $1 in
                   ps) cat {GUEST / "docker-ps.txt"} ;;
                   inspect) [ "$4" = caddy ] && echo '/caddy 172.18.0.2 ' ;;
                   esac""",
        "systemctl": f"""case "$*" in
                   "is-active --quiet docker.service") [ "{docker}" = running ] ;;
                   --failed*) echo 'fstrim.service loaded failed failed Discard unused blocks' ;;
                   list-unit-files*) cat {GUEST / "list-unit-files.txt"} ;;
                   is-active*) shift; for u in "$@"; do
                                 case $u in
                                   *@*) echo "bad unit $u" >&2; exit 1 ;;
                                   sshd-keygen*) echo inactive ;;
                                   *) echo active ;;
                                 esac
                               done; exit 3 ;;
                   esac""",
    }
    for name, body in stubs.items():
        if name == "docker" and docker == "absent":
            continue
        (bin_ / name).write_text("#!/bin/sh\n" + textwrap.dedent(body) + "\n")
        (bin_ / name).chmod(0o755)
    return bin_


def st_boot(secs):
    return ivm.Reboot.boot_analysis(secs)


@pytest.mark.parametrize("docker", ["running", "stopped", "absent"])
def test_capture_script_runs_under_sh_and_parses(tmp_path, docker):
    import subprocess

    bin_ = _stub_guest(tmp_path, docker)
    p = subprocess.run(
        ["/bin/sh", "-s"],
        input=ivm.Reboot.render_capture_script(NONCE, 5),
        env={"PATH": str(bin_)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    secs = ivm.Reboot.parse_capture_output(p.stdout, NONCE)
    assert set(secs) == {
        "boot_id",
        "port_range",
        "nft_json",
        "nft_text",
        "docker",
        "sockets",
        "failed_units",
        "enabled_units",
        "enabled_active",
        "boot_time",
        "boot_blame",
        "boot_chain",
    } | ({"containers"} if docker == "running" else set())
    assert st_boot(secs)["startup"]["total"] == 66.001
    assert st_boot(secs)["blame_top"][0] == [30.811, "docker.service"]
    assert secs["enabled_active"]["rc"] == 3  # is-active: some unit inactive
    st = ivm.Reboot.normalise_capture(secs, own_ips=["192.168.150.42"])
    assert st["boot_id"] and len(st["boot_id"]) == 36
    cats = st["categories"]
    assert "rule inet filter forward: meta iifname docker0 accept" in cats["nft"]
    dnat = 'rule ip nat DOCKER: iifname != "br-d2b0beece4b3" tcp dport 443 counter dnat to {}:443'
    assert dnat.format("<caddy>" if docker == "running" else "172.18.0.2") in cats["nft"]
    assert "table inet filter" in st["nft_text"]
    assert cats["failed_units"] == ["fstrim.service"]
    assert "sshd-keygen.service inactive" in cats["services"]
    assert "docker.service active" in cats["services"]
    assert not any(ln.startswith("getty@") for ln in cats["services"])  # template left out
    assert "udp VM_IP%enp1s0:68 systemd-network" in cats["sockets"]
    assert (
        cats["ports"]
        == {
            "running": ivm.Reboot.normalise_docker_ports((GUEST / "docker-ps.txt").read_text()),
            "stopped": ["docker: not running"],
            "absent": ["docker: absent"],
        }[docker]
    )


def test_parse_capture_output_rc_stderr_and_cut_off():
    text = (
        f"noise before\n@@boma-{NONCE} begin a\nline 1\n\n@@boma-{NONCE} end a 0 \n"
        f"@@boma-{NONCE} begin b\n@@boma-ffffffffffff end b 0\n\n"
        f"@@boma-{NONCE} end b 1 nft: Operation not permitted \n"
        f"@@boma-{NONCE} begin c\npartial"
    )
    s = ivm.Reboot.parse_capture_output(text, NONCE)
    assert s["a"] == {"rc": 0, "out": "line 1", "err": ""}
    # a marker with another nonce is content, not structure
    assert s["b"] == {
        "rc": 1,
        "out": "@@boma-ffffffffffff end b 0",
        "err": "nft: Operation not permitted",
    }
    assert s["c"]["rc"] is None and s["c"]["out"] == "partial"
    assert ivm.Reboot.parse_capture_output("", NONCE) == {}


@pytest.mark.parametrize(
    "expr,text",
    [
        (
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}},
            "meta iifname docker0",
        ),
        (
            {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "br-1"}},
            "meta oifname != br-1",
        ),
        (
            {
                "match": {
                    "op": "in",
                    "left": {"ct": {"key": "state"}},
                    "right": ["related", "established"],
                }
            },
            "ct state { established, related }",
        ),
        (
            {
                "match": {
                    "op": "==",
                    "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                    "right": {"set": [8443, 443, 80]},
                }
            },
            "tcp dport { 80, 443, 8443 }",
        ),
        (
            {
                "match": {
                    "op": "==",
                    "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                    "right": {"prefix": {"addr": "172.17.0.0", "len": 16}},
                }
            },
            "ip saddr 172.17.0.0/16",
        ),
        (
            {
                "match": {
                    "op": ">=",
                    "left": {"payload": {"base": "th", "offset": 16, "len": 16}},
                    "right": {"range": [1024, 2048]},
                }
            },
            "@th,16,16 >= 1024-2048",
        ),
        (
            {
                "match": {
                    "op": "==",
                    "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                    "right": "local",
                }
            },
            "fib daddr type local",
        ),
        ({"counter": {"packets": 812, "bytes": 99211}}, "counter"),
        ({"counter": "named"}, "counter name named"),
        ({"jump": {"target": "DOCKER"}}, "jump DOCKER"),
        ({"accept": None}, "accept"),
        ({"masquerade": None}, "masquerade"),
        ({"dnat": {"addr": "172.18.0.2", "port": 443}}, "dnat to 172.18.0.2:443"),
        (
            {"dnat": {"family": "ip", "addr": "172.18.0.2", "port": 443}},
            "dnat ip to 172.18.0.2:443",
        ),
        ({"xt": {"type": "match", "name": "addrtype"}}, "xt match addrtype"),
        ({"log": {"prefix": "nft drop: "}}, 'log {"prefix":"nft drop: "}'),
        ({"reject": None}, "reject"),
        ({"last": {"used": 1234}}, "last"),
        (
            {"set": [{"elem": {"val": "10.0.0.1", "timeout": 60, "expires": 17}}]},
            '{ 10.0.0.1 {"timeout":60} }',
        ),
    ],
)
def test_nft_expr_text(expr, text):
    assert ivm.Reboot.nft_expr_text(expr) == text


def test_normalise_nft_json_drops_volatile_fields():
    text = (GUEST / "nft-ruleset.json").read_text()
    lines = ivm.Reboot.normalise_nft_json(text)
    joined = "\n".join(lines)
    for gone in ("handle", "packets", "bytes", "metainfo", "Bullmoose"):
        assert gone not in joined
    assert lines[0] == "table inet filter"  # tables sorted, not in creation order
    assert [ln for ln in lines if ln.startswith("table")] == [
        "table inet filter",
        "table ip filter",
        "table ip nat",
    ]
    fwd = lines.index("chain inet filter forward {type filter hook forward prio 0 policy drop}")
    assert lines[fwd + 1 : fwd + 6] == [
        "rule inet filter forward: ct state { established, related } accept",
        "rule inet filter forward: meta iifname docker0 accept",
        "rule inet filter forward: meta oifname docker0 accept",
        "rule inet filter forward: meta iifname br-* accept",
        "rule inet filter forward: meta oifname br-* accept",
    ]
    assert 'rule inet filter input: tcp dport 22 accept comment "ssh"' in lines
    # iptables-nft's compat expressions are opaque in JSON (no DNAT destination) ...
    assert (
        "rule ip nat DOCKER: meta iifname != br-d2b0beece4b3 tcp dport 443 counter xt target DNAT"
    ) in lines
    assert "chain ip nat POSTROUTING {type nat hook postrouting prio 100 policy accept}" in lines
    assert "chain ip filter DOCKER-USER" in lines
    # ... the text listing translates them; with it, those rules say where they go
    full = ivm.Reboot.normalise_nft_json(text, None, (GUEST / "nft-ruleset.txt").read_text())
    assert [ln for ln in full if "xt " in ln] == []
    assert (
        'rule ip nat DOCKER: iifname != "br-d2b0beece4b3" tcp dport 443 counter '
        "dnat to 172.18.0.2:443"
    ) in full
    assert (
        'rule ip filter FORWARD: oifname "docker0" ct state related,established counter accept'
    ) in full
    assert "rule ip nat PREROUTING: fib daddr type local counter jump DOCKER" in full
    # only the 12 xt rules (addrtype, conntrack, DNAT, MASQUERADE) are taken from the text
    assert len(full) == len(lines)
    assert all(" xt " in ln for ln in set(lines) - set(full)) and len(set(full) - set(lines)) == 12


def _rebooted(items, boots=2):
    """What the same ruleset looks like after a reboot: base's table loaded first,
    Docker's rules re-created in another order, new handles and counter values."""
    items = json.loads(json.dumps(items))
    meta = [i for i in items if "metainfo" in i]
    inet = [i for i in items if "metainfo" not in i and list(i.values())[0]["family"] == "inet"]
    docker = [i for i in items if "metainfo" not in i and i not in inet]
    docker = [i for i in docker if "rule" not in i] + [i for i in docker if "rule" in i][::-1]
    out = meta + inet + docker
    for i in out:
        obj = list(i.values())[0]
        if "handle" in obj:
            obj["handle"] += 100 * boots
        for e in obj.get("expr", []):
            if "counter" in e:
                e["counter"] = {"packets": 7 * boots, "bytes": 999 * boots}
    return out


def test_normalise_nft_json_is_blind_to_what_a_reboot_reorders():
    items = _nft_items()
    assert ivm.Reboot.normalise_nft_json(_nft(items)) == ivm.Reboot.normalise_nft_json(
        _nft(_rebooted(items))
    )


def test_parse_nft_text_rules():
    text = """# Warning: table ip nat is managed by iptables-nft, do not touch!
table ip nat {
	chain DOCKER {
		iifname "docker0" counter packets 3 bytes 180 return
		iifname != "br-1" tcp dport 443 counter packets 0 bytes 0 dnat to 172.18.0.2:443
	}

	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		comment "a chain comment"
		ip saddr 172.18.0.0/16 oifname != "br-1" counter packets 0 bytes 0 masquerade
	}
}
table inet f {
	set allow {
		type ipv4_addr
		flags interval
		elements = { 10.0.0.0/8, 192.168.1.1,
\t\t\t     192.168.1.2 }
	}

	chain input {
		type filter hook input priority filter; policy drop;
		ip saddr @allow tcp dport { 22, 443 } accept
	}

	chain empty {
	}
}
"""
    assert ivm.Reboot.parse_nft_text_rules(text) == {
        ("ip", "nat", "DOCKER"): [
            'iifname "docker0" counter return',
            'iifname != "br-1" tcp dport 443 counter dnat to 172.18.0.2:443',
        ],
        ("ip", "nat", "POSTROUTING"): [
            'ip saddr 172.18.0.0/16 oifname != "br-1" counter masquerade'
        ],
        ("inet", "f", "input"): ["ip saddr @allow tcp dport { 22, 443 } accept"],
        ("inet", "f", "empty"): [],
    }
    assert ivm.Reboot.parse_nft_text_rules("") == {}


def test_xt_rules_fall_back_to_json_when_the_text_disagrees():
    js = (GUEST / "nft-ruleset.json").read_text()
    text = (GUEST / "nft-ruleset.txt").read_text()
    # the listing was taken while Docker added a rule: that chain's count differs
    extra = text.replace(
        '\t\tiifname "docker0" counter packets 0 bytes 0 return\n',
        '\t\tiifname "docker0" counter packets 0 bytes 0 return\n'
        '\t\tiifname "br-new" counter packets 0 bytes 0 return\n',
        1,
    )
    assert extra != text
    lines = ivm.Reboot.normalise_nft_json(js, None, extra)
    assert (
        "rule ip nat DOCKER: meta iifname != br-d2b0beece4b3 tcp dport 443 counter xt target DNAT"
        in lines
    )
    assert not any("br-new" in ln for ln in lines)


def test_container_addresses_become_names():
    ips = ivm.Reboot.parse_container_ips(
        "/caddy 172.18.0.2 \n/db 172.18.0.25 fd00::19\n/hostnet  \n/odd <no value>\n"
    )
    assert ips == {"172.18.0.2": "caddy", "172.18.0.25": "db", "fd00::19": "db"}
    line = (
        "ip saddr 172.18.0.2 ip daddr 172.18.0.25 dnat to 172.18.0.2:443 "
        "ip daddr 172.18.0.20 ip6 daddr fd00::19 ip6 daddr fd00::190 ip saddr 172.18.0.2/32"
    )
    assert ivm.Reboot.name_container_addresses(line, ips) == (
        "ip saddr <caddy> ip daddr <db> dnat to <caddy>:443 ip daddr 172.18.0.20 "
        "ip6 daddr <db> ip6 daddr fd00::190 ip saddr <caddy>/32"
    )
    # the container came back at another address: the same rules
    items, text = _nft_items(), (GUEST / "nft-ruleset.txt").read_text()
    moved = json.loads(json.dumps(items).replace('"172.18.0.2"', '"172.18.0.3"'))
    moved_text = text.replace("172.18.0.2", "172.18.0.3")
    before = ivm.Reboot.normalise_nft_json(_nft(items), {"172.18.0.2": "caddy"}, text)
    assert before == ivm.Reboot.normalise_nft_json(_nft(moved), {"172.18.0.3": "caddy"}, moved_text)
    assert (
        'rule ip nat DOCKER: iifname != "br-d2b0beece4b3" udp dport 443 counter '
        "dnat to <caddy>:443" in before
    )
    # ... but a DNAT to an address no container holds any more is a difference
    stale = ivm.Reboot.normalise_nft_json(_nft(moved), {"172.18.0.4": "caddy"}, moved_text)
    removed, added = ivm.Reboot.diff_lines(before, stale)
    assert len(removed) == len(added) == 9 and all("172.18.0.3" in a for a in added)
    assert sum("dnat to 172.18.0.3" in a for a in added) == 3


def test_normalise_nft_json_keeps_rule_order_in_boma_tables():
    items = _nft_items()
    idx = [
        i
        for i, it in enumerate(items)
        if "rule" in it and it["rule"]["family"] == "inet" and it["rule"]["chain"] == "forward"
    ]
    swapped = list(items)
    swapped[idx[0]], swapped[idx[1]] = swapped[idx[1]], swapped[idx[0]]
    before, after = (
        ivm.Reboot.normalise_nft_json(_nft(items)),
        ivm.Reboot.normalise_nft_json(_nft(swapped)),
    )
    assert sorted(before) == sorted(after) and before != after
    removed, added = ivm.Reboot.diff_lines(before, after)
    assert len(removed) == len(added) == 1 and removed == added  # a moved rule


def test_normalise_nft_json_sets_objects_and_empty():
    text = json.dumps(
        {
            "nftables": [
                {"metainfo": {"version": "1.1.3"}},
                {"table": {"family": "inet", "name": "f", "handle": 9}},
                {
                    "set": {
                        "family": "inet",
                        "table": "f",
                        "name": "allow",
                        "type": "ipv4_addr",
                        "handle": 3,
                        "flags": ["interval"],
                        "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}, "192.168.1.1"],
                    }
                },
                {"chain": {"family": "inet", "table": "f", "name": "c", "handle": 1}},
                {
                    "counter": {
                        "family": "inet",
                        "table": "f",
                        "name": "hits",
                        "handle": 4,
                        "packets": 5,
                        "bytes": 6,
                    }
                },
            ]
        }
    )
    assert ivm.Reboot.normalise_nft_json(text) == [
        "table inet f",
        "chain inet f c",
        'set inet f allow {"flags":["interval"],"type":"ipv4_addr"} elements '
        "{ 10.0.0.0/8, 192.168.1.1 }",
        "counter inet f hits {}",
    ]
    assert ivm.Reboot.normalise_nft_json('{"nftables": [{"metainfo": {}}]}') == []
    with pytest.raises(ValueError):
        ivm.Reboot.normalise_nft_json("nft: not JSON")


def test_normalise_docker_ports():
    out = ivm.Reboot.normalise_docker_ports(
        (GUEST / "docker-ps.txt").read_text() + "netbird-signal \nzz-worker\n"
    )
    assert out == [
        "caddy 0.0.0.0:443->443/tcp",
        "caddy 0.0.0.0:443->443/udp",
        "caddy 0.0.0.0:80->80/tcp",
        "caddy [::]:443->443/tcp",
        "caddy [::]:443->443/udp",
        "caddy [::]:80->80/tcp",
        "netbird-signal -",
        "zz-worker -",
    ]
    assert ivm.Reboot.normalise_docker_ports("docker: absent\n") == ["docker: absent"]
    assert ivm.Reboot.normalise_docker_ports("") == []


def test_normalise_listeners_realistic():
    out = ivm.Reboot.normalise_listeners(
        (GUEST / "ss-tulnp.txt").read_text(), (32768, 60999), own_ips=["192.168.150.42"]
    )
    assert out == sorted(
        [
            "udp 127.0.0.54:53 systemd-resolve",
            "udp 127.0.0.53%lo:53 systemd-resolve",
            "udp VM_IP%enp1s0:68 systemd-network",
            "udp 0.0.0.0:443 docker-proxy",
            "udp [::]:443 docker-proxy",
            "udp 0.0.0.0:5355 systemd-resolve",
            "udp [::]:5355 systemd-resolve",
            "tcp 127.0.0.54:53 systemd-resolve",
            "tcp 127.0.0.53%lo:53 systemd-resolve",
            "tcp 127.0.0.1:ephemeral containerd",
            "tcp 0.0.0.0:5355 systemd-resolve",
            "tcp 0.0.0.0:22 sshd",
            "tcp 0.0.0.0:443 docker-proxy",
            "tcp 0.0.0.0:80 docker-proxy",
            "tcp [::]:22 sshd",
            "tcp [::]:443 docker-proxy",
            "tcp [::]:80 docker-proxy",
            "tcp [::]:5355 systemd-resolve",
        ]
    )


def test_normalise_listeners_tlnp_without_netid_and_odd_rows():
    text = (
        'LISTEN 0 4096 0.0.0.0:443 0.0.0.0:* users:(("docker-proxy",pid=1234,fd=7))\n'
        'LISTEN 0 4096 0.0.0.0:443 0.0.0.0:* users:(("docker-proxy",pid=9,fd=7))\n'
        'LISTEN 0 128 *:8080 *:* users:(("nginx",pid=2,fd=6),("nginx",pid=1,fd=6),'
        '("nginx",pid=3,fd=6))\n'
        "LISTEN 0 64 0.0.0.0:2049 0.0.0.0:*\n"
        'LISTEN 0 5 [fe80::5054:ff:fe12:3456]%enp1s0:546 [::]:* users:(("x y",pid=5,fd=1))\n'
        'LISTEN 0 5 127.0.0.1:45000 0.0.0.0:* users:(("containerd",pid=7,fd=9))\n'
        "garbage\n"
    )
    assert ivm.Reboot.normalise_listeners(text, (40000, 50000), own_ips=["127.0.0.1"]) == [
        "tcp *:8080 nginx",
        "tcp 0.0.0.0:2049 -",
        "tcp 0.0.0.0:443 docker-proxy",
        "tcp 127.0.0.1:ephemeral containerd",  # loopback is never "the VM's address"
        "tcp [fe80::5054:ff:fe12:3456]%enp1s0:546 x y",
    ]


def test_parse_port_range_and_failed_units():
    assert ivm.Reboot.parse_port_range("32768\t60999\n") == (32768, 60999)
    assert ivm.Reboot.parse_port_range("") == (32768, 60999)
    assert ivm.Reboot.parse_failed_units(
        "fstrim.service loaded failed failed Discard\na.mount loaded failed failed A\n\n"
    ) == ["a.mount", "fstrim.service"]
    assert ivm.Reboot.parse_failed_units("") == []


def test_pair_enabled_active():
    units = (GUEST / "list-unit-files.txt").read_text()
    names = [ln.split()[0] for ln in units.splitlines() if "@." not in ln]
    states = "\n".join("inactive" if n.startswith("sshd-keygen") else "active" for n in names)
    out = ivm.Reboot.pair_enabled_active(units, states)
    assert "getty@.service active" not in out and len(out) == len(names) == 13
    assert out[0] == "cloud-config.service active" and "sshd-keygen.service inactive" in out
    assert ivm.Reboot.pair_enabled_active(units, "active\n")[0].startswith("! services: 13 enabled")
    assert ivm.Reboot.pair_enabled_active("", "") == []


def test_normalise_capture_records_failures_as_lines():
    st = ivm.Reboot.normalise_capture(
        ivm.Reboot.parse_capture_output(
            _capture(
                boot_id=(0, "b-1"),
                port_range=(0, "32768 60999"),
                nft_json=(1, "Error: Could not process rule: Operation not permitted"),
                docker=(124, ""),
                sockets=(0, "not ss output"),
                enabled_units=(0, "ssh.service enabled enabled"),
                enabled_active=(0, "active"),
            ),
            NONCE,
        )
    )
    c = st["categories"]
    assert st["boot_id"] == "b-1" and st["port_range"] == [32768, 60999]
    assert c["nft"] == ["! nft -j list ruleset: exit 1"]
    assert c["ports"] == ["! docker ps: timed out"]
    assert c["sockets"] == []
    assert c["failed_units"] == ["! systemctl --failed: not captured"]
    assert c["services"] == ["ssh.service active"]
    assert st["nft_text"] == "! nft list ruleset: not captured"
    bad = ivm.Reboot.normalise_capture(
        ivm.Reboot.parse_capture_output(
            _capture(
                nft_json=(0, "{not json"),
                enabled_units=(0, "a.service enabled enabled"),
                enabled_active=(124, ""),
            ),
            NONCE,
        )
    )["categories"]
    assert bad["nft"][0].startswith("! nft -j list ruleset: unparsable output")
    assert bad["services"] == ["! systemctl is-active: timed out"]


def test_diff_state_finds_flushes_readds_and_losses():
    before = {
        "nft": ["table inet filter", "rule inet filter forward: accept"],
        "ports": ["caddy 0.0.0.0:443->443/tcp"],
        "sockets": ["tcp 0.0.0.0:443 docker-proxy"],
        "failed_units": [],
        "services": ["docker.service active"],
    }
    after = {
        "nft": [
            "table inet filter",
            "rule inet filter forward: accept",
            "rule inet filter forward: accept",
        ],  # re-added: a duplicate
        "ports": [],
        "sockets": ["tcp 0.0.0.0:443 docker-proxy"],
        "failed_units": ["docker.service"],
        "services": ["docker.service failed"],
    }
    d = ivm.Reboot.diff_state(before, after)
    assert d["nft"] == {"removed": [], "added": ["rule inet filter forward: accept"]}
    assert d["ports"] == {"removed": ["caddy 0.0.0.0:443->443/tcp"], "added": []}
    assert d["sockets"] == {"removed": [], "added": []}
    assert d["failed_units"]["added"] == ["docker.service"]
    assert d["services"] == {
        "removed": ["docker.service active"],
        "added": ["docker.service failed"],
    }
    assert ivm.Reboot.diff_state(before, before) == {
        c: {"removed": [], "added": []} for c in ivm.Reboot.REBOOT_DIFF_CATEGORIES
    }


def test_classify_diff_with_dict_and_list_tolerance():
    d = {c: {"removed": [], "added": []} for c in ivm.Reboot.REBOOT_DIFF_CATEGORIES}
    d["sockets"]["added"] = ["udp 0.0.0.0:68 dhclient"]
    d["nft"]["removed"] = [
        "rule ip nat DOCKER: meta iifname docker0 counter return",
        "rule inet filter forward: meta iifname docker0 accept",
    ]
    tol, unexp = ivm.Reboot.classify_diff(
        d, {"sockets": ["dhclient"], "nft": ["^rule ip6? (nat|filter) DOCKER"]}
    )
    assert tol == [
        "nft: - rule ip nat DOCKER: meta iifname docker0 counter return",
        "sockets: + udp 0.0.0.0:68 dhclient",
    ]
    assert unexp == ["nft: - rule inet filter forward: meta iifname docker0 accept"]
    # a pattern only applies to its own category; the sign is not part of the line
    tol, unexp = ivm.Reboot.classify_diff(d, {"nft": ["dhclient"], "sockets": ["^[+-]"]})
    assert tol == [] and len(unexp) == 3
    tol, unexp = ivm.Reboot.classify_diff(d, ["docker0"])  # a list applies everywhere
    assert unexp == ["sockets: + udp 0.0.0.0:68 dhclient"] and len(tol) == 2
    assert ivm.Reboot.classify_diff(d, {}) == (
        [],
        [
            "nft: - rule ip nat DOCKER: meta iifname docker0 counter return",
            "nft: - rule inet filter forward: meta iifname docker0 accept",
            "sockets: + udp 0.0.0.0:68 dhclient",
        ],
    )


def test_capture_errors_are_unexpected_even_when_unchanged():
    err = "! ss -tulnp: exit 1: Cannot open netlink socket"
    before = {"sockets": [err], "nft": ["table inet filter"], "services": []}
    after = {
        "sockets": [err],
        "nft": ["table inet filter"],
        "services": ["! systemctl is-active: timed out"],
    }
    errors = ivm.Reboot.capture_errors(before, after)
    assert errors == {"sockets": [err], "services": ["! systemctl is-active: timed out"]}
    d = ivm.Reboot.diff_state(before, after)
    assert d["sockets"] == {"removed": [], "added": []}  # the same both times: no diff...
    tol, unexp = ivm.Reboot.classify_diff(d, {}, errors)  # ...but not compared either
    assert unexp == [f"sockets: {err}", "services: + ! systemctl is-active: timed out"]
    tol, unexp = ivm.Reboot.classify_diff(d, {"sockets": ["^! ss .*netlink"]}, errors)
    assert tol == [f"sockets: {err}"] and len(unexp) == 1


@pytest.mark.parametrize(
    "value,needle",
    [
        ({"socket": ["x"]}, "unknown categories ['socket']"),
        ({"sockets": "dhclient"}, "lists of non-empty regex strings (category 'sockets')"),
        ({"sockets": [""]}, "lists of non-empty regex strings"),
        ({"nft": ["(unclosed"]}, "invalid regex '(unclosed'"),
        (["ok", 3], "lists of non-empty regex strings (category '*')"),
    ],
)
def test_check_tolerance_spec_rejects(value, needle):
    with pytest.raises(ivm.UsageError) as e:
        ivm.Profiles.check_tolerance_spec(value, "profile x.json")
    assert str(e.value).startswith("profile x.json: key 'reboot_diff_tolerate'") and needle in str(
        e.value
    )
    ivm.Profiles.check_tolerance_spec({"sockets": ["dhclient"], "nft": ["^rule ip"]}, "p")
    ivm.Profiles.check_tolerance_spec(["dhclient"], "p")


def _states():
    before = {
        "boot_id": "aaaa",
        "at": "t0",
        "categories": {
            "nft": [
                "table inet filter",
                "chain inet filter forward",
                "rule inet filter forward: a",
                "rule inet filter forward: b",
            ],
            "ports": [],
            "sockets": ["tcp 0.0.0.0:22 sshd"],
            "failed_units": [],
            "services": [],
        },
    }
    after = {"boot_id": "bbbb", "at": "t1", "categories": dict(before["categories"])}
    after["categories"]["nft"] = before["categories"]["nft"][:3]
    after["categories"]["sockets"] = ["tcp 0.0.0.0:22 sshd", "udp 0.0.0.0:68 dhclient"]
    return before, after


def test_render_state_diff_and_summary(tmp_path):
    before, after = _states()
    d = ivm.Reboot.diff_state(before["categories"], after["categories"])
    tol, unexp = ivm.Reboot.classify_diff(d, {"sockets": ["dhclient"]})
    text = ivm.Reboot.render_state_diff(before, after, d, tol, unexp, "hard", 2, note="a note")
    assert text.startswith("reboot 2 (hard): boot_id aaaa -> bbbb\n")
    assert "a note" in text
    assert (
        "UNEXPECTED (1; not in the profile's reboot_diff_tolerate):\n"
        "  nft: - rule inet filter forward: b" in text
    )
    assert "tolerated (1; reboot_diff_tolerate):\n  sockets: + udp 0.0.0.0:68 dhclient" in text
    assert (
        "--- before/nft.json\n+++ after/nft.json\n" in text
        and "\n-rule inet filter forward: b\n" in text
    )
    assert "== ports: 0 removed, 0 added ==" in text
    s = ivm.Reboot.reboot_diff_summary("hard", 2, d, tol, unexp, tmp_path / "reboot-2-hard")
    json.dumps(s)
    assert s["changed"] is True and s["mode"] == "hard" and s["index"] == 2
    assert s["categories"]["nft"] == {"added": 0, "removed": 1}
    assert s["categories"]["sockets"] == {"added": 1, "removed": 0}
    assert s["diff"].endswith("reboot-2-hard/diff.txt")
    same = ivm.Reboot.diff_state(before["categories"], before["categories"])
    assert "no differences" in ivm.Reboot.render_state_diff(
        before, before, same, [], [], "graceful", 1
    )
    assert ivm.Reboot.reboot_diff_summary("graceful", 1, same, [], [], tmp_path)["changed"] is False


@pytest.mark.parametrize(
    "text,secs",
    [
        ("1min 3.402s", 63.402),
        ("987ms", 0.987),
        ("2.104s", 2.104),
        ("1h 2min", 3720.0),
        ("", None),
        ("n/a", None),
    ],
)
def test_parse_timespan(text, secs):
    assert ivm.Reboot.parse_timespan(text) == secs


def test_parse_analyze_time_with_and_without_initrd():
    assert ivm.Reboot.parse_analyze_time(
        "Startup finished in 1.975s (kernel) + 2.123s (initrd) + 10.3s (userspace) = 14.398s\n"
        "graphical.target reached after 10.2s in userspace.\n"
    ) == {"kernel": 1.975, "initrd": 2.123, "userspace": 10.3, "total": 14.398}
    assert ivm.Reboot.parse_analyze_time(
        "Startup finished in 3.871s (kernel) + 1min 2.130s (userspace) = 1min 6.001s \n"
    ) == {"kernel": 3.871, "userspace": 62.13, "total": 66.001}
    assert ivm.Reboot.parse_analyze_time("Bootup is not yet finished.\n") is None


def test_parse_blame_sorts_and_cuts():
    text = " 987ms a.service\n1min 2.5s b.service\n30.8s c.service\ngarbage\n"
    assert ivm.Reboot.parse_blame(text, top=2) == [[62.5, "b.service"], [30.8, "c.service"]]


def test_a_capture_before_a_reboot_leaves_out_the_boot_analysis(tmp_path):
    import subprocess

    bin_ = _stub_guest(tmp_path, "running")
    p = subprocess.run(
        ["/bin/sh", "-s"],
        input=ivm.Reboot.render_capture_script(NONCE, 5, analyze=False),
        env={"PATH": str(bin_)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    secs = ivm.Reboot.parse_capture_output(p.stdout, NONCE)
    assert p.returncode == 0 and "nft_json" in secs and "enabled_active" in secs
    assert not {"boot_time", "boot_blame", "boot_chain"} & set(secs)
    assert ivm.Reboot.normalise_capture(secs)["boot"] is None


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
