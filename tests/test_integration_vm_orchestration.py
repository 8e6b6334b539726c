"""Orchestration tests for scripts/integration-vm.py against fake executables.

No hypervisor: every tool the driver runs (virsh, virt-install, qemu-img, cloud-localds,
ssh, ssh-keygen, ansible-playbook, mmdebstrap, mkfs.ext4, qemu-system-x86_64) is
tests/fakes/fakebin.py, symlinked into a temp dir that is the ONLY entry on PATH (so a
real virsh on the machine can never be reached). The driver is copied into a temp repo
so its repo root (from __file__) holds test profiles/playbooks, and every other path is
pointed at temp dirs through BOMA_IT_* variables. TCP 22 is a listening socket on
127.0.0.1 (BOMA_IT_SSH_PORT); the fake lease hands out 127.0.0.1.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
from conftest import run_driver

HERE = pathlib.Path(__file__).resolve().parent
DRIVER = HERE.parent / "scripts" / "integration-vm.py"
FAKEBIN = HERE / "fakes" / "fakebin"  # the launcher of fakebin.py (cached bytecode)
TOOLS = (
    "virsh",
    "virt-install",
    "qemu-img",
    "cloud-localds",
    "ssh",
    "ssh-keygen",
    "ansible-playbook",
    "mmdebstrap",
    "mkfs.ext4",
    "qemu-system-x86_64",
)

ASKARI = {
    "groups": ["offsite_hosts", "docker_hosts"],
    "applies": [
        {"playbook": "site.yml", "tags": ["base"]},
        {"playbook": "offsite.yml", "tags": ["docker_host", "reverse_proxy"]},
    ],
    "extra_vars_files": ["overrides/askari.yml"],
    "mem_mib": 2048,
    "vcpus": 2,
}
BOUNDS = {
    "DOMAIN_RUNNING": 5,
    "DHCP_LEASE": 1.5,
    "TCP_22": 3,
    "SSH_HANDSHAKE": 1.5,
    "CLOUD_INIT": 5,
    "REBOOT": 1.5,
    "SYSTEM_RUNNING": 5,
    "SSH_ATTEMPT": 0.5,
    "SSH_COMMAND": 5,
    "VIRSH": 10,
    "APPLY": 30,
    "VERIFY": 30,
    "DIAG_COMMAND": 1,
    "LOCK": 5,
    "ACCEL_PROBE": 5,
    "IMAGE_BUILD": 30,
    "REBOOT_SETTLE": 0.2,
}


class Harness:
    def __init__(self, tmp):
        self.tmp = tmp
        self.repo = tmp / "repo"
        self.bin = tmp / "bin"
        self.cache = tmp / "cache"
        self.diag = tmp / "diag"
        self.log = tmp / "fake-log.jsonl"
        self.state_file = tmp / "fake-state.json"
        self.run_root = self.repo / "tests" / "integration" / ".run"
        self._make_repo()
        self._make_bin()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        (tmp / "meminfo").write_text("MemTotal: 25165824 kB\nMemAvailable: 16777216 kB\n")
        (tmp / "home").mkdir()
        self.env = {
            "PATH": str(self.bin),
            "HOME": str(tmp / "home"),
            "LANG": "C.UTF-8",
            "BOMA_IT_CACHE": str(self.cache),
            "BOMA_IT_DIAG_DIR": str(self.diag),
            "BOMA_IT_MEMINFO": str(tmp / "meminfo"),
            "BOMA_IT_ACCEL": "tcg",
            "BOMA_IT_SSH_PORT": str(self.sock.getsockname()[1]),
            "BOMA_IT_POLL": "0.1",
            "BOMA_IT_MIN_DISK_MIB": "1",
            "BOMA_IT_LIBVIRT_LOG_DIR": str(tmp / "libvirt-log"),
            "BOMA_IT_KVM_DEV": str(tmp / "no-kvm"),
            "LIBVIRT_DEFAULT_URI": "test:///fake",
            "FAKE_LOG": str(self.log),
            "FAKE_STATE": str(self.state_file),
            # BOMA_IT_POLL: the fakes answer at once, so only a wait that must time out
            # polls more than once; each poll is a ~15 ms fake process, at 0.02 s the
            # failure-path tests spent most of their bound spawning them.
            # Checkpoints have their own tests (test_integration_vm_checkpoints.py); here
            # every cycle boots cold so the call sequences stay what these tests assert.
            "BOMA_IT_CHECKPOINTS": "0",
        }
        self.env.update({f"BOMA_IT_TIMEOUT_{k}": str(v) for k, v in BOUNDS.items()})

    def _make_repo(self):
        r = self.repo
        (r / "scripts").mkdir(parents=True)
        shutil.copy(DRIVER, r / "scripts" / "integration-vm.py")
        integ = r / "tests" / "integration"
        for d in ("profiles", "overrides", "certs"):
            (integ / d).mkdir(parents=True)
        (integ / "profiles" / "askari.json").write_text(json.dumps(ASKARI, indent=1))
        (integ / "profiles" / "askari-regression.json").write_text(
            json.dumps(
                {"extends": "askari", "extra_vars_files": ["overrides/askari-regression.yml"]}
            )
        )
        for f in ("askari.yml", "askari-regression.yml"):
            (integ / "overrides" / f).write_text("---\nbase__firewall_apply: true\n")
        for t in ("internal", "le-staging", "le-prod-wildcard"):
            (integ / "certs" / f"{t}.yml").write_text("---\nreverse_proxy__tls_internal: true\n")
        (integ / "verify.yml").write_text("---\n- hosts: all\n  tasks: []\n")
        # the golden image's package lists (ADR-028)
        shutil.copytree(DRIVER.parent.parent / "tests" / "integration" / "image", integ / "image")
        (r / "tests" / "vault").mkdir()
        (r / "tests" / "vault" / "test-values.yml").write_text("---\nvault: {}\n")
        (r / "playbooks").mkdir()
        for pb in ("site.yml", "offsite.yml"):
            (r / "playbooks" / pb).write_text("---\n- hosts: all\n  tasks: []\n")
        gv = r / "inventories" / "production" / "group_vars"
        for g in ("all", "offsite_hosts"):
            (gv / g).mkdir(parents=True)
            (gv / g / "vars.yml").write_text(f"---\n{g}_var: 1\n")
        (gv / "all" / "vault.yml").write_text("$ANSIBLE_VAULT;1.2;AES256;prod\n3132\n")
        (r / "inventories" / "production" / "offsite.yml").write_text(
            "offsite_hosts:\n  hosts:\n    askari:\n      ansible_host: 77.42.120.136\n"
        )
        (r / "ansible.cfg").write_text("[defaults]\n")

    def _make_bin(self):
        self.bin.mkdir()
        for t in TOOLS:
            (self.bin / t).symlink_to(FAKEBIN)
        (self.bin / "python3").symlink_to(sys.executable)

    @property
    def script(self):
        return self.repo / "scripts" / "integration-vm.py"

    def cmd(self, *args):
        return [sys.executable, str(self.script), *args]

    def run(self, *args, timeout=60, in_process=True, **env):
        """The driver on args: in-process (tests/conftest.py run_driver) unless the test
        is about the driver's own process."""
        if in_process:
            return run_driver(self.script, args, {**self.env, **env}, self.tmp, timeout)
        return subprocess.run(
            self.cmd(*args),
            env={**self.env, **env},
            text=True,
            capture_output=True,
            timeout=timeout,
            cwd=self.tmp,
        )

    def popen(self, *args, **env):
        return subprocess.Popen(
            self.cmd(*args),
            env={**self.env, **env},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.tmp,
        )

    def calls(self, tool=None):
        if not self.log.exists():
            return []
        recs = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [r for r in recs if tool is None or r["tool"] == tool]

    def virsh_cmds(self):
        out = []
        for c in self.calls("virsh"):
            a = c["argv"]
            assert a[:2] == ["--connect", "test:///fake"], a
            out.append(a[2:])
        return out

    def state(self):
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def domains(self):
        return self.state().get("domains", {})

    def results(self):
        return [json.loads(p.read_text()) for p in sorted(self.run_root.glob("*/result.json"))]

    def seed_foreign_domain(self, name, state="running"):
        st = self.state() or {"domains": {}, "networks": {}, "leases": {}, "calls": {}}
        st.setdefault("domains", {})[name] = {
            "xml": f"<domain><name>{name}</name></domain>",
            "state": state,
            "metadata": None,
            "mac": None,
            "boot_id": "x",
            "console": None,
        }
        self.state_file.write_text(json.dumps(st))

    def close(self):
        self.sock.close()


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def assert_one_line_error(proc):
    assert "Traceback" not in proc.stderr, proc.stderr
    errs = [ln for ln in proc.stderr.splitlines() if ln.startswith("integration-vm: error:")]
    assert len(errs) == 1, proc.stderr
    return errs[0]


def assert_nothing_created(h):
    virsh = h.virsh_cmds()
    assert not any(a[0] in ("define", "start", "net-define") for a in virsh), virsh
    assert not h.calls("qemu-img") and not h.calls("virt-install") and not h.calls("mmdebstrap")
    assert not (h.cache / "runs").exists() or not any((h.cache / "runs").iterdir())
    assert not h.run_root.exists() or not any(h.run_root.iterdir())


# ---- a passing cycle ------------------------------------------------------------------
def test_passing_cycle(h):
    # a real `python3 scripts/integration-vm.py` (its entry point, exit status and output
    # streams); most other tests run the driver in-process
    p = h.run("cycle", "--host", "askari", "--junit", str(h.tmp / "junit.xml"), in_process=False)
    assert p.returncode == 0, p.stderr
    summary = p.stdout.strip().splitlines()[-1]
    assert summary.startswith("integration-vm: PASS askari boma-it-askari-"), summary
    assert "accel=tcg" in summary and "boot " in summary and "verify " in summary
    # order of the important calls
    seq = [
        c["tool"]
        + ":"
        + (
            c["argv"][2]
            if c["tool"] == "virsh"
            else c.get("playbook", "").rsplit("/", 1)[-1] or c["argv"][0]
        )
        for c in h.calls()
    ]
    keys = [
        "mmdebstrap:--variant=minbase",
        "virsh:net-define",
        "qemu-img:create",
        "cloud-localds",
        "virsh:define",
        "virsh:start",
        "virsh:domifaddr",
        "ansible-playbook:site.yml",
        "ansible-playbook:offsite.yml",
        "virsh:reboot",
        "ansible-playbook:verify.yml",
        "virsh:undefine",
    ]
    pos, idx = -1, []
    for k in keys:
        hits = [i for i, s in enumerate(seq) if s.startswith(k) and i > pos]
        assert hits, f"{k} missing after position {pos}: {seq}"
        pos = hits[0]
        idx.append(pos)
    # teardown happened, disks gone, run dir kept with result
    assert h.domains() == {}
    assert not any((h.cache / "runs").iterdir())
    (res,) = h.results()
    assert res["verdict"] == "pass" and res["exit_code"] == 0 and res["failed_stage"] is None
    assert set(res["phases"]) >= {
        "image",
        "boot",
        "apply",
        "reboot",
        "verify",
        "idempotence",
        "teardown",
    }
    assert res["phases"]["reboot"] >= 0 and res["accel"] == "tcg" and res["ip"] == "127.0.0.1"
    assert res["idempotence"]["changed"] == 0
    diag_copy = json.loads((h.diag / res["vm"] / "result.json").read_text())
    assert diag_copy["verdict"] == "pass"
    run_json = json.loads((h.run_root / res["vm"] / "run.json").read_text())
    assert run_json["state"] == "down" and len(run_json["boot_ids"]) == 2
    assert run_json["boot_ids"][0] != run_json["boot_ids"][1]
    # current points at the run (spec format)
    name, ip, host = (h.run_root / "current").read_text().splitlines()
    assert (name, ip, host) == (res["vm"], "127.0.0.1", "askari")
    # the reboot changed nothing that matters: new handles, counters, pids, kernel-picked
    # ports and Docker's re-created rule order (the fake's reboot noise) normalise away
    (diff,) = res["reboot_diffs"]
    assert diff["mode"] == "graceful" and diff["index"] == 1 and diff["changed"] is False
    assert diff["unexpected"] == [] and diff["tolerated"] == [] and not diff["recaptured"]
    assert set(diff["capture_seconds"]) == {"before", "after"}
    assert all(isinstance(v, float) for v in diff["capture_seconds"].values())
    assert set(diff["categories"]) == {"nft", "ports", "sockets", "failed_units", "services"}
    assert all(c == {"added": 0, "removed": 0} for c in diff["categories"].values())
    # ... and a PASSING run keeps its before/after/diff in its diagnostics dir
    rd = h.diag / res["vm"] / "reboot-1-graceful"
    assert diff["dir"] == str(rd) and diff["diff"] == str(rd / "diff.txt")
    assert "no differences" in (rd / "diff.txt").read_text()
    # where the boot's time went: systemd-analyze's figures beside the capture, summary here
    assert diff["boot"]["startup"] == {"kernel": 3.871, "userspace": 62.13, "total": 66.001}
    assert diff["boot"]["blame_top"][0] == [30.811, "docker.service"]
    analysis = (rd / "after" / "boot-analysis.txt").read_text()
    assert "$ systemd-analyze critical-chain" in analysis and "docker.service @31.2s" in analysis
    for side in ("before", "after"):
        for f in (
            "nft-ruleset.txt",
            "nft.json",
            "ports.json",
            "sockets.json",
            "failed_units.json",
            "services.json",
            "capture-raw.txt",
        ):
            assert (rd / side / f).is_file(), (side, f)
        assert "chain forward" in (rd / side / "nft-ruleset.txt").read_text()
        nft = json.loads((rd / side / "nft.json").read_text())
        assert "rule inet filter forward: meta iifname docker0 accept" in nft
        for cat in ("nft", "ports", "sockets", "services"):
            lines = json.loads((rd / side / f"{cat}.json").read_text())
            assert lines and not [ln for ln in lines if ln.startswith("!")], (side, cat, lines)
    assert json.loads((rd / "before" / "sockets.json").read_text()) == json.loads(
        (rd / "after" / "sockets.json").read_text()
    )
    assert "handle" in (rd / "after" / "capture-raw.txt").read_text()  # raw kept as it came
    # one SSH round trip per capture, all under one sudo
    captures = [c for c in h.calls("ssh") if c["argv"][-1] == "sudo -n sh -s"]
    assert len(captures) == 2
    assert run_json["reboots"][0]["diff"] == {"changed": False, "unexpected": 0, "dir": str(rd)}
    # JUnit parses: one case per phase (reboot and its diff included) and per verify check
    root = ET.parse(h.tmp / "junit.xml").getroot()
    names = [tc.get("name") for tc in root.iter("testcase")]
    assert "boot" in names and "verify" in names and any(n.startswith("verify: ") for n in names)
    assert names.index("reboot:graceful") + 1 == names.index("reboot-diff:graceful")
    assert {
        "verify: docker enabled and active",
        "verify: published :443 answers from the controller",
    } <= set(names)
    assert not [tc for tc in root.iter("testcase") if len(tc)]  # nothing failed


def test_cycle_safety_invariants(h):
    p = h.run("cycle", "--host", "askari")
    assert p.returncode == 0, p.stderr
    everything = json.dumps(h.calls())
    assert "StrictHostKeyChecking=no" not in everything
    assert "UserKnownHostsFile=/dev/null" not in everything
    for c in h.calls("ssh"):
        assert "StrictHostKeyChecking=yes" in c["argv"]
        assert any(
            a.startswith("UserKnownHostsFile=") and a.endswith("/known_hosts") for a in c["argv"]
        )
    pbs = h.calls("ansible-playbook")
    assert len(pbs) == 5  # site, offsite, verify, site + offsite again (idempotence)
    vm = pbs[0]["limit"]
    assert vm.startswith("boma-it-askari-")
    for c in pbs:
        a = c["argv"]
        assert a[a.index("--limit") + 1] == vm
        groups = json.loads(c["inventory"])["all"]["children"]
        assert [list(g["hosts"]) for g in groups.values()] == [[vm], [vm]]  # one per group
        assert "77.42.120.136" not in c["inventory"]
        assert a[a.index("-i") + 1].endswith("/inventory/hosts.json")
        assert "StrictHostKeyChecking=yes" in c["env"]["ANSIBLE_SSH_ARGS"]
        assert c["env"]["ANSIBLE_HOST_KEY_CHECKING"] == "True"
        assert c["env"]["ANSIBLE_CONFIG"].endswith("/ansible.cfg")
        assert c["env"]["ANSIBLE_CACHE_PLUGIN_CONNECTION"].endswith("/facts")
        extra = [a[i + 1] for i, x in enumerate(a) if x == "-e"]
        assert [pathlib.Path(e).name for e in extra] == [
            "askari.yml",
            "internal.yml",
            "test-values.yml",
        ]
    # group_vars symlinked, production vault excluded; real inventory untouched
    gv = h.run_root / vm / "inventory" / "group_vars"
    assert (gv / "all" / "vars.yml").is_symlink()
    assert (gv / "offsite_hosts" / "vars.yml").is_symlink()
    assert not (gv / "all" / "vault.yml").exists()
    assert "askari" in (h.repo / "inventories" / "production" / "offsite.yml").read_text()
    # the domain carried ownership metadata from the moment it was defined
    define = [c for c in h.calls("virsh") if c["argv"][2] == "define"][0]
    assert "boma:run" in pathlib.Path(define["argv"][3]).read_text()
    # the guest got the pinned host key through cloud-init
    ud = (h.run_root / vm / "user-data").read_text()
    pub = (h.run_root / vm / "ssh_host_ed25519_key.pub").read_text().split()[1]
    assert "ssh_keys:" in ud and pub in ud and "ssh_genkeytypes: [ed25519]" in ud
    assert (h.run_root / vm / "known_hosts").read_text().startswith(f"{vm} ssh-ed25519 {pub}")
    # virt-install got the seed as a virtio disk, boots the disk's own GRUB, TCG
    vi = [c["argv"] for c in h.calls("virt-install") if "--print-xml" in c["argv"]][0]
    assert any(a.endswith("seed.img,format=raw,bus=virtio,readonly=on") for a in vi)
    assert vi[vi.index("--virt-type") + 1] == "qemu"
    assert vi[vi.index("--osinfo") + 1] == "debian13"
    assert "--boot" not in vi and not any(a.startswith("kernel=") for a in vi)


def test_second_cycle_reuses_cached_image(h):
    assert h.run("cycle", "--host", "askari").returncode == 0
    assert len(h.calls("mmdebstrap")) == 1
    p = h.run("cycle", "--host", "askari")
    assert p.returncode == 0, p.stderr
    assert len(h.calls("mmdebstrap")) == 1
    assert len(list((h.cache / "images").iterdir())) == 1  # one key dir, no leftovers
    assert not list((h.cache / "images").glob(".tmp-*"))


# ---- verify failure -------------------------------------------------------------------
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


def test_expect_fail_turns_verify_failure_into_success_and_tears_down(h):
    p = h.run("cycle", "--host", "askari-regression", "--expect-fail", FAKE_VERIFY_FAIL="1")
    assert p.returncode == 0, p.stderr
    assert h.domains() == {}
    p2 = h.run("cycle", "--host", "askari-regression", "--expect-fail")
    assert p2.returncode == 1


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
    assert len(h.calls("ansible-playbook")) == 3


# ---- what the reboot changed (issue 5) -------------------------------------------------
def _profile(h, name, **extra):
    (h.repo / "tests" / "integration" / "profiles" / f"{name}.json").write_text(
        json.dumps({**ASKARI, **extra})
    )


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
    verdict = [ln for ln in p.stderr.splitlines() if ln.startswith("integration-vm: verify failed")]
    assert (
        len(verdict) == 1 and "12 unexpected difference(s) across the graceful reboot" in verdict[0]
    )
    assert not [c for c in h.calls("ansible-playbook") if c["playbook"].endswith("verify.yml")]
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


def test_profile_reboot_list_runs_graceful_then_hard_with_a_diff_each(h):
    _profile(h, "askari", reboot=["graceful", "hard"])
    p = h.run("cycle", "--host", "askari", "--no-idempotence", "--junit", str(h.tmp / "j.xml"))
    assert p.returncode == 0, p.stderr
    cmds = [a[0] for a in h.virsh_cmds()]
    i = cmds.index("reboot")
    j = cmds.index("destroy", i)
    assert cmds.index("start", j) > j > i  # graceful first, then the power cut
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


# ---- infrastructure failures ------------------------------------------------------------
def test_lease_never_comes(h):
    t0 = time.monotonic()
    p = h.run("cycle", "--host", "askari", FAKE_NO_LEASE="1")
    elapsed = time.monotonic() - t0
    assert p.returncode == 3, p.stderr
    line = assert_one_line_error(p)
    assert "dhcp-lease" in line and "timed out after 2s" in line, line  # the 1.5 s bound
    assert "console log:" in line
    (res,) = h.results()
    # The wait ends at its bound, not 12 s later: the boot phase (define, start, the lease
    # wait) and the whole run stay within the bound plus the fakes' start-up costs.
    assert res["phases"]["boot"] < BOUNDS["DHCP_LEASE"] + 5, res["phases"]
    assert elapsed < BOUNDS["DHCP_LEASE"] + 10
    assert res["verdict"] == "error" and res["failed_stage"] == "dhcp-lease"
    vm = res["vm"]
    # infra error: diagnostics (host side + NOTE), then teardown of what this run created
    diag = h.diag / vm
    assert "could not be collected" in (diag / "NOTE").read_text()
    assert (diag / "domain.xml").is_file() and (diag / "SUMMARY.txt").is_file()
    assert h.domains() == {}
    assert not (h.cache / "runs" / vm).exists()
    assert not h.calls("ansible-playbook")


@pytest.mark.parametrize("mode", ["refuse", "hang"])
def test_ssh_never_answers(h, mode):
    t0 = time.monotonic()
    p = h.run("up", "--host", "askari", FAKE_SSH=mode)
    assert p.returncode == 3, p.stderr
    line = assert_one_line_error(p)
    assert "ssh-handshake" in line and "timed out after 2s" in line, line
    assert time.monotonic() - t0 < BOUNDS["SSH_HANDSHAKE"] + BOUNDS["SSH_ATTEMPT"] + 8
    assert h.domains() == {}
    notes = list(h.diag.glob("*/NOTE"))
    assert notes and "SSH" in notes[0].read_text()


def test_reboot_with_unchanged_boot_id_is_an_infra_error(h):
    p = h.run("cycle", "--host", "askari", FAKE_BOOT_ID_STICKY="1")
    assert p.returncode == 3, p.stderr
    line = assert_one_line_error(p)
    assert line.startswith("integration-vm: error: reboot:") and "boot_id" in line, line
    (res,) = h.results()
    assert res["failed_stage"] == "reboot"
    assert h.domains() == {}


def test_hard_reboot_is_destroy_plus_start(h):
    # --reboot MODE replaces the profile's list
    (h.repo / "tests" / "integration" / "profiles" / "askari.json").write_text(
        json.dumps({**ASKARI, "reboot": ["graceful", "hard"]})
    )
    p = h.run("cycle", "--host", "askari", "--reboot", "hard", "--no-idempotence")
    assert p.returncode == 0, p.stderr
    cmds = [a[0] for a in h.virsh_cmds()]
    i = cmds.index("define")
    assert cmds[i:].count("start") == 2 and "reboot" not in cmds
    j = cmds.index("destroy", i)
    assert cmds.index("start", j) > j
    (res,) = h.results()
    assert res["reboot_modes"] == ["hard"] and "reboot" in res["phases"]
    assert [(d["mode"], d["changed"]) for d in res["reboot_diffs"]] == [("hard", False)]


def test_apply_failure_is_a_verdict_and_keeps_the_vm(h):
    p = h.run("cycle", "--host", "askari", FAKE_APPLY_FAIL="1")
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    (res,) = h.results()
    assert res["verdict"] == "fail" and res["failed_stage"] == "apply:site.yml"
    assert res["failures"] == ["base : Load nftables"] and res["kept"]
    assert len(h.domains()) == 1 and (h.diag / res["vm"] / "logs" / "apply-site.yml.log").is_file()


def _fetch_env(h, payload, sums):
    src = h.tmp / "mirror"
    src.mkdir(exist_ok=True)
    (src / "debian-13-genericcloud-amd64.qcow2").write_bytes(payload)
    (src / "SHA512SUMS").write_text(sums)
    return {
        "BOMA_IT_IMAGE_SOURCE": "fetch",
        "BOMA_IT_IMAGE_URL": (src / "debian-13-genericcloud-amd64.qcow2").as_uri(),
        "BOMA_IT_SHA_URL": (src / "SHA512SUMS").as_uri(),
    }


def test_fetch_source_verifies_sha512(h):
    import hashlib

    payload = b"qcow2 bytes"
    good = hashlib.sha512(payload).hexdigest() + "  debian-13-genericcloud-amd64.qcow2\n"
    p = h.run("image", **_fetch_env(h, payload, good))
    assert p.returncode == 0, p.stderr
    (img,) = [d for d in (h.cache / "images").iterdir() if d.is_dir()]
    assert (img / "disk.qcow2").read_bytes() == payload and not list(img.glob("*.part"))
    assert not h.calls()  # the fetch source runs no tools


def test_fetch_source_refuses_a_mismatch_and_deletes_it(h):
    bad = "00" * 64 + "  debian-13-genericcloud-amd64.qcow2\n"
    p = h.run("image", **_fetch_env(h, b"tampered", bad))
    assert p.returncode == 3
    assert "SHA512 mismatch" in assert_one_line_error(p)
    assert not [d for d in (h.cache / "images").rglob("*") if d.is_file()]
    missing = h.run("image", **_fetch_env(h, b"x", "abc  other-file.qcow2\n"))
    assert missing.returncode == 3 and "checksum for debian-13" in missing.stderr


def test_keep_on_infra_error_keeps_the_vm(h):
    p = h.run("cycle", "--host", "askari", "--keep", FAKE_BOOT_ID_STICKY="1")
    assert p.returncode == 3
    assert len(h.domains()) == 1


# ---- interrupts ---------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_apply_tears_down(h, sig):
    proc = h.popen("cycle", "--host", "askari", FAKE_APPLY_SLEEP="60")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not h.calls("ansible-playbook"):
        time.sleep(0.05)
    assert h.calls("ansible-playbook"), "apply never started"
    time.sleep(0.3)
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


# ---- prune / down / status -----------------------------------------------------------
def test_prune_touches_only_harness_domains(h):
    assert h.run("up", "--host", "askari").returncode == 0
    h.seed_foreign_domain("boma-it-foo")
    h.seed_foreign_domain("somebody-elses-vm")
    st = h.run("status")
    assert st.returncode == 0 and "boma-it-askari-" in st.stdout and "boma-it-foo" not in st.stdout
    n = len(h.virsh_cmds())
    p = h.run("prune")
    assert p.returncode == 0, p.stderr
    assert set(h.domains()) == {"boma-it-foo", "somebody-elses-vm"}
    assert "skipping boma-it-foo" in p.stdout
    # prune itself leaves a foreign domain alone: one ownership probe, never handed to
    # destroy_domain (whose own metadata check must not be the only guard)
    for foreign in ("boma-it-foo", "somebody-elses-vm"):
        assert [a[0] for a in h.virsh_cmds()[n:] if a[1:2] == [foreign]] == ["metadata"], foreign
    assert "not touching" not in p.stderr
    assert not h.run_root.exists() or not any(h.run_root.iterdir())
    assert not any((h.cache / "runs").iterdir())
    assert not any(
        a[0] in ("destroy", "undefine") and a[1] in ("boma-it-foo", "somebody-elses-vm")
        for a in h.virsh_cmds()
    )
    assert h.run("prune").returncode == 0  # idempotent


def test_a_run_defines_no_storage_pool(h):
    """Issue 12, class 9: virt-install defines an autostarted pool for a disk directory no
    pool holds (the fake does as virtinst 4.1 does); the run lends it a transient one."""
    assert h.run("up", "--host", "askari").returncode == 0
    assert h.state().get("pools", {}) == {}
    creates = [a for a in h.virsh_cmds() if a[0] == "pool-create-as"]
    assert len(creates) == 1 and creates[0][1].startswith("boma-it-askari-")
    assert creates[0][creates[0].index("--target") + 1].startswith(str(h.cache / "runs"))
    assert h.run("down").returncode == 0
    assert h.state().get("pools", {}) == {}


def test_prune_removes_the_pools_earlier_versions_left(h):
    outside = h.tmp / "vm-images"
    outside.mkdir()
    st = {
        "domains": {},
        "networks": {},
        "leases": {},
        "calls": {},
        "pools": {
            # what every run of an earlier version left: persistent, autostarted, dir gone
            "boma-it-askari-0a1b2c3d": {
                "target": str(h.cache / "runs" / "boma-it-askari-0a1b2c3d"),
                "active": True,
                "persistent": True,
                "autostart": True,
            },
            "boma-it-askari-4e5f6a7b": {
                "target": "/var/lib/boma-old-cache/runs/boma-it-askari-4e5f",
                "active": False,
                "persistent": True,
                "autostart": True,
            },
            "runs": {
                "target": str(h.cache / "runs"),
                "active": True,
                "persistent": True,
                "autostart": True,
            },
            # not ours: a live directory elsewhere, whatever its name
            "boma-it-mine": {
                "target": str(outside),
                "active": True,
                "persistent": True,
                "autostart": True,
            },
            "default": {
                "target": "/var/lib/libvirt/images",
                "active": False,
                "persistent": True,
                "autostart": True,
            },
        },
    }
    h.state_file.write_text(json.dumps(st))
    status = h.run("status")
    assert status.returncode == 0, status.stderr
    listed = {
        ln.split()[2].rstrip(":")
        for ln in status.stdout.splitlines()
        if ln.startswith("storage pool ")
    }
    assert listed == {"boma-it-askari-0a1b2c3d", "boma-it-askari-4e5f6a7b", "runs"}
    p = h.run("prune")
    assert p.returncode == 0, p.stderr
    assert set(h.state()["pools"]) == {"boma-it-mine", "default"}
    assert p.stdout.count("pruned storage pool") == 3
    assert not any(
        a[0].startswith("pool-")
        and a[0] != "pool-list"
        and a[0] != "pool-dumpxml"
        and a[1] in ("boma-it-mine", "default")
        for a in h.virsh_cmds()
    )
    assert h.run("prune").returncode == 0  # idempotent


def test_down_refuses_foreign_domain_and_is_idempotent(h):
    h.seed_foreign_domain("boma-it-foo")
    p = h.run("down", "--run", "boma-it-foo")
    assert p.returncode == 0
    assert "boma-it-foo" in h.domains()
    assert "no boma metadata" in p.stderr
    assert h.run("up", "--host", "askari").returncode == 0
    assert h.run("down", "--host", "askari").returncode == 0
    assert h.run("down", "--host", "askari").returncode == 0
    assert set(h.domains()) == {"boma-it-foo"}


def test_step_by_step_subcommands(h):
    up = h.run("up", "--host", "askari")
    assert up.returncode == 0, up.stderr
    name, ip = up.stdout.strip().splitlines()[0].split()
    assert ip == "127.0.0.1"
    assert h.run("apply", "--host", "askari").returncode == 0
    assert h.run("reboot", "--run", name).returncode == 0
    a = h.run("assert")
    assert a.returncode == 0, a.stderr
    assert h.results()[0]["command"] == "assert"
    c = h.run("console", "--host", "askari")
    assert "console log:" in c.stdout and "Linux version" in c.stdout
    assert h.run("down").returncode == 0
    again = h.run("apply", "--host", "askari")
    assert again.returncode == 2 and "no run found" in again.stderr


def test_second_up_is_refused_while_one_runs(h):
    assert h.run("up", "--host", "askari").returncode == 0
    p = h.run("up", "--host", "askari-regression")
    assert p.returncode == 3
    line = assert_one_line_error(p)
    assert "already running" in line and "BOMA_IT_MAX_VMS=1" in line
    assert len(h.domains()) == 1


def test_two_concurrent_ups_do_not_race(h):
    procs = [h.popen("up", "--host", "askari", FAKE_DEFINE_SLEEP="1") for _ in range(2)]
    rcs = sorted(p.wait(timeout=60) for p in procs)
    assert rcs == [0, 3], [p.stderr.read() for p in procs]
    assert len(h.domains()) == 1


def test_max_vms_allows_two(h):
    assert h.run("up", "--host", "askari", BOMA_IT_MAX_VMS="2").returncode == 0
    assert h.run("up", "--host", "askari", BOMA_IT_MAX_VMS="2").returncode == 0
    assert len(h.domains()) == 2
    ambiguous = h.run("down")
    assert ambiguous.returncode == 0  # same host: newest run
    assert len(h.domains()) == 1


# ---- bad input: exit 2/3, one line, nothing created -----------------------------------
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
        "verify failed",
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
        assert sub in p.stdout
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


# ---- image / accel / doctor / bench ------------------------------------------------------
def test_image_build_seals_and_is_keyed(h):
    p = h.run("image")
    assert p.returncode == 0, p.stderr
    (img,) = [d for d in (h.cache / "images").iterdir() if d.is_dir()]
    assert {f.name for f in img.iterdir()} == {
        "disk.qcow2",
        "vmlinuz",
        "initrd.img",
        "manifest.json",
        "build.log",
    }
    m = json.loads((img / "manifest.json").read_text())
    assert m["key"] == img.name and "docker.io" not in m["inputs"]["packages"]
    mk = h.calls("mmdebstrap")[0]["argv"]
    assert mk[-3:-1] == ["trixie", mk[-2]] and mk[-1] == "http://deb.debian.org/debian"
    again = h.run("image")
    assert "cached" in again.stdout and len(h.calls("mmdebstrap")) == 1
    other = h.run("image", BOMA_IT_MIRROR="http://mirror.invalid/debian")
    assert other.returncode == 0 and len(h.calls("mmdebstrap")) == 2
    assert len([d for d in (h.cache / "images").iterdir() if d.is_dir()]) == 2


def test_accel_auto_probes_once_and_caches(h):
    kvm = h.tmp / "kvm"
    kvm.write_text("")
    os.chmod(kvm, 0o666)
    env = {
        "BOMA_IT_ACCEL": "auto",
        "BOMA_IT_KVM_DEV": str(kvm),
        "BOMA_IT_BOOT_ID_PATH": str(h.tmp / "host-boot-id"),
    }
    (h.tmp / "host-boot-id").write_text("b1\n")
    p = h.run("up", "--host", "askari", **env)
    assert p.returncode == 0, p.stderr
    assert "accel: kvm (KVM probe booted a kernel" in p.stderr
    vi = [c["argv"] for c in h.calls("virt-install") if "--print-xml" in c["argv"]][0]
    assert vi[vi.index("--virt-type") + 1] == "kvm"
    assert h.run("down").returncode == 0
    p2 = h.run("up", "--host", "askari", **env, FAKE_ACCEL_OUTPUT="KVM internal error. Suberror: 1")
    assert "[cached]" in p2.stderr and len(h.calls("qemu-system-x86_64")) == 1
    assert h.run("down").returncode == 0
    (h.tmp / "host-boot-id").write_text("b2\n")  # host rebooted: probe again
    p3 = h.run("up", "--host", "askari", **env, FAKE_ACCEL_OUTPUT="KVM internal error. Suberror: 1")
    assert "accel: tcg (KVM probe failed: 'KVM internal error')" in p3.stderr
    assert len(h.calls("qemu-system-x86_64")) == 2


def test_accel_auto_without_dev_kvm_is_tcg_unprobed(h):
    p = h.run("up", "--host", "askari", BOMA_IT_ACCEL="auto")
    assert p.returncode == 0, p.stderr
    assert "absent; not probed" in p.stderr and not h.calls("qemu-system-x86_64")


def test_doctor(h):
    p = h.run("doctor")
    assert p.returncode == 0, p.stdout
    lines = p.stdout.splitlines()
    assert all(ln.startswith(("OK  ", "FAIL")) for ln in lines), lines
    assert any("libvirtd: reachable at test:///fake" in ln for ln in lines)
    assert any(ln.startswith("OK   /dev/kvm") and "absent" in ln for ln in lines)
    kvm = h.tmp / "kvm"
    kvm.write_text("")
    os.chmod(kvm, 0o600)
    (h.tmp / "meminfo").write_text("MemAvailable: 1048576 kB\n")
    bad = h.run("doctor", FAKE_LIBVIRT_DOWN="1", BOMA_IT_KVM_DEV=str(kvm))
    assert bad.returncode == 3
    failing = [ln for ln in bad.stdout.splitlines() if ln.startswith("FAIL")]
    assert [f.split()[1].rstrip(":") for f in failing] == ["libvirtd", "/dev/kvm", "RAM"], failing
    assert all("fix:" in ln for ln in failing), failing
    assert "cannot open it" in failing[1]


def test_bench_prints_table(h):
    p = h.run("bench", "--host", "askari")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "phase" in out and "apply:site.yml" in out and "reboot:graceful" in out
    assert out.strip().splitlines()[-1].startswith("total")
    # Cold (forced rebuild) and warm (cache hit) image, and boot-to-stage figures.
    names = [ln.split()[0] for ln in out.splitlines()[1:] if ln.strip()]
    assert names.index("image:cold") < names.index("image") < names.index("boot")
    for stage in ("dhcp-lease", "tcp-22", "ssh-handshake", "cloud-init"):
        assert f"boot to {stage}" in out
    assert "reboot to ssh" in out and "reboot to system-running" in out


def test_a_guest_without_boot_figures_still_passes_and_says_so(h):
    assert h.run("cycle", "--host", "askari", FAKE_NO_ANALYZE="1").returncode == 0
    (res,) = h.results()
    (diff,) = res["reboot_diffs"]
    assert diff["boot"]["startup"] is None and diff["unexpected"] == []
    rd = h.diag / res["vm"] / "reboot-1-graceful" / "after" / "boot-analysis.txt"
    assert "$ systemd-analyze time\n(not available)" in rd.read_text()
