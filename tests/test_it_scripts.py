"""scripts/it-run's netns sandbox and scripts/it-leftovers against fake host tools (issue 12).

No real network, firewall, sysctl or daemon is touched: ip, iptables, iptables-save, sysctl,
virtlogd, libvirtd, pgrep and id are tests/fakes/sysbin.py, virsh is tests/fakes/fakebin.py,
and the only other tools on PATH are the handful of real ones the scripts need. /run and
/etc/libvirt are moved under a temp dir with BOMA_IT_SYSROOT. it-run is sourced (its
functions only) to drive the sandbox's setup and teardown one step at a time.
"""

import ipaddress
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
IT_RUN = REPO / "scripts" / "it-run"
LEFTOVERS = REPO / "scripts" / "it-leftovers"
SYS_FAKES = ("ip", "iptables", "iptables-save", "sysctl", "virtlogd", "libvirtd", "pgrep", "id")
REAL = (
    "bash",
    "sh",
    "cat",
    "awk",
    "grep",
    "sed",
    "sleep",
    "seq",
    "mkdir",
    "rm",
    "rmdir",
    "chmod",
    "flock",
    "readlink",
    "env",
    "dirname",
    "basename",
    "head",
    "tail",
    "tr",
    "cut",
    "find",
    "ls",
    "sort",
    "touch",
    "stat",
    "git",
)
NS = "boma-it-tsbx"  # never the real sandbox's name


class Sandbox:
    def __init__(self, tmp):
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.root = tmp / "root"
        self.cache = tmp / "cache"
        self.state_file = tmp / "sys-state.json"
        self.bin.mkdir()
        for t in SYS_FAKES:
            (self.bin / t).symlink_to(HERE / "fakes" / "sysbin.py")
        (self.bin / "virsh").symlink_to(HERE / "fakes" / "fakebin.py")
        for t in REAL:
            (self.bin / t).symlink_to(shutil.which(t))
        (self.bin / "python3").symlink_to(sys.executable)
        (self.root / "run" / "lock").mkdir(parents=True)
        (self.root / "etc" / "libvirt").mkdir(parents=True)
        self.cache.mkdir()
        self.env = {
            "PATH": str(self.bin),
            "LANG": "C.UTF-8",
            "HOME": str(tmp),
            "BOMA_IT_SYSROOT": str(self.root),
            "BOMA_IT_NETNS": NS,
            "BOMA_IT_CACHE": str(self.cache),
            "BOMA_IT_RUN_DIR": str(tmp / "runs"),
            "FAKE_SYS_STATE": str(self.state_file),
            "FAKE_STATE": str(tmp / "virsh.json"),
            "FAKE_LOG": str(tmp / "virsh.log"),
            "VENV": str(tmp / "no-venv"),
            "SANDBOX": "netns",
        }
        self.write({"sysctl": {"net.ipv4.ip_forward": "0"}})

    def state(self):
        return json.loads(self.state_file.read_text())

    def write(self, st):
        self.state_file.write_text(json.dumps(st))

    def update(self, fn):
        st = self.state()
        fn(st)
        self.write(st)

    def sh(self, script, **env):
        """Source it-run (functions only) and run `script` after it."""
        return subprocess.run(
            ["bash", "-c", f'source "{IT_RUN}"; {script}'],
            env={**self.env, **env},
            text=True,
            capture_output=True,
            timeout=60,
            cwd=self.tmp,
        )

    def leftovers(self, **env):
        return subprocess.run(
            [str(LEFTOVERS)],
            env={**self.env, **env},
            text=True,
            capture_output=True,
            timeout=60,
            cwd=self.tmp,
        )

    def spawn(self):
        p = subprocess.Popen(["sleep", "300"], start_new_session=True)
        self.update(lambda st: st.setdefault("spawned", []).append(p.pid))
        return p.pid

    def close(self):
        if self.state_file.exists():
            for pid in self.state().get("spawned", []):
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def sb(tmp_path):
    s = Sandbox(tmp_path)
    yield s
    s.close()


# ---- class 8: the sandbox name is checked before it is used anywhere ----------------------
@pytest.mark.parametrize(
    "bad",
    [
        ".",
        "../x",
        "boma-it-",
        "boma-it-../../etc",
        "x",
        "boma-it-a/b",
        "boma-it-sbx;id",
        "boma-it-" + "a" * 21,
        "boma-it-sbx\nfoo",
        "boma-it-SBX",
    ],
)
@pytest.mark.parametrize("script", [IT_RUN, LEFTOVERS])
def test_bad_netns_name_is_exit_2_before_anything(sb, script, bad):
    p = subprocess.run(
        [str(script), "status"],
        env={**sb.env, "BOMA_IT_NETNS": bad},
        text=True,
        capture_output=True,
        timeout=30,
        cwd=sb.tmp,
    )
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and "BOMA_IT_NETNS" in p.stderr
    assert list((sb.root / "run" / "lock").iterdir()) == []
    assert not (sb.tmp / "virsh.log").exists() and "netns" not in sb.state_file.read_text()


# ---- class 8: cleanup_rules: exact comment, never eval ------------------------------------
def test_cleanup_rules_deletes_exactly_ours_and_never_runs_rule_text(sb):
    pwned = sb.tmp / "pwned"
    ours_nat = (
        f"-A POSTROUTING -s 10.250.0.2/32 ! -d 10.250.0.0/30 -m comment --comment {NS} "
        "-j MASQUERADE"
    )
    ours_fwd = f"-A FORWARD -i bit-out0 -m comment --comment {NS} -j DROP"
    keep = [
        f"-A FORWARD -i bit-out0 -m comment --comment {NS}2 -j DROP",  # another sandbox
        f'-A FORWARD -m comment --comment "{NS} $(touch {pwned})" -j ACCEPT',
        f'-A FORWARD -m comment --comment {NS} -m comment --comment "`touch {pwned}`" -j ACCEPT',
        "-A FORWARD -i docker0 -m comment --comment boma -j ACCEPT",
        "-A FORWARD -o docker0 -j DOCKER",
    ]
    sb.update(
        lambda st: st.update(
            rules={
                "nat": [ours_nat, f"-A POSTROUTING -m comment --comment {NS}x -j MASQUERADE"],
                "filter": [ours_fwd] + keep,
            }
        )
    )
    p = sb.sh("cleanup_rules")
    assert p.returncode == 0, p.stderr
    assert not pwned.exists()
    rules = sb.state()["rules"]
    assert rules["filter"] == keep
    assert rules["nat"] == [f"-A POSTROUTING -m comment --comment {NS}x -j MASQUERADE"]


# ---- class 8: up/down restore what they changed and touch only what they made -------------
def test_sandbox_restores_ip_forward_and_stops_only_its_own_daemons(sb):
    up = sb.sh("sandbox_up")
    assert up.returncode == 0, up.stderr
    st = sb.state()
    assert st["sysctl"]["net.ipv4.ip_forward"] == "1"
    assert NS in st["netns"] and "bit-out0" in st["links"]
    assert any(f"--comment {NS} " in r for r in st["rules"]["filter"])
    daemons = [
        int((sb.root / "run" / f).read_text())
        for f in ("libvirtd.pid", "virtlogd.pid", "libvirt/network/boma-it.pid")
    ]
    assert all(alive(p) for p in daemons)
    operator = sb.spawn()  # `ip netns exec boma-it-... ssh ...` from the runbook
    sb.update(lambda s: s["netns"][NS]["pids"].append(operator))
    down = sb.sh("sandbox_down")
    assert down.returncode == 0, down.stderr
    st = sb.state()
    assert st["sysctl"]["net.ipv4.ip_forward"] == "0"
    assert NS not in st["netns"] and st["links"] == []
    assert st["rules"] == {"nat": [], "filter": []}
    assert not any(alive(p) for p in daemons)
    assert alive(operator), "an operator's process in the namespace was killed"
    assert str(operator) in down.stderr  # named, not killed
    assert not (sb.root / "run" / "libvirt" / "libvirt-sock").exists()
    assert not (sb.root / "run" / "boma-it" / NS).exists()


def test_a_daemon_that_exited_but_is_not_reaped_counts_as_stopped(sb):
    # sandbox_down waits for its daemons to exit. A zombie has exited (its sockets are
    # closed); only its reaping is late, which this machine kind's init takes ~1 s for.
    live = sb.spawn()
    zombie = subprocess.Popen(["true"])  # our child, never waited on until the end
    try:
        deadline = time.monotonic() + 10
        stat = pathlib.Path(f"/proc/{zombie.pid}/stat")
        while stat.read_text().rsplit(") ", 1)[1][0] != "Z":
            assert time.monotonic() < deadline, "`true` did not exit within 10 s"
            time.sleep(0.01)
        checks = {pid: sb.sh(f"pid_running {pid}").returncode for pid in (live, zombie.pid)}
        checks["gone"] = sb.sh("pid_running 999999999").returncode
    finally:
        zombie.wait()
    assert checks == {live: 0, zombie.pid: 1, "gone": 1}


def _main_of_it_run(sb, domains, stub=""):
    """it-run's main around a command that does nothing (`exec -- sh -c :`): what it
    decides after the command, given `domains`. The substrate check and the sandbox's
    setup are stubbed, and its teardown only says it ran: their own tests are above."""
    virsh_state(sb, domains=domains)
    sb.update(lambda st: st.update(netns={NS: {"pids": []}}))
    return sb.sh(
        "ensure_substrate() { :; }; sandbox_up() { :; }; "
        f"sandbox_down() {{ echo SANDBOX-DOWN >&2; }}; {stub} main exec -- sh -c :"
    )


def test_a_sandbox_with_vms_left_stays_up_however_long_their_list(sb):
    # `virsh list | grep -q .` under pipefail failed whenever grep quit before virsh had
    # written its last line, and it-run then tore down the sandbox under the kept VMs
    # (2 of 4 real `up`s). A list longer than a pipe's buffer makes that certain.
    many = {f"boma-it-askari-{i:08x}": {"state": "running"} for i in range(4000)}
    p = _main_of_it_run(sb, many)
    assert p.returncode == 0, p.stderr
    assert "VMs remain in sandbox" in p.stderr and "SANDBOX-DOWN" not in p.stderr, p.stderr


def test_a_sandbox_whose_libvirt_does_not_answer_stays_up(sb):
    p = _main_of_it_run(sb, {}, stub="sandbox_domains() { return 1; };")
    assert p.returncode == 0, p.stderr
    assert "did not answer: leaving it up" in p.stderr and "SANDBOX-DOWN" not in p.stderr


def test_a_sandbox_without_vms_is_torn_down_after_the_command(sb):
    p = _main_of_it_run(sb, {})
    assert p.returncode == 0, p.stderr
    assert "SANDBOX-DOWN" in p.stderr, p.stderr


def test_ip_forward_already_on_stays_on(sb):
    sb.update(lambda st: st["sysctl"].update({"net.ipv4.ip_forward": "1"}))
    assert sb.sh("sandbox_up").returncode == 0
    assert sb.sh("sandbox_down").returncode == 0
    assert sb.state()["sysctl"]["net.ipv4.ip_forward"] == "1"


def test_ip_forward_stays_on_for_a_docker_engine_started_while_the_sandbox_ran(sb):
    """2026-12-07: the sandbox put ip_forward back to 0 under a dockerd started meanwhile
    (it found forwarding on, so it never set it itself); Molecule's apt then failed."""
    assert sb.sh("sandbox_up").returncode == 0
    sb.update(lambda st: st["links"].append("docker0"))
    down = sb.sh("sandbox_down")
    assert down.returncode == 0, down.stderr
    assert sb.state()["sysctl"]["net.ipv4.ip_forward"] == "1"
    assert "left ip_forward on: a Docker engine (docker0)" in down.stderr


def test_a_libvirtd_outside_the_sandbox_is_refused_and_left_alone(sb):
    host = sb.spawn()
    run = sb.root / "run"
    (run / "libvirt").mkdir()
    (run / "libvirt" / "libvirt-sock").touch()
    (run / "libvirtd.pid").write_text(f"{host}\n")
    up = sb.sh("sandbox_up")
    assert up.returncode == 3 and f"pid {host}" in up.stderr, up.stderr
    # a namespace of ours whose libvirtd is not the one the pidfile names
    sb.update(lambda st: st["netns"].update({NS: {"pids": []}}))
    down = sb.sh("sandbox_down")
    assert down.returncode == 0, down.stderr
    assert alive(host)
    assert (run / "libvirt" / "libvirt-sock").exists() and (run / "libvirtd.pid").exists()


# ---- class 8/9: it-leftovers sees every kind of leak, and never says clean unchecked ------
def virsh_state(sb, **extra):
    st = {
        "domains": {},
        "networks": {"boma-it": {"active": True, "autostart": True}},
        "leases": {},
        "calls": {},
        "pools": {},
    }
    st.update(extra)
    (sb.tmp / "virsh.json").write_text(json.dumps(st))


def test_leftovers_clean(sb):
    virsh_state(sb)
    p = sb.leftovers()
    assert p.returncode == 0, p.stderr
    assert "clean" in p.stdout and "not running" not in p.stdout


def test_leftovers_reports_each_kind(sb):
    runs = sb.cache / "runs" / "boma-it-askari-1"
    runs.mkdir(parents=True)
    (runs / "overlay.qcow2").write_text("x")
    virsh_state(
        sb,
        domains={"boma-it-askari-2": {"state": "shut off"}},
        networks={
            "boma-it": {"active": True, "autostart": True},
            "boma-it-extra": {"active": False, "autostart": False},
        },
        pools={
            "boma-it-askari-3": {
                "target": "/gone",
                "active": False,
                "persistent": True,
                "autostart": True,
            },
            "runs": {
                "target": str(sb.cache / "runs"),
                "active": True,
                "persistent": True,
                "autostart": False,
            },
        },
    )
    sb.update(
        lambda st: st.update(
            netns={NS: {"pids": []}},
            links=["bit-out0", "bit-in0"],
            rules={
                "nat": [f"-A POSTROUTING -m comment --comment {NS} -j MASQUERADE"],
                "filter": [],
            },
            sysctl={"net.ipv4.ip_forward": "1"},
        )
    )
    state = sb.root / "run" / "boma-it" / NS
    state.mkdir(parents=True)
    (state / "ip_forward").write_text("0\n")
    etc = sb.root / "etc" / "libvirt"
    for d in ("qemu/autostart", "storage/autostart"):
        (etc / d).mkdir(parents=True)
    (etc / "qemu" / "boma-it-askari-4.xml").write_text("<domain/>")
    (etc / "storage" / "boma-it-askari-5.xml").write_text("<pool/>")
    (etc / "storage" / "autostart" / "boma-it-askari-5.xml").symlink_to("../boma-it-askari-5.xml")
    (etc / "storage" / "other.xml").write_text(
        f"<pool><target><path>{sb.cache}/runs/x</path></target></pool>"
    )
    p = sb.leftovers()
    assert p.returncode == 1, (p.stdout, p.stderr)
    for needle in (
        f"network namespace {NS}",
        "veth bit-out0",
        f"1 iptables rule(s) commented {NS}",
        "ip_forward is 1, was 0",
        "libvirt domains: boma-it-askari-2",
        "libvirt networks: boma-it-extra",
        "storage pool boma-it-askari-3 (/gone)",
        "storage pool runs",
        f"volume {runs}",
        "qemu/boma-it-askari-4.xml",
        "storage/boma-it-askari-5.xml",
        "storage/autostart/boma-it-askari-5.xml",
        "storage/other.xml",
        f"files under {sb.cache}/runs",
    ):
        assert needle in p.stderr, (needle, p.stderr)
    assert "network boma-it " not in p.stderr and "networks: boma-it\n" not in p.stderr


def test_leftovers_reports_a_shared_ssh_connection_left_running(sb):
    virsh_state(sb)
    master = "ssh: /var/lib/boma-integration/runs/boma-it-askari-0a1b2c3d/ssh-mux [mux]"
    p = sb.leftovers(FAKE_PROCS=f"sshd: operator@pts/0;{master}")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert f"ssh masters: 4201 {master}" in p.stderr
    assert sb.leftovers(FAKE_PROCS="ssh: /home/op/.ssh/cm-foo [mux]").returncode == 0


def test_leftovers_cannot_say_clean_when_libvirtd_does_not_answer(sb):
    daemon = sb.spawn()
    (sb.root / "run" / "libvirtd.pid").write_text(f"{daemon}\n")
    p = sb.leftovers(FAKE_LIBVIRT_DOWN="1")
    assert p.returncode == 3, (p.stdout, p.stderr)
    assert "could not check libvirt" in p.stderr and "clean" not in p.stdout


def test_leftovers_without_libvirtd_reads_libvirts_files(sb):
    p = sb.leftovers(FAKE_LIBVIRT_DOWN="1")
    assert p.returncode == 0 and "libvirtd is not running" in p.stdout, (p.stdout, p.stderr)
    (sb.root / "etc" / "libvirt" / "storage").mkdir()
    (sb.root / "etc" / "libvirt" / "storage" / "boma-it-askari-1.xml").write_text("<pool/>")
    p = sb.leftovers(FAKE_LIBVIRT_DOWN="1")
    assert p.returncode == 1 and "storage/boma-it-askari-1.xml" in p.stderr, p.stderr


# ---- issue 27, class 7: the sandbox's promise ----------------------------------------------
RESOLVER = "192.168.1.53"  # a home router's resolver: DNS to it, nothing else
PUBLIC = "151.101.2.132"  # deb.debian.org's CDN
PRIVATE = ("10.1.2.3", "172.16.5.5", "192.168.1.10", "169.254.169.254", "127.0.0.1", "100.64.0.1")

# The filter table as dockerd (20.10 .. 26) leaves it with one bridge: FORWARD's policy
# DROP, its jumps and docker0's rules at FORWARD's head.
DOCKER_CHAINS = ["DOCKER", "DOCKER-ISOLATION-STAGE-1", "DOCKER-ISOLATION-STAGE-2", "DOCKER-USER"]
DOCKER_FORWARD = [
    "-A FORWARD -j DOCKER-USER",
    "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
    "-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    "-A FORWARD -o docker0 -j DOCKER",
    "-A FORWARD -i docker0 ! -o docker0 -j ACCEPT",
    "-A FORWARD -i docker0 -o docker0 -j ACCEPT",
]
DOCKER_OWN = [
    "-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2",
    "-A DOCKER-ISOLATION-STAGE-1 -j RETURN",
    "-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP",
    "-A DOCKER-ISOLATION-STAGE-2 -j RETURN",
    "-A DOCKER-USER -j RETURN",
]


def dockerd_starts(st):
    """What dockerd does to the filter table when it starts (its rules at FORWARD's head)."""
    st.setdefault("policy", {}).setdefault("filter", {})["FORWARD"] = "DROP"
    st.setdefault("chains", {})["filter"] = DOCKER_CHAINS
    rules = st.setdefault("rules", {}).setdefault("filter", [])
    rules[:0] = DOCKER_FORWARD
    rules.extend(DOCKER_OWN)


def _hit(opt, val, pkt):
    """Whether `pkt` matches one option of a rule (an option not known here fails)."""
    if opt in ("-i", "-o"):
        return pkt.get({"-i": "in", "-o": "out"}[opt]) == val
    if opt in ("-s", "-d"):
        addr = pkt[{"-s": "src", "-d": "dst"}[opt]]
        return ipaddress.ip_address(addr) in ipaddress.ip_network(val)
    if opt == "-p":
        return pkt.get("proto") == val
    if opt in ("--dport", "--dports"):
        return str(pkt.get("dport")) in val.split(",")
    if opt == "--ctstate":
        return pkt.get("state", "NEW") in val.split(",")
    raise AssertionError(f"the rule evaluator does not know {opt}: never a guess")


def _match(words, pkt):
    """The target of one `iptables -S` rule (its words after `-A CHAIN`) for `pkt`, or None."""
    i, negate, hit_all, target = 0, False, True, None
    while i < len(words):
        w = words[i]
        if w == "!":
            negate, i = True, i + 1
            continue
        val = words[i + 1]
        i += 2
        if w == "-j":
            target = val
            continue
        if w in ("-m", "--comment"):
            continue
        hit = _hit(w, val, pkt)
        hit_all, negate = hit_all and hit != negate, False
    return target if hit_all else None


def fate(st, chain, **pkt):
    """ACCEPT or DROP: what the recorded filter rules do with `pkt` in `chain`: the first
    rule that matches decides, a jump is followed and RETURN comes back, else the policy."""

    def walk(chain):
        for line in st["rules"]["filter"]:
            words = line.split()
            if words[:2] != ["-A", chain]:
                continue
            target = _match(words[2:], pkt)
            if target == "RETURN":
                return None
            if target in ("ACCEPT", "DROP"):
                return target
            if target is not None and (got := walk(target)):
                return got
        return None

    return walk(chain) or st.get("policy", {}).get("filter", {}).get(chain, "ACCEPT")


def out(**pkt):  # from the namespace (the guests' NAT) towards the world
    return {"in": "bit-out0", "src": "10.250.0.2", "proto": "tcp", **pkt}


@pytest.mark.parametrize("docker", ["none", "dockerd-first", "sandbox-first"])
def test_the_sandbox_lets_out_only_dns_and_web_to_public_addresses(sb, docker):
    """Its promise, "egress only DNS + HTTP/S": the rules lived in FORWARD only, so the
    namespace reached every service of the host itself (INPUT), and 80/443 went to
    private ranges too. And it must hold with dockerd started before or after it."""
    if docker == "dockerd-first":
        sb.update(dockerd_starts)
    up = sb.sh(f"resolver() {{ echo {RESOLVER}; }}; sandbox_up")
    assert up.returncode == 0, up.stderr
    if docker == "sandbox-first":
        sb.update(dockerd_starts)
    st = sb.state()
    allowed = [
        ("FORWARD", out(dst=PUBLIC, dport=443)),
        ("FORWARD", out(dst=PUBLIC, dport=80)),
        ("FORWARD", out(dst=RESOLVER, proto="udp", dport=53)),
        ("FORWARD", out(dst=RESOLVER, dport=53)),
        (
            "FORWARD",
            {"out": "bit-out0", "src": PUBLIC, "dst": "10.250.0.2", "state": "ESTABLISHED"},
        ),
        (
            "INPUT",
            {"in": "bit-out0", "src": "10.250.0.2", "dst": "10.250.0.1", "state": "ESTABLISHED"},
        ),
        ("INPUT", out(dst=RESOLVER, proto="udp", dport=53)),  # the resolver is the host
    ]
    denied = [
        ("FORWARD", out(dst=PUBLIC, dport=22)),
        ("FORWARD", out(dst="8.8.8.8", proto="udp", dport=53)),  # DNS: the resolver only
        ("FORWARD", out(dst=RESOLVER, dport=443)),
        *[("FORWARD", out(dst=ip, dport=port)) for ip in PRIVATE for port in (80, 443)],
        *[
            ("INPUT", out(dst=ip, dport=p))
            for ip in ("10.250.0.1", "203.0.113.7")
            for p in (22, 80, 443, 8080)
        ],
        ("INPUT", out(dst="10.250.0.1", proto="udp", dport=53)),
    ]
    want = [(c, p, "ACCEPT") for c, p in allowed] + [(c, p, "DROP") for c, p in denied]
    wrong = [
        f"{c} {p.get('dst')}:{p.get('dport', '-')}/{p.get('proto', '-')} -> {got}"
        for c, p, w in want
        if (got := fate(st, c, **p)) != w
    ]
    assert wrong == []
    # what is not the sandbox's is as it was: the host's own INPUT, docker's bridge
    assert (
        fate(st, "INPUT", **{"in": "eth0", "dst": "203.0.113.7", "proto": "tcp", "dport": 22})
        == "ACCEPT"
    )
    if docker != "none":
        assert fate(st, "FORWARD", **{"in": "docker0", "out": "eth0", "dst": PUBLIC}) == "ACCEPT"
    down = sb.sh("sandbox_down")
    assert down.returncode == 0, down.stderr
    left = sb.state()["rules"]
    assert left == {"nat": [], "filter": (DOCKER_FORWARD + DOCKER_OWN) if docker != "none" else []}


def _lock_main(sb):
    """it-run's main with its setup and teardown stubbed: does it get past the lock?"""
    virsh_state(sb)
    sb.update(lambda st: st.update(netns={NS: {"pids": []}}))
    return sb.sh(
        "ensure_substrate() { :; }; sandbox_up() { :; }; sandbox_down() { :; }; "
        f"main exec -- touch {sb.tmp / 'ran'}"
    )


def test_the_sandbox_lock_is_never_truncated_nor_followed_through_a_symlink(sb):
    """/run/lock is writable by anyone: `exec 9>LOCK` as root truncated whatever a user's
    symlink there pointed at (and any file already there)."""
    lock = sb.root / "run" / "lock" / f"{NS}.lock"
    victim = sb.tmp / "victim"
    victim.write_text("precious\n")
    lock.symlink_to(victim)
    p = _lock_main(sb)
    assert victim.read_text() == "precious\n", "the lock's symlink was followed and truncated"
    assert p.returncode == 3 and "refusing lock" in p.stderr and "a symlink" in p.stderr, p.stderr
    assert not (sb.tmp / "ran").exists()
    lock.unlink()
    lock.write_text("held by pid 42\n")  # a lock file that exists: opened, not emptied
    p = _lock_main(sb)
    assert p.returncode == 0 and (sb.tmp / "ran").exists(), p.stderr
    assert lock.read_text() == "held by pid 42\n"


def test_leftovers_as_a_user_says_it_cannot_see_the_rules(sb):
    """iptables-save fails for a user: "no rule" was a false clean (exit 0)."""
    virsh_state(sb)
    ours = f"-A POSTROUTING -m comment --comment {NS} -j MASQUERADE"
    sb.update(lambda st: st.update(rules={"nat": [ours], "filter": []}))
    p = sb.leftovers(FAKE_UID="1000")
    assert p.returncode == 3, (p.stdout, p.stderr)
    assert "clean" not in p.stdout
    assert (
        "could not check the firewall rules: only root can read them (running as uid 1000)"
        in p.stderr
    )
    p = sb.leftovers()  # as root: the rule is seen
    assert p.returncode == 1 and f"1 iptables rule(s) commented {NS}" in p.stderr, p.stderr


def test_leftovers_reports_a_killed_image_build_and_a_stale_worktree_record(sb):
    """A killed image build leaves images/.tmp-<key>-<pid>; a --from worktree whose
    directory went without `git worktree remove` leaves git's record (prunable)."""
    repo = sb.tmp / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(LEFTOVERS, repo / "scripts" / "it-leftovers")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    wt = sb.cache / "worktrees" / "askari-4242"
    for args in (["init", "-q"], ["add", "scripts"], ["commit", "-qm", "x"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    subprocess.run(
        [*git, "worktree", "add", "--detach", "-q", str(wt)], check=True, capture_output=True
    )
    shutil.rmtree(wt)  # the run was killed, then its directory removed by hand
    build = sb.cache / "images" / ".tmp-e63478f2ba52edfa-4243"
    build.mkdir(parents=True)
    virsh_state(sb)
    p = subprocess.run(
        [str(repo / "scripts" / "it-leftovers")],
        env=sb.env,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert f"a killed image build's {build}" in p.stderr, p.stderr
    assert f"stale git worktree record {wt} (" in p.stderr, p.stderr
    assert "images/e63" not in p.stderr  # the golden image itself is kept on purpose


def _held_lock(sb, how):
    """Another it-run's hold on the sandbox lock: a process with it flocked `how` (-s/-x)."""
    lock = sb.root / "run" / "lock" / f"{NS}.lock"
    lock.touch()
    holder = subprocess.Popen(["flock", how, str(lock), "sleep", "30"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until the flock is taken
        if subprocess.run(["flock", "-n", "-x", str(lock), "true"]).returncode != 0:
            return holder
        time.sleep(0.05)
    holder.kill()
    raise AssertionError("the holder never took the lock")


def test_a_second_it_run_joins_a_running_sandbox_without_waiting_for_the_first(sb):
    """CI runs the control node's it-run beside askari's: the first holds the lock shared
    for its whole command. The second must join at once when the sandbox is up (it waited
    for an exclusive lock instead, and timed out after 900 s in the rehearsal)."""
    virsh_state(sb)
    sb.update(lambda st: st.update(netns={NS: {"pids": []}}))
    holder = _held_lock(sb, "-s")
    try:
        t0 = time.monotonic()
        p = sb.sh(
            "ns_exists() { :; }; libvirtd_alive() { :; }; sandbox_up() { echo UP >&2; }; "
            "ensure_substrate() { :; }; sandbox_down() { echo SANDBOX-DOWN >&2; }; "
            f"main exec -- touch {sb.tmp / 'ran'}",
            BOMA_IT_TIMEOUT_SANDBOX_LOCK="5",
        )
        assert p.returncode == 0, p.stderr
        assert time.monotonic() - t0 < 4, "it waited for the other run's lock"
        assert (sb.tmp / "ran").exists() and "UP" not in p.stderr
        # ...and leaves the sandbox up for the run still in it
        assert "still in use by another run; leaving it up" in p.stderr, p.stderr
        assert "SANDBOX-DOWN" not in p.stderr
    finally:
        holder.kill()


def test_bringing_the_sandbox_up_waits_for_the_one_bringing_it_up_and_is_bounded(sb):
    """While another it-run holds the lock exclusively (it is bringing the sandbox up or
    down), a newcomer waits, bounded, and names the stage; nothing of it runs."""
    holder = _held_lock(sb, "-x")
    try:
        p = sb.sh(
            "ns_exists() { return 1; }; sandbox_up() { echo UP >&2; }; "
            "ensure_substrate() { :; }; sandbox_down() { :; }; "
            f"main exec -- touch {sb.tmp / 'ran'}",
            BOMA_IT_TIMEOUT_SANDBOX_LOCK="2",
        )
        assert p.returncode == 3, p.stderr
        assert "stage sandbox-lock" in p.stderr and "UP" not in p.stderr
        assert not (sb.tmp / "ran").exists()
    finally:
        holder.kill()
