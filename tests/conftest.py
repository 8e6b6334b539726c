"""Shared test plumbing: load a script under scripts/ as a module once per session, run
the integration-vm driver in-process, and the fake harness the driver's tests run against
(Harness, the `h` and `hc` fixtures, and the helpers the modules under tests/driver/ share).

The driver's tests live in tests/driver/, one module per section of the driver
(test_processes.py ... test_cli.py). They import what they share from here
(`from conftest import ivm, Harness, ...`): this is the only conftest.py, so `conftest`
names one module whichever directory pytest collects first.

What run_driver saves is the driver's own interpreter start and its 7,000-line compile
(~0.1 s per call, 261 calls). The fake tools stay real child processes either way; in an
in-process run they are forked by a small fork server and handed to this process as its
children instead of exec'd (_ForkedFakesPopen, _ForkServer: 6,632 calls, most of the
suite's time; test_fakes.py shows the driver cannot tell the difference;
BOMA_TEST_EXEC_FAKES=1 execs them). Tests whose subject IS the driver's process (signals,
process groups, two concurrent runs) start it as a subprocess (Harness.popen /
Harness.run(in_process=False)), and its fakes are exec'd.

Measured for issue 26 (the whole unit suite, -n 4 on 2 cores shared with other jobs, CPU
seconds user+sys, 2-3 runs each): fakes forked 76-97, exec'd 166-183. A patch of
dataclasses that compiled @dataclass's generated source once per worker saved ~10 ms of
each driver run's module exec (16 -> 5 ms), ~2.6 CPU-s a suite, inside the runs' spread
(76-97 with it, 81-90 without): it was removed.
"""

import atexit
import contextlib
import functools
import importlib.util
import inspect
import io
import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parent.parent / "scripts"


@functools.cache
def load_script(filename, module_name):
    """scripts/<filename> as a module (imported once per session and shared)."""
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / filename)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def _compiled(source, filename):
    return compile(source, filename, "exec")


# ---- the fake tools, forked instead of exec'd ----------------------------------------------
# A driver run in this process starts its tools through subprocess.Popen; each fake is a
# Python start (~7 ms) plus its work, and the suite makes ~6,000 such calls: most of its
# time. So while run_driver runs, a Popen whose executable is the fake launcher asks a
# small fork server (tests/fakes/forkserver.py: fakebin.py already imported) for a forked
# fake instead of exec'ing an interpreter; the server clones it as this process's child
# (CLONE_PARENT), so it is the driver's own child. Forking from here instead would copy
# this ~80 MB worker's page tables per call (what the suite's system time went to).
# Everything the driver's process code sees stays real: a child in its own session, pipes,
# exit codes, timeouts that kill the group, signals to the pid. What is skipped is the
# exec and the interpreter's start. Every other executable (and every fake when
# BOMA_TEST_EXEC_FAKES=1) is exec'd as before.
EXEC_FAKES = os.environ.get("BOMA_TEST_EXEC_FAKES") == "1"


@functools.cache
def _python3_answering_the_mitogen_probe():
    """The fake bin's `python3` (the interpreter of the fake ansible-playbook's #! line):
    sh that answers the driver's Mitogen probe with what the real probe printed once in
    this worker, and execs this venv's Python for anything else. Each of ~110 driver runs a
    suite exec'd an interpreter for the probe (~35 ms of CPU; it failed there, since a
    symlinked venv interpreter is not the venv). test_ansible.py runs the real probe.
    FAKE_NO_MITOGEN=1: the probe fails as it does where Mitogen is not installed."""
    real = subprocess.run(
        [sys.executable, "-c", ivm.Ansible.MITOGEN_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    q = shlex.quote
    return (
        "#!/bin/sh\n"
        f'if [ "$#" = 2 ] && [ "$1" = -c ] && [ "$2" = {q(ivm.Ansible.MITOGEN_PROBE)} ]; then\n'
        '  [ "$FAKE_NO_MITOGEN" = 1 ] && {\n'
        "    echo \"ModuleNotFoundError: No module named 'ansible_mitogen'\" >&2; exit 1; }\n"
        f"  printf %s {q(real.stdout)}; printf %s {q(real.stderr)} >&2; exit {real.returncode}\n"
        "fi\n"
        f'exec {q(sys.executable)} "$@"\n'
    )


class _ForkServer:
    """This worker's fork server (started on first use, one per process; it ends when the
    worker closes the socket, i.e. when the worker exits)."""

    _current = None

    def __init__(self):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = _POPEN(
            [sys.executable, "-S", str(HERE / "fakes" / "forkserver.py"), str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        theirs.close()
        atexit.register(self.close)  # ended and reaped with this process, not left behind

    @classmethod
    def get(cls):
        if cls._current is None or cls._current.proc.poll() is not None:
            cls._current = cls()
        return cls._current

    def close(self):
        """End this server (it exits at EOF) and forget it: the next fake starts another."""
        if self.sock.fileno() == -1:
            return
        self.sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if _ForkServer._current is self:
            _ForkServer._current = None

    def spawn(self, argv, cwd, env, std_fds, new_session):
        """A forked fake as this process's child: its pid."""
        passed = [fd for fd in dict.fromkeys(std_fds) if fd != -1]
        req = {
            "argv": argv,
            "cwd": os.getcwd() if cwd is None else os.fsdecode(cwd),
            "env": env,
            "fds": [None if fd == -1 else passed.index(fd) for fd in std_fds],
            "new_session": bool(new_session),
        }
        try:
            socket.send_fds(self.sock, [json.dumps(req).encode()], passed)
            pid = int(self.sock.recv(64) or b"-1")
        except BaseException:  # e.g. run_driver's alarm mid-request: the reply would be
            self.close()  # read as the next request's, so this server is done
            raise
        if pid <= 0:
            raise OSError("the fake tools' fork server could not fork")
        with open(f"/proc/{pid}/stat") as fh:  # a zombie still has it: only we reap it
            ppid = int(fh.read().rpartition(")")[2].split()[1])
        if ppid != os.getpid():  # else Popen.wait would see ECHILD and call it exit 0
            raise OSError(f"forked fake {pid} is the child of {ppid}, not of this process")
        return pid


class _ForkedFakesPopen(subprocess.Popen):
    """subprocess.Popen that forks the fake tools (see above) and execs everything else."""

    _PARAMS = list(inspect.signature(subprocess.Popen._execute_child).parameters)[1:]

    def _execute_child(self, *args):
        a = dict(zip(self._PARAMS, args, strict=True))
        argv = a["args"]
        argv = [os.fsdecode(x) for x in argv] if isinstance(argv, (list, tuple)) else None
        env = os.environ if a["env"] is None else a["env"]
        where = None
        if argv and not a["shell"] and a["executable"] is None and a["preexec_fn"] is None:
            where = shutil.which(argv[0], path=env.get("PATH"))
        if EXEC_FAKES or where is None or os.path.realpath(where) != str(FAKEBIN):
            return super()._execute_child(*args)
        try:
            self.pid = _ForkServer.get().spawn(
                argv,
                a["cwd"],
                {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()},
                (a["p2cread"], a["c2pwrite"], a["errwrite"]),
                a["start_new_session"],
            )
            self._child_created = True
        finally:
            self._close_pipe_fds(
                a["p2cread"],
                a["p2cwrite"],
                a["c2pread"],
                a["c2pwrite"],
                a["errread"],
                a["errwrite"],
            )


class _DriverTimeout(BaseException):
    pass


_POPEN = subprocess.Popen


def run_driver(script, args, env, cwd, timeout, patch=None):
    """`python3 script *args` with exactly env, in cwd, as a fresh module in this process:
    a CompletedProcess like subprocess.run(capture_output=True, text=True) gives. The
    module is re-executed per call (its globals read __file__ and the environment at
    import), from a code object compiled once; `patch(module)`, when given, runs before
    its main (a test's hook into the run, e.g. another run acting at a chosen moment).
    An exception the driver lets escape becomes a traceback on stderr and exit 1, as the
    interpreter would report it. Bounded: a driver still running after `timeout` s is
    interrupted (SIGALRM) and reported as 124."""
    script = pathlib.Path(script)
    # Keyed on the text: every test's temp repo holds a copy of the same driver.
    repo_copy = SCRIPTS / script.name  # a real file, for the source lines of tracebacks
    code = _compiled(script.read_text(), str(repo_copy if repo_copy.exists() else script))
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_sigs = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    name = f"_integration_vm_run_{id(out)}"

    def on_alarm(signum, frame):
        raise _DriverTimeout

    rc = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = [str(script), *args]
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        subprocess.Popen = _ForkedFakesPopen
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            mod = type(sys)(name)
            mod.__file__ = str(script)
            sys.modules[name] = mod
            try:
                exec(code, mod.__dict__)
                if patch is not None:
                    patch(mod)
                ret = mod.CLI.main(list(args))
                rc = 0 if ret is None else ret
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except _DriverTimeout:
                rc = 124
                print(f"conftest: driver still running after {timeout}s", file=sys.stderr)
            except BaseException:  # what `python3 script` would print and exit with
                traceback.print_exc()
                rc = 1
    finally:
        subprocess.Popen = _POPEN
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in saved_sigs.items():
            signal.signal(s, h)
        sys.modules.pop(name, None)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(
        [sys.executable, str(script), *args], rc, out.getvalue(), err.getvalue()
    )


# ---- the fake harness: the driver against fake virsh & co. ---------------------------------
# No hypervisor: every tool the driver runs (virsh, virt-install, qemu-img, cloud-localds,
# ssh, ssh-keygen, ansible-playbook, mmdebstrap, mkfs.ext4, qemu-system-x86_64) is
# tests/fakes/fakebin.py, symlinked into a temp dir that is the ONLY entry on PATH (so a
# real virsh on the machine can never be reached). The driver is copied into a temp repo
# so its repo root (from __file__) holds test profiles/playbooks, and every other path is
# pointed at temp dirs through BOMA_IT_* variables. TCP 22 is a listening socket on
# 127.0.0.1 (BOMA_IT_SSH_PORT); the fake lease hands out 127.0.0.1.
# Fixtures: `h` (the harness, checkpoints off) and `hc` (checkpoints on, role trees shaped
# like the real ones); the helpers below are imported by the tests under tests/driver/.
HERE = pathlib.Path(__file__).resolve().parent
ivm = load_script("integration-vm.py", "integration_vm")

# A shell that starts a job in the background without job control (`cmd &` in a script,
# nohup) leaves SIGINT ignored, and every process started from it inherits that: the
# interrupt tests would never see their Ctrl-C. Python's own handler here (so a plain
# default in every process the tests start) is what a terminal gives.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


DRIVER = HERE.parent / "scripts" / "integration-vm.py"


FAKEBIN = HERE / "fakes" / "fakebin"  # the launcher of fakebin.py (cached bytecode)
_spec = importlib.util.spec_from_file_location("fakebin", HERE / "fakes" / "fakebin.py")
fakebin = importlib.util.module_from_spec(_spec)  # what a forked fake runs (_fake_child)
_spec.loader.exec_module(fakebin)


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
    "REUSE_SSH": 1.5,
}


class Harness:
    def __init__(self, tmp):
        self.tmp = tmp
        self.repo = tmp / "repo"
        self.bin = tmp / "bin"
        # A short cache, as the real one (/var/lib/boma-integration): the shared SSH
        # connection's socket beside a run's disks must fit a socket address, and pytest's
        # temp paths do not. So every test runs the driver's SSH as a real run does.
        self.short = pathlib.Path(tempfile.mkdtemp(prefix="bit-"))
        self.cache = self.short / "cache"
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
            # Checkpoints have their own tests (tests/driver/test_checkpoints.py); here
            # every cycle boots cold so the call sequences stay what these tests assert.
            "BOMA_IT_CHECKPOINTS": "0",
        }
        self.env.update({f"BOMA_IT_TIMEOUT_{k}": str(v) for k, v in BOUNDS.items()})
        # `make coverage`: the driver's subprocesses measure themselves (.coveragerc)
        self.env.update({k: v for k, v in os.environ.items() if k.startswith("COVERAGE_")})

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
        python3 = self.bin / "python3"
        python3.write_text(_python3_answering_the_mitogen_probe())
        python3.chmod(0o755)

    @property
    def script(self):
        return self.repo / "scripts" / "integration-vm.py"

    def cmd(self, *args):
        return [sys.executable, str(self.script), *args]

    def run(self, *args, timeout=60, in_process=True, patch=None, **env):
        """The driver on args: in-process (tests/conftest.py run_driver, `patch` its
        hook) unless the test is about the driver's own process."""
        if in_process:
            return run_driver(self.script, args, {**self.env, **env}, self.tmp, timeout, patch)
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
        shutil.rmtree(self.short, ignore_errors=True)


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def plain_ctx(tmp_path):
    """A Ctx under tmp_path for calling the driver's functions directly (no fake tools)."""
    return ivm.Ctx(
        repo=tmp_path,
        run_parent=tmp_path / ".run",
        cache=tmp_path / "cache",
        diag_root=tmp_path / "diag",
        uri="test:///",
        environ={},
    )


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


FIXTURES = HERE / "fakes"


def _result(**kw):
    r = ivm.Reporting.new_result("cycle", "askari").to_json()  # result.json as read back
    r.update(vm="boma-it-askari-1a2b3c4d", accel="tcg", total_seconds=412.3, verdict="pass")
    r["phase_details"] = [
        {"name": "image", "seconds": 0.2, "status": "pass"},
        {"name": "boot", "seconds": 31.0, "status": "pass"},
        {"name": "apply:site.yml", "seconds": 200.0, "status": "pass"},
        {"name": "apply:offsite.yml", "seconds": 50.0, "status": "pass"},
        {"name": "reboot:graceful", "seconds": 28.0, "status": "pass"},
        {"name": "verify", "seconds": 12.0, "status": "pass"},
        {"name": "teardown", "seconds": 2.0, "status": "pass"},
    ]
    r.update(kw)
    return r


SITE = """---
- name: Baseline
  hosts: all
  roles:
    - role: base
      tags: [base]

- name: Docker
  hosts: docker_hosts
  roles:
    - role: docker_host
      tags: [docker_host]
"""


OFFSITE = """---
- name: Offsite services
  hosts: offsite_hosts
  roles:
    - role: docker_host
      tags: [docker_host]
    - role: reverse_proxy
      tags: [reverse_proxy]
"""


def make_roles(repo):
    """Role trees shaped like the real ones: base and reverse_proxy have an `always`
    preflight, docker_host has none."""
    for role, always in (("base", True), ("docker_host", False), ("reverse_proxy", True)):
        r = repo / "roles" / role
        (r / "tasks").mkdir(parents=True)
        (r / "meta").mkdir()
        (r / "molecule" / "default").mkdir(parents=True)
        (r / "tasks" / "main.yml").write_text(
            "---\n- name: Preflight\n  ansible.builtin.import_tasks: preflight.yml\n"
            "  tags: [always]\n"
            if always
            else "---\n- name: Install\n  ansible.builtin.debug:\n    msg: hi\n"
        )
        (r / "meta" / "main.yml").write_text("---\ndependencies: []\n")
        (r / "README.md").write_text(f"# {role}\n")
        (r / "molecule" / "default" / "converge.yml").write_text("---\n")
        (r / "templates").mkdir()
        (r / "templates" / "x.j2").write_text("x\n")
    (repo / "playbooks").mkdir(exist_ok=True)
    (repo / "playbooks" / "site.yml").write_text(SITE)
    (repo / "playbooks" / "offsite.yml").write_text(OFFSITE)


def edit(path):
    path.write_text(path.read_text() + "# edited\n")


@pytest.fixture
def hc(tmp_path):
    harness = Harness(tmp_path)
    harness.env["BOMA_IT_CHECKPOINTS"] = "1"
    make_roles(harness.repo)
    yield harness
    harness.close()


def result_of(h, proc):
    """The result.json of the cycle whose summary line proc printed (not the newest
    started_at: it has one-second resolution, and two quick runs tie)."""
    vm = proc.stdout.strip().splitlines()[-1].split()[3]
    (res,) = [r for r in h.results() if r["vm"] == vm]
    return res


def ckpt_manifests(h):
    out = {}
    for m in sorted((h.cache / "checkpoints").glob("*/manifest.json")):
        d = json.loads(m.read_text())
        out[d["stage"]] = d
    return out


def mode(p):
    return oct(p.stat().st_mode & 0o777)


def victim(h, name="victim"):
    v = h.tmp / name
    (v / "sub").mkdir(parents=True)
    (v / "precious").write_text("keep me\n")
    (v / "sub" / "precious").write_text("keep me too\n")
    return v


def intact(v):
    return (v / "precious").read_text() == "keep me\n" and (
        v / "sub" / "precious"
    ).read_text() == "keep me too\n"


def ran(h, *args, **env):
    """Run the driver; (process, the result.json of the run its summary line names).
    Never "the newest started_at": one-second resolution, and two quick runs tie."""
    p = h.run(*args, **env)
    return p, result_of(h, p)
