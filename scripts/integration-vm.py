#!/usr/bin/env -S --block-signal=INT,TERM python3
"""boma local-VM integration test harness driver (ADR-025).

Boots a throwaway libvirt VM that plays one real host (a profile), applies the real
playbooks to it through a single-host transient inventory, reboots it (and proves the
reboot happened, and that the guest's firewall, published ports, listening sockets and
services are what they were before it), runs the verify playbook, and tears it down.

Stdlib-only by convention: never imports a YAML library or libvirt bindings. It talks
to libvirt through `virsh`/`virt-install`/`qemu-img`/`cloud-localds` and to the guest
through `ssh`/`ansible-playbook`. Stubs and cert tiers reach Ansible as `-e @file`.

The one rule that stays true: processes start only in `run` (the "Processes" section);
every other function reaches virsh, qemu-img, ssh and ansible-playbook through it
(tests/driver/test_structure.py enforces this, and that no function runs over
60 lines).

Layout of this file: one section per concept, each with its pure helpers (argv builders,
renderers, parsers) and its orchestration together. From Utilities on, a section's
functions and constants live in its class, called on the class and never instantiated
(`Checkpoints.try_resume(ctx, session)`, `Report.format_bench_table(r)`), beside the
section's objects (Machine, RunState, Run, Options, ...). The sections, in this order:

  Constants and errors   shared names and defaults; the error hierarchy (exit codes)
  Processes              run() and its thin wrappers (virsh)
  Utilities              owned paths and writes, locks and claims, timed phases, the
                         harness's domains (and their destroy) and transient pools, the
                         resource guards (RAM, VM slot, disk)
  Settings               every BOMA_IT_* variable declared once; Settings; Ctx; the
                         command line's Options
  Profile                profile files: loading, merging, validation, confined paths
  Image                  the golden image: recipe, key, build, fetch, publish
  Network and accel.     the harness network, DHCP leases, KVM or TCG
  Guest                  a run's state (RunState, run.json's RunRecord), cloud-init,
                         virt-install and ssh argv, the wait helper, boot notes
  Reboot diff            state capture, normalisation, diff, tolerances, boot analysis,
                         the reboot's stage rows
  Machine                the VM's verbs: create, start, the bounded waits, ssh, reboot
                         with its proof (a new boot id), save/restore, destroy
  Ansible                transport, transient inventory, argv, output, apply, verify
  Checkpoints            keys, role scan, take/stage/resume, the session's resume
  Day 2                  --from REF: REF's worktree and applies, then the upgrade
  Diagnostics, teardown  what a failed run leaves; storage pools
  Report                 report.html: one self-contained page per run, the harness's
                         own time, the bench's tables
  Loop                   the quick loop's VM: kept for the next loop, reused (what it
                         re-applies) or retired
  Reporting              result.json (ResultRecord), the summary line, JUnit, the
                         closing lines, --expect-fail
  Session                the Run and SessionOptions, preflight guards, the phase list
                         per command, the failure-policy table
  Commands               cmd_* and the bench
  CLI                    help texts, build_parser, main
"""

# ruff: noqa: E402
# (E402 is off here: the interrupt handler below comes before the other imports, on purpose)
import os
import signal
import sys


def _interrupted_before_main(signum, frame):
    """A Ctrl-C (or SIGTERM) before main() takes over: the imports, the module's own set-up,
    the parser. Nothing exists yet: one line (the closing line of an interrupt, see
    closing_lines) and exit 130, never a traceback."""
    os.write(2, b"\nintegration-vm: interrupted\n")
    os._exit(130)


# Installed before anything heavy: the imports below take 0.1-0.3 s of a start. Before it
# come the interpreter's own start and the compile of this file (~0.15 s), which no line
# here can cover: so the launchers hold SIGINT/SIGTERM blocked through them (the shebang's
# `env --block-signal`, GNU coreutils >= 8.31; scripts/it-run the same), and here they are
# unblocked: a Ctrl-C pending since the first moment is taken here, one line and exit 130.
# A SIGINT the launcher ignores (nohup, `cmd &` in a script) stays ignored, as it did.
if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupted_before_main)
    signal.signal(signal.SIGTERM, _interrupted_before_main)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import fcntl
import hashlib
import html
import ipaddress
import json
import math
import pathlib
import re
import secrets
import selectors
import shlex
import shutil
import socket
import struct
import subprocess
import tempfile
import textwrap
import threading
import time
import types
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape as _xml_escape
from xml.sax.saxutils import quoteattr as _xml_quoteattr

# --------------------------------------------------------------------------------------
# Constants and errors
# --------------------------------------------------------------------------------------
# Names, paths, tiers, exit codes and default bounds that every section shares, and the
# one error hierarchy (mapped to exit codes in main()).

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
IMAGE_URL = "https://cloud.debian.org/images/cloud/trixie/latest/debian-13-genericcloud-amd64.qcow2"
SHA_URL = "https://cloud.debian.org/images/cloud/trixie/latest/SHA512SUMS"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
NAME_PREFIX = "boma-it-"

# A run's overlay and NoCloud seed (the guest's private host key; for le-* tiers the
# overlay holds the Gandi token), their checkpoint copies and memory images: root only.
# libvirt's DAC driver (dynamic_ownership, on by default) chowns a disk to the QEMU user
# (Debian: libvirt-qemu) while its domain runs; the cache dir is root:libvirt 2775, so a
# group-readable file would be readable by every member of libvirt.
DISK_MODE = 0o600
FROZEN_DISK_MODE = 0o400  # a checkpoint's disk and seed: read-only backing files
INTEG_DIR = REPO_ROOT / "tests" / "integration"
PROFILE_DIR = INTEG_DIR / "profiles"
DEFAULT_VERIFY = "tests/integration/verify.yml"
TEST_VAULT_VALUES = REPO_ROOT / "tests" / "vault" / "test-values.yml"
DEFAULT_MEM_MIB = 3072
DEFAULT_VCPUS = 2
DEFAULT_NET_SUBNET = "192.168.150.0/24"  # the harness network (BOMA_IT_NET_SUBNET)
RAM_FLOOR_MIB = 1024  # MemAvailable minus the VM's memory must stay above this
MIN_DISK_MIB_RUN = 4096  # free disk for one run's overlay to grow into
MIN_DISK_MIB_IMAGE = 4096  # free disk to build/fetch a golden image
VALID_TIERS = ("internal", "le-staging", "le-prod-wildcard")
PROD_TIER = "le-prod-wildcard"

# Tiers that need the real Gandi token: their runs load the production vault (password via
# scripts/vault-password.sh) instead of tests/vault/test-values.yml. Everything else never
# sees the production vault.
REAL_SECRET_TIERS = ("le-staging", "le-prod-wildcard")
VAULT_ID = "prod@scripts/vault-password.sh"
REBOOT_MODES = ("graceful", "hard")
ACCEL_CHOICES = ("auto", "kvm", "tcg")
STRATEGY_CHOICES = ("mitogen", "default")
ANSIBLE_USER = "ansible"
DEFAULT_URI = "qemu:///system"
METADATA_URI = "https://boma.invalid/integration-vm"
SUBCOMMANDS = (
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
    "report",
)

# Which commands do what. The gate (cycle, bench) runs every reboot of the profile and the
# idempotence pass and tears the VM down; the quick loop (issue 13) resumes, applies what
# the edit invalidated, reboots once (graceful), verifies and leaves the VM up.
CREATING_COMMANDS = ("up", "cycle", "bench", "loop")
CONVERGING_COMMANDS = ("cycle", "bench", "loop")
GATE_COMMANDS = ("cycle", "bench")
EXIT_PASS, EXIT_VERIFY, EXIT_USAGE, EXIT_INFRA, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES_HELP = """exit codes:
  0    pass (or, with --expect-fail[=STAGE], verify (or STAGE) failed as expected)
  1    the code under test failed: an apply, the reboot diff (an unexpected state
       difference across a reboot), idempotence (changes on the post-reboot re-apply)
       or verify; the last lines name which, and the VM is kept for inspection
  2    usage or configuration error (bad flag, unknown host/profile, bad profile JSON,
       missing playbook, prod certs without --allow-prod-certs); nothing was created
  3    infrastructure failure (image, boot, lease, SSH, cloud-init, reboot, libvirt,
       missing tool, resource guard, another run holding the VM slot)
  130  interrupted (Ctrl-C / SIGTERM); what this run created was torn down unless --keep
"""

# Readiness / command bounds in seconds (KVM). TCG multiplies the boot-ish ones by
# TCG_SCALE. Each is overridable: BOMA_IT_TIMEOUT_<NAME> (upper-case, '-' -> '_').
DEFAULT_BOUNDS = {
    "domain-running": 60,
    "dhcp-lease": 120,
    "tcp-22": 90,
    "ssh-handshake": 90,
    "cloud-init": 300,
    "reboot": 240,
    "system-running": 180,
    "ssh-attempt": 20,
    "ssh-command": 60,
    "virsh": 60,
    "apply": 3600,
    "verify": 1800,
    "image-build": 1800,
    "download": 1800,
    "accel-probe": 30,
    "lock": 600,
    "diag-command": 30,
    "reboot-settle": 20,
    "checkpoint": 300,
    "resume": 60,
    "reuse-ssh": 30,
}
TCG_SCALED = (
    "dhcp-lease",
    "tcp-22",
    "ssh-handshake",
    "cloud-init",
    "reboot",
    "resume",
    "system-running",
    "apply",
    "verify",
    "reboot-settle",
    "reuse-ssh",
)
TCG_SCALE = 3
DEFAULT_POLL = 2.0
# Probes that cost the guest nothing (a local `virsh` query, a TCP connect) look this
# often: at the 2 s poll, each wait a boot passes through ended ~1 s late on average.
# Probes that cost the guest work (an SSH handshake: 1-2.6 s of emulated crypto) keep the
# harness's poll.
LOCAL_POLL = 0.25
HOST_RE = r"[a-z0-9][a-z0-9_-]{0,40}"
RUN_NAME_RE = re.compile(re.escape(NAME_PREFIX) + HOST_RE + r"-[0-9a-f]{8}")


class HarnessError(Exception):
    exit_code = EXIT_INFRA
    stage = None


class UsageError(HarnessError):
    """Bad invocation or configuration. Nothing has been created."""

    exit_code = EXIT_USAGE
    stage = "usage"


class InfraError(HarnessError):
    """The machinery failed (image, boot, lease, SSH, libvirt, tools, guards)."""

    exit_code = EXIT_INFRA

    def __init__(self, stage, msg):
        super().__init__(f"{stage}: {msg}")
        self.stage = stage
        self.msg = msg


class GuestPanicked(InfraError):
    """A wait ended by a `Kernel panic` line on the guest's console (wait_until); `panic`
    is that line."""

    def __init__(self, stage, msg, panic):
        super().__init__(stage, msg)
        self.panic = panic


class VerifyFailed(HarnessError):
    """An assertion about the guest failed (verify playbook, idempotence)."""

    exit_code = EXIT_VERIFY

    def __init__(self, stage, msg, failed_tasks=(), detail=None):
        super().__init__(f"{stage}: {msg}")
        self.stage = stage
        self.msg = msg
        self.failed_tasks = list(failed_tasks)
        self.detail = detail  # multi-line text for JUnit (msg stays one line)


# --------------------------------------------------------------------------------------
# Processes: the one function that starts them (`run`) and its thin wrappers
# --------------------------------------------------------------------------------------
# run() starts every child process: bounded, in its own process group, logged to the run's
# command log, killed as a group on timeout or signal. virsh() is its libvirt wrapper.


@dataclasses.dataclass
class Proc:
    argv: list
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    seconds: float = 0.0


def _kill_group(proc):
    """SIGTERM the child's process group, give its leader 3 s, then SIGKILL the group:
    what the leader started (ansible's workers, ssh) goes with it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=3)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM back while a child is being started: an interrupt landing
    inside Popen would otherwise leave a child nobody kills. On exit the held signal is
    handed to the handler that was installed (KeyboardInterrupt, or the cleanup note)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held, old = [], {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in held[:1]:
            if callable(old[sig]):
                old[sig](sig, None)
            elif old[sig] == signal.SIG_DFL:
                signal.raise_signal(sig)


def _start(argv, env, cwd, input, stream_log):
    """Popen in its own session/process group, interrupts held back until the child is
    ours to kill (then it is killed and the interrupt raised)."""
    proc = None
    try:
        with _signals_deferred():
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                text=True,
                errors="replace",
                start_new_session=True,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if stream_log else subprocess.PIPE,
            )
    except FileNotFoundError:
        raise InfraError("tools", f"{argv[0]} not found on PATH") from None
    except PermissionError as e:
        raise InfraError("tools", f"cannot execute {argv[0]}: {e}") from None
    except BaseException:
        if proc is not None:
            _kill_group(proc)
        raise
    return proc


def run(
    argv,
    *,
    timeout,
    env=None,
    cwd=None,
    input=None,
    stream_log=None,
    check=False,
    stage="command",
    cmdlog=None,
    max_output=None,
):
    """Run argv with a hard wall-clock timeout, in its own process group (killed whole
    on timeout or interrupt). stream_log: merge stdout+stderr, tee to that file and to our
    stderr line by line. max_output: keep the last that many bytes of stdout and of stderr
    (a guest's output has no end). Missing executable -> InfraError('tools').
    check=True: nonzero exit or timeout -> InfraError(stage)."""
    argv = [str(a) for a in argv]
    if cmdlog:
        _log_command(cmdlog, argv)
    t0, proc = time.monotonic(), _start(argv, env, cwd, input, stream_log)
    timed_out = False
    try:
        if stream_log:
            chunks = []
            pumper = threading.Thread(
                target=_pump, args=(proc.stdout, stream_log, chunks), daemon=True
            )
            pumper.start()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
            pumper.join(timeout=5)
            out, err = "".join(chunks), ""
        elif max_output:
            out, err, timed_out = _communicate_capped(proc, input, timeout, max_output)
        else:
            try:
                out, err = proc.communicate(input=input, timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                out, err = _drain_killed(proc)
    except BaseException:
        _kill_group(proc)
        raise
    res = Proc(
        argv,
        124 if timed_out else proc.returncode,
        out or "",
        err or "",
        timed_out,
        time.monotonic() - t0,
    )
    if check and (timed_out or res.returncode != 0):
        _raise_failed(res, timeout, stage)
    return res


DRAIN_GRACE = 5  # seconds a killed command's pipes are still read (_drain_killed)


def _feed(pipe, data):
    """Write `data` to a child's stdin and close it (a child that exits first is fine)."""
    with contextlib.suppress(OSError, ValueError):
        pipe.write(data)
    with contextlib.suppress(OSError, ValueError):
        pipe.close()


def _communicate_capped(proc, input, timeout, cap):
    """proc.communicate(input, timeout) keeping only the last `cap` bytes of stdout and
    of stderr, each: memory stays bounded whatever the command prints. A command at its
    bound is killed and read DRAIN_GRACE s more (as _drain_killed). -> (out, err, timed_out)"""
    if input is not None:
        threading.Thread(target=_feed, args=(proc.stdin, input), daemon=True).start()
    pipes = [p for p in (proc.stdout, proc.stderr) if p is not None]
    tails = {p.fileno(): [bytearray(), 0] for p in pipes}  # fd -> [tail, bytes cut]
    timed_out, deadline = False, time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for fd in tails:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                if timed_out:
                    break  # another session holds the pipes open (ControlPersist)
                timed_out = True
                _kill_group(proc)
                deadline = time.monotonic() + DRAIN_GRACE
                continue
            for key, _ in sel.select(timeout=min(left, 1.0)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                tail = tails[key.fd]
                tail[0] += chunk
                if len(tail[0]) > cap:
                    tail[1] += len(tail[0]) - cap
                    del tail[0][: len(tail[0]) - cap]
    if not timed_out:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # its pipes are closed but it runs on
            timed_out = True
            _kill_group(proc)
    texts = {}
    for p in pipes:
        tail, n_cut = tails[p.fileno()]
        texts[p] = (f"[... first {n_cut} bytes cut]\n" if n_cut else "") + tail.decode(
            "utf-8", "replace"
        )
        p.close()
    return texts.get(proc.stdout, ""), texts.get(proc.stderr, ""), timed_out


def _drain_killed(proc):
    """What a command killed at its bound had written, read for DRAIN_GRACE s more. A
    process outside its group can hold its pipes open, so EOF may never come: OpenSSH's
    ControlPersist master serves a session's stdio itself, and keeps it while the remote
    command runs on (a guest whose `systemctl is-system-running --wait` never returns)."""
    try:
        return proc.communicate(timeout=DRAIN_GRACE)
    except subprocess.TimeoutExpired:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return "", ""


# cmdlog -> [line, repeats since, last time]: a wait's poll (the same command back to back,
# up to four times a second) is one line, then one line that says how often it ran.
_LAST_LOGGED = {}


def _log_command(cmdlog, argv):
    """Append one timestamped line for argv to the command log. A command repeated back
    to back is written once; the next different command first writes how many more times
    it ran, and until when."""
    now, line = datetime.datetime.now().isoformat(timespec="seconds"), shlex.join(argv)
    last = _LAST_LOGGED.get(str(cmdlog))
    if last and last[0] == line:
        last[1], last[2] = last[1] + 1, now
        return
    with open(cmdlog, "a") as fh:
        if last and last[1]:
            fh.write(f"{last[2]} (the command above ran {last[1]} more times until here)\n")
        fh.write(f"{now} {line}\n")
    _LAST_LOGGED[str(cmdlog)] = [line, 0, now]


def flush_command_log(cmdlog):
    """Write the pending repeat count of cmdlog's last command (the run ends, and no
    different command will come to write it)."""
    last = _LAST_LOGGED.pop(str(cmdlog), None)
    if cmdlog is not None and last and last[1]:
        with contextlib.suppress(OSError), open(cmdlog, "a") as fh:
            fh.write(f"{last[2]} (the command above ran {last[1]} more times until here)\n")


def _pump(stream, stream_log, chunks):
    """Tee a merged stdout+stderr stream, line by line, into chunks, stream_log and our
    stderr (run()'s stream_log mode, in a thread)."""
    with open(stream_log, "a") as log:
        for line in stream:
            chunks.append(line)
            log.write(line)
            log.flush()
            sys.stderr.write(line)
            sys.stderr.flush()


def _raise_failed(res, timeout, stage):
    """run(check=True) on a failed or timed-out command: InfraError(stage), one line."""
    what = os.path.basename(res.argv[0])
    if res.timed_out:
        raise InfraError(stage, f"{what} timed out after {timeout:.0f}s")
    last = (res.stderr.strip() or res.stdout.strip()).splitlines()
    raise InfraError(
        stage,
        f"{shlex.join(res.argv[:4])}... failed (exit {res.returncode})"
        + (f": {last[-1]}" if last else ""),
    )


def virsh_argv(uri, *args):
    return ["virsh", "--connect", uri, *[str(a) for a in args]]


def virsh(ctx, *args, check=False, stage="libvirt", timeout=None):
    return run(
        virsh_argv(ctx.uri, *args),
        timeout=timeout or ctx.bounds["virsh"],
        check=check,
        stage=stage,
        cmdlog=ctx.cmdlog,
    )


# --------------------------------------------------------------------------------------
# Utilities: owned paths and files, locks and claims, timed phases, the harness's domains
# --------------------------------------------------------------------------------------
# What every later section leans on, defined before its first user: paths and writes that
# never follow a symlink, the lock files and directory claims, the phase timer of
# result.json, the domains (and transient pools) the harness owns, and the resource guards
# (RAM, the VM slot, disk) a run passes before it starts a VM.


class Utilities:
    """The Utilities section as a namespace (its functions called on the class, never an
    instance): owned paths and writes, locks and claims, timed phases, the harness's domains
    and transient pools, the resource guards."""

    def owned_path(root, *parts):
        """root/parts, each part one plain name and no symlink on the way below root: the
        harness's own trees (runs, disks, diagnostics, images, checkpoints) are never reached
        through a link or a name from a state file. Else InfraError('state')."""
        p = pathlib.Path(root)
        for part in map(str, parts):
            if part in ("", ".", "..") or "/" in part or "\0" in part:
                raise InfraError("state", f"refusing path component {part!r} under {root}")
            p = p / part
            if p.is_symlink():
                raise InfraError("state", f"refusing {p}: a symlink inside the harness's own tree")
        return p

    def write_owned(path, text, mode=0o644):
        """Write a file the harness owns atomically, never through a symlink: a temp file
        (O_EXCL|O_NOFOLLOW) renamed over `path` replaces a link instead of following it."""
        path = pathlib.Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)  # a crashed writer's (a link there is removed, not followed)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def open_lock_file(path):
        """A lock file the harness owns, opened without following a symlink."""
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600), "r+")

    @contextlib.contextmanager
    def file_lock(ctx, path, what, wait=None):
        """Hold the lock file `path`, waiting for it `wait` s at most (the lock bound by
        default); longer: LockBusy (InfraError 'guard')."""
        fh = Utilities.open_lock_file(path)
        wait = ctx.bounds["lock"] if wait is None else wait
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockBusy(what, path, wait) from None
                    time.sleep(ctx.poll)
            yield
        finally:
            fh.close()

    def claim_dir(path, shared=False):
        """Claim the directory `path` (a checkpoint, a run's dir) with a flock, never waiting:
        a Claim, or None when another process holds a conflicting one, or `path` is gone, a
        symlink or no longer the directory that was locked. Runs that resume a checkpoint
        share it (shared=True); the gc, and a session that takes or retires a loop's VM,
        need it alone. A killed holder's claim goes with its process."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return None
        claim = None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            now, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                claim = Claim(pathlib.Path(path), fd)
        except OSError:  # BlockingIOError: another holds it; else removed while we locked
            pass
        finally:
            if claim is None:
                os.close(fd)
        return claim

    @contextlib.contextmanager
    def timed_phase(ctx, result, name):
        t0 = time.monotonic()
        entry = {"name": name, "seconds": 0.0, "status": "pass"}
        if ctx is not None:  # where it starts in the run (the report's timeline)
            entry["at"] = round(t0 - ctx.t0, 1)
        if result is not None:
            result.phase_details.append(entry)
        try:
            yield entry
        except VerifyFailed as e:
            entry["status"], entry["message"] = "fail", e.msg
            if e.detail:
                entry["detail"] = e.detail
            raise
        except KeyboardInterrupt:
            entry["status"], entry["message"] = "interrupted", "interrupted"
            raise
        except Exception as e:  # any error ends the phase as an error
            entry["status"], entry["message"] = "error", str(e)
            raise
        finally:
            entry["seconds"] = round(time.monotonic() - t0, 1)

    def phase_totals(phases):
        """Group `apply:site.yml`, `reboot:graceful` ... under their family, in order."""
        totals = {}
        for p in phases:
            fam = p["name"].split(":", 1)[0]
            totals[fam] = totals.get(fam, 0.0) + p["seconds"]
        return totals

    def _age(iso):
        try:
            t = datetime.datetime.fromisoformat(iso)
            secs = (datetime.datetime.now(datetime.UTC) - t).total_seconds()
        except (TypeError, ValueError):
            return "?"
        for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
            if secs >= n:
                return f"{int(secs // n)}{unit}"
        return f"{int(secs)}s"

    def parse_name_list(text):
        return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]

    def render_metadata_xml(run_id, created_at, profile, owner, host=None):
        attrs = {"id": run_id, "created_at": created_at, "profile": profile, "owner": owner}
        if host:
            attrs["host"] = host
        body = " ".join(f"{k}={_xml_quoteattr(str(v))}" for k, v in attrs.items())
        return f'<boma:run xmlns:boma="{METADATA_URI}" {body}/>'

    def parse_metadata_xml(text):
        """The boma run attributes from `virsh metadata --uri` output, or None."""
        if not text or not text.strip():
            return None
        try:
            el = ET.fromstring(text.strip())
        except ET.ParseError:
            return None
        if el.tag not in (f"{{{METADATA_URI}}}run", "run"):
            found = el.find(f".//{{{METADATA_URI}}}run")
            if found is None:
                return None
            el = found
        return dict(el.attrib) if el.get("id") else None

    def owned_domains(ctx):
        """{name: metadata dict + state} for every domain carrying our metadata."""
        r = virsh(ctx, "list", "--all", "--name", check=True)
        owned = {}
        for name in Utilities.parse_name_list(r.stdout):
            m = virsh(ctx, "metadata", name, "--uri", METADATA_URI)
            meta = Utilities.parse_metadata_xml(m.stdout) if m.returncode == 0 else None
            if meta:
                st = virsh(ctx, "domstate", name)
                meta["state"] = st.stdout.strip() if st.returncode == 0 else "unknown"
                owned[name] = meta
        return owned

    def destroy_domain(ctx, name, expect_run_id=None):
        """Destroy+undefine a domain IF it carries our metadata. Idempotent."""
        m = virsh(ctx, "metadata", name, "--uri", METADATA_URI)
        if m.returncode != 0:
            exists = virsh(ctx, "domstate", name).returncode == 0
            if exists:
                print(
                    f"integration-vm: not touching domain {name}: no boma metadata", file=sys.stderr
                )
            return False
        meta = Utilities.parse_metadata_xml(m.stdout)
        if not meta or (expect_run_id and meta.get("id") != expect_run_id):
            print(
                f"integration-vm: not touching domain {name}: metadata is not this run's",
                file=sys.stderr,
            )
            return False
        if virsh(ctx, "domstate", name).stdout.strip() not in ("shut off", ""):
            virsh(ctx, "destroy", name)
        r = virsh(ctx, "undefine", name, "--nvram")
        if r.returncode != 0:
            r = virsh(ctx, "undefine", name)
            if r.returncode != 0 and virsh(ctx, "domstate", name).returncode == 0:
                raise InfraError("teardown", f"could not undefine {name}: {r.stderr.strip()}")
        return True

    @contextlib.contextmanager
    def transient_pool(ctx, name, directory):
        """virt-install defines a persistent, autostarted storage pool for a disk's directory
        unless a pool already holds it (virtinst's diskbackend.manage_path, even with
        --print-xml): lend it a transient one, destroyed (and so gone) once the XML is out. The
        domain names its disks by path, not by pool. A transient pool also dies with libvirtd."""
        virsh(ctx, "pool-create-as", name, "dir", "--target", directory, check=True, stage="boot")
        try:
            yield
        finally:
            virsh(ctx, "pool-destroy", name)

    def read_meminfo(ctx):
        try:
            return ctx.path_env("BOMA_IT_MEMINFO").read_text()
        except OSError:
            return ""

    def free_mib(meminfo_text):
        m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", meminfo_text, re.MULTILINE)
        return int(m.group(1)) // 1024 if m else 0

    def ram_guard(ctx, mem_mib):
        """(ok, detail) of the RAM guard, for check_guards and doctor alike."""
        avail = Utilities.free_mib(Utilities.read_meminfo(ctx))
        floor = ctx.settings["BOMA_IT_RAM_FLOOR_MIB"]
        return avail - mem_mib >= floor, (
            f"MemAvailable {avail} MiB minus the VM's {mem_mib} MiB "
            f"must leave {floor} MiB (BOMA_IT_RAM_FLOOR_MIB)"
        )

    def disk_guard(ctx, need_image):
        """(ok, detail) of the free-disk guard under the cache, for check_guards and doctor."""
        free = shutil.disk_usage(ctx.cache).free // (1024 * 1024)
        need = ctx.settings["BOMA_IT_MIN_DISK_MIB"]
        if need is None:
            need = MIN_DISK_MIB_RUN + (MIN_DISK_MIB_IMAGE if need_image else 0)
        return free >= need, f"{free} MiB free under {ctx.cache}, need {need} MiB"

    def check_guards(ctx, profile, need_image, count_vms=True):
        """RAM, the one-VM slot (count_vms: every domain the harness owns, shut off or not;
        authoritative only under the lock, with the run's slot held), and disk.
        Raises InfraError('guard', ...)."""
        ok, detail = Utilities.ram_guard(ctx, profile["mem_mib"])
        if not ok:
            raise InfraError("guard", f"refusing to start: {detail}")
        owned = sorted(Utilities.owned_domains(ctx)) if count_vms else []
        if len(owned) >= ctx.max_vms:
            raise InfraError(
                "guard",
                f"refusing to start: {len(owned)} harness VM(s) already "
                f"running or defined ({', '.join(owned)}); BOMA_IT_MAX_VMS="
                f"{ctx.max_vms}. Tear it down with `integration-vm down --run NAME` "
                "or `make test-integration-clean`",
            )
        ctx.cache.mkdir(parents=True, exist_ok=True)
        ok, detail = Utilities.disk_guard(ctx, need_image)
        if not ok:
            raise InfraError("guard", f"refusing to start: {detail}")


class LockBusy(InfraError):
    """file_lock: another run held the lock for longer than the wait."""

    def __init__(self, what, path, wait):
        super().__init__(
            "guard", f"{what}: lock {path} held by another run for more than {wait:.0f}s"
        )
        self.path = path


@dataclasses.dataclass
class Claim:
    """A flock held on a directory of the harness (claim_dir) until closed."""

    path: pathlib.Path
    fd: int

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------
# Settings: every environment variable, declared once, and the context built on them
# --------------------------------------------------------------------------------------
# The SETTINGS table (one row per BOMA_IT_* variable), read once into a frozen Settings;
# Ctx carries them with the libvirt URI and the paths: process-wide configuration only
# (a session's own state is its Run, in the Session section). The command line is one
# frozen Options, built once in main().


def _float_range(lo, hi, unit=""):
    noun = f"number of {unit}" if unit else "number"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be a {noun}") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"must be a finite {noun} from {lo:g} to {hi:g}")
        return value

    return parse


def _seconds(lo=0.0, hi=7 * 86400.0):
    return _float_range(lo, hi, "seconds")


def _bound(stage):
    """A stage's bound: seconds, more than none (a 0 s apply or lock bound cannot work),
    except the waits whose 0 means "do not wait" (ZERO_BOUNDS)."""
    parse = _seconds()

    def positive(text):
        value = parse(text)
        if value <= 0 and stage not in Env.ZERO_BOUNDS:
            raise ValueError("must be more than 0 seconds")
        return value

    return positive


def timeout_var(stage):
    return "BOMA_IT_TIMEOUT_" + stage.upper().replace("-", "_")


class Env:
    """The Settings section's helpers as a namespace (its functions called on the class, never
    an instance): the BOMA_IT_* table, parsing and validating each variable, the help text."""

    # One row per variable: (name, parser, default, help). read_settings() parses them all at
    # startup, before anything is created; a bad value is one line naming the variable, exit 2.
    # ENV_HELP (--help) is generated from this table (env_help).
    def _int_range(lo, hi):
        def parse(text):
            if not re.fullmatch(r"[0-9]{1,12}", text.strip()):
                raise ValueError(f"must be a whole number from {lo} to {hi}")
            value = int(text)
            if not lo <= value <= hi:
                raise ValueError(f"must be from {lo} to {hi}")
            return value

        return parse

    ZERO_BOUNDS = ("reboot-settle",)

    def _choice(*choices):
        def parse(text):
            if text not in choices:
                raise ValueError(f"must be one of {', '.join(choices)}")
            return text

        return parse

    def _abs_path(text):
        if not text or not os.path.isabs(text) or "\0" in text:
            raise ValueError("must be an absolute path")
        return pathlib.Path(text)

    def _dir_path(text):
        """An absolute path that is a directory or can become one: neither it nor the first
        of its parents that exists is anything but a directory."""
        path = Env._abs_path(text)
        probe = path
        while not os.path.lexists(probe) and probe != probe.parent:
            probe = probe.parent
        if not os.path.isdir(probe):
            raise ValueError(f"{probe} is not a directory")
        return path

    def _cache_path(text):
        path = Env._dir_path(text)
        if path.resolve() == pathlib.Path("/"):
            raise ValueError("must not be / (the harness prunes what it owns below it)")
        return path

    def _url(text):
        """A URL a tool takes as one (never an option: mmdebstrap once read `-...` as one)."""
        if not re.fullmatch(r"(https?|ftp|file)://[^\s]+", text):
            raise ValueError("must be an http://, https://, ftp:// or file:// URL")
        return text

    def _on_off(text):
        if text.lower() not in ("1", "on", "yes", "0", "off", "no"):
            raise ValueError("must be 1/on/yes or 0/off/no")
        return text.lower() in ("1", "on", "yes")

    def _as_is(text):
        return text

    def net_subnet(text):
        """BOMA_IT_NET_SUBNET: an IPv4 /24 written as its network (`a.b.c.0/24`); the three
        octets that name it. A /24, as the integration_test role takes (its network must be
        this one, or the driver redefines it, ADR-031)."""
        m = re.fullmatch(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.0/24", text.strip())
        if not m or any(int(o) > 255 for o in m.groups()):
            raise ValueError("must be an IPv4 /24 written as its network, e.g. 192.168.150.0/24")
        return ".".join(str(int(o)) for o in m.groups()) + ".0/24"

    SETTINGS = (
        ("LIBVIRT_DEFAULT_URI", _as_is, DEFAULT_URI, "libvirt URI; --connect wins"),
        ("BOMA_IT_ACCEL", _choice(*ACCEL_CHOICES), "auto", "auto|kvm|tcg; --accel wins"),
        (
            "BOMA_IT_CACHE",
            _cache_path,
            pathlib.Path("/var/lib/boma-integration"),
            "VM disks, golden images, checkpoints",
        ),
        (
            "BOMA_IT_RUN_DIR",
            _dir_path,
            lambda: str(INTEG_DIR / ".run"),
            "run metadata parent (default tests/integration/.run)",
        ),
        (
            "BOMA_IT_DIAG_DIR",
            _dir_path,
            lambda: str(pathlib.Path.home() / "integration-runs"),
            "diagnostics parent (default ~/integration-runs)",
        ),
        (
            "BOMA_IT_IMAGE_SOURCE",
            _choice("build", "fetch"),
            "build",
            "build (mmdebstrap) | fetch (cloud.debian.org)",
        ),
        ("BOMA_IT_MIRROR", _url, DEFAULT_MIRROR, "Debian mirror for image builds"),
        ("BOMA_IT_IMAGE_URL", _url, IMAGE_URL, "image to fetch with BOMA_IT_IMAGE_SOURCE=fetch"),
        ("BOMA_IT_SHA_URL", _url, SHA_URL, "its SHA512SUMS"),
        ("BOMA_IT_MAX_VMS", _int_range(1, 64), 1, "harness VMs allowed at once"),
        (
            "BOMA_IT_ANSIBLE_PLAYBOOK",
            _as_is,
            "",
            "ansible-playbook to use (default: PATH, then .venv)",
        ),
        (
            "BOMA_IT_ANSIBLE_STRATEGY",
            _choice(*STRATEGY_CHOICES),
            "mitogen",
            "Ansible transport: mitogen (falls back to linear when it cannot load) | default; "
            "--strategy wins (ADR-027)",
        ),
        ("BOMA_IT_POLL", _seconds(0.001, 60), DEFAULT_POLL, "poll interval of bounded waits (s)"),
        ("BOMA_IT_SSH_PORT", _int_range(1, 65535), 22, "guest SSH port"),
        (
            "BOMA_IT_RAM_FLOOR_MIB",
            _int_range(0, 1 << 24),
            RAM_FLOOR_MIB,
            "MemAvailable that must remain after the VM's memory",
        ),
        (
            "BOMA_IT_MIN_DISK_MIB",
            _int_range(0, 1 << 30),
            None,
            f"free disk required (default {MIN_DISK_MIB_RUN}, + {MIN_DISK_MIB_IMAGE} "
            "to build an image)",
        ),
        (
            "BOMA_IT_SLOW_BOOT_FACTOR",
            _float_range(1.0, 100.0),
            1.5,
            "warn when a reboot takes this many times the last passing run's time to `running`",
        ),
        (
            "BOMA_IT_SLOW_BOOT_SLACK",
            _seconds(),
            15.0,
            "... and at least this many seconds more (both must hold)",
        ),
        (
            "BOMA_IT_CHECKPOINTS",
            _on_off,
            True,
            "0/off/no: neither resume from nor write checkpoints",
        ),
        (
            "BOMA_IT_NETNS",
            _as_is,
            "",
            "set by scripts/it-run: the sandbox namespace (inspection hints)",
        ),
        (
            "BOMA_IT_NET_SUBNET",
            net_subnet,
            DEFAULT_NET_SUBNET,
            "the harness network's IPv4 /24 (must not overlap the host's networks; "
            "= the integration_test role's integration_test__network_subnet)",
        ),
        (
            "BOMA_IT_MEMINFO",
            _abs_path,
            pathlib.Path("/proc/meminfo"),
            "meminfo the RAM guard reads (tests)",
        ),
        (
            "BOMA_IT_KVM_DEV",
            _abs_path,
            pathlib.Path("/dev/kvm"),
            "KVM device the accelerator check reads (tests)",
        ),
        (
            "BOMA_IT_BOOT_ID_PATH",
            _abs_path,
            pathlib.Path("/proc/sys/kernel/random/boot_id"),
            "host boot id that keys the cached KVM probe (tests)",
        ),
        (
            "BOMA_IT_LIBVIRT_LOG_DIR",
            _abs_path,
            pathlib.Path("/var/log/libvirt/qemu"),
            "libvirt's per-domain QEMU logs (diagnostics)",
        ),
    ) + tuple(
        (timeout_var(stage), _bound(stage), None, f"bound of {stage} in seconds")
        for stage in DEFAULT_BOUNDS
    )

    def read_settings(environ):
        """Parse every SETTINGS variable; the first bad one is a UsageError naming it. An empty
        value is the default, except for paths (an empty path would mean the current dir)."""
        values = {}
        for name, parse, default, _ in Env.SETTINGS:
            raw = environ.get(name)
            if raw is None or (
                raw == "" and parse not in (Env._abs_path, Env._dir_path, Env._cache_path)
            ):
                values[name] = parse(default()) if callable(default) else default
                continue
            try:
                values[name] = parse(raw)
            except ValueError as e:
                shown = raw if len(raw) <= 40 else raw[:40] + "..."
                raise UsageError(f"{name}={shown!r}: {e}") from None
        return Settings(types.MappingProxyType(values))

    def env_help():
        """The environment part of --help, from SETTINGS."""
        lines = ["environment:"]
        for name, _, default, text in Env.SETTINGS:
            if name.startswith("BOMA_IT_TIMEOUT_"):
                continue
            shown = (
                ""
                if callable(default)
                or isinstance(default, bool)
                or default in (None, "")
                or len(str(default)) > 32
                else f" (default {default})"
            )
            lines.append(f"  {name:<25} {text}{shown}")
        stages = ", ".join(f"{k}={v}" for k, v in DEFAULT_BOUNDS.items())
        lines.append(
            "  BOMA_IT_TIMEOUT_<STAGE>   bound in seconds, e.g. BOMA_IT_TIMEOUT_DHCP_LEASE=300;\n"
            f"                            defaults (KVM; TCG scales boot-ish ones x{TCG_SCALE}):"
        )
        lines += ["    " + ln for ln in textwrap.wrap(stages, 84)]
        lines.append(
            "  BOMA_VAULT_PASSWORD_FILE  production vault password file, only for --certs "
            "le-staging /\n                            le-prod-wildcard (else "
            "scripts/vault-password.sh asks rbw)"
        )
        return "\n".join(lines) + "\n"

    def stage_bounds(accel, settings):
        """Per-stage bounds; a BOMA_IT_TIMEOUT_<STAGE> in settings (a Settings, or an environ
        mapping, parsed through SETTINGS) wins over the default and its TCG scaling."""
        if not isinstance(settings, Settings):
            settings = Env.read_settings(settings)
        bounds = {}
        for k, v in DEFAULT_BOUNDS.items():
            bounds[k] = settings.timeouts.get(
                k, float(v * (TCG_SCALE if accel == "tcg" and k in TCG_SCALED else 1))
            )
        return bounds

    def ctx_from_env(environ, args):
        """The settings (every BOMA_IT_* parsed and checked) and the context built on them."""
        st = Env.read_settings(environ)
        accel = args.accel or st["BOMA_IT_ACCEL"]
        strategy = args.strategy or st["BOMA_IT_ANSIBLE_STRATEGY"]
        return Ctx(
            repo=REPO_ROOT,
            run_parent=st["BOMA_IT_RUN_DIR"],
            cache=st["BOMA_IT_CACHE"],
            diag_root=st["BOMA_IT_DIAG_DIR"],
            uri=args.connect or st["LIBVIRT_DEFAULT_URI"],
            environ=dict(environ),
            accel_request=accel,
            strategy_request=strategy,
            poll=st["BOMA_IT_POLL"],
            max_vms=st["BOMA_IT_MAX_VMS"],
            ssh_port=st["BOMA_IT_SSH_PORT"],
            settings=st,
            default_bounds=Env.stage_bounds("kvm", st),
        )

    def progress(ctx, phase, msg):
        print(f"[{time.monotonic() - ctx.t0:7.1f}s] {phase}: {msg}", file=sys.stderr, flush=True)

    def now_iso():
        return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    def owner_name():
        try:
            import pwd

            return pwd.getpwuid(os.getuid()).pw_name
        except (KeyError, ImportError):
            return str(os.getuid())


@dataclasses.dataclass(frozen=True)
class Settings:
    """The parsed SETTINGS, by variable name (read once, never changed)."""

    values: types.MappingProxyType

    def __getitem__(self, name):
        return self.values[name]

    @property
    def timeouts(self):
        return {
            st: self.values[timeout_var(st)]
            for st in DEFAULT_BOUNDS
            if self.values[timeout_var(st)] is not None
        }


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Process-wide configuration (frozen): the settings, paths, libvirt URI, environment,
    poll interval; a session binds a copy to its Run (run_session)."""

    repo: pathlib.Path
    run_parent: pathlib.Path
    cache: pathlib.Path
    diag_root: pathlib.Path
    uri: str
    environ: dict
    accel_request: str = "auto"
    poll: float = DEFAULT_POLL
    max_vms: int = 1
    ssh_port: int = 22
    strategy_request: str = "mitogen"
    t0: float = dataclasses.field(default_factory=time.monotonic)
    default_bounds: dict = dataclasses.field(default_factory=dict)  # before a run's accel
    settings: Settings = None  # read_settings(environ) unless given
    # The Run this context is bound to: run_session binds a copy of the process's Ctx to
    # its Run (None outside a session). The low-level helpers (virsh, the waits,
    # run_playbook) read the run's bounds, command log and resolved strategy through it
    # (ctx.bounds, ctx.cmdlog); everything else takes the run explicitly.
    session: object = None  # the active Run (run_session binds it)

    def __post_init__(self):
        if self.settings is None:
            object.__setattr__(self, "settings", Env.read_settings(self.environ))

    @property
    def bounds(self):
        """The active run's per-stage bounds (its accelerator's), else the defaults."""
        return self.session.bounds if self.session is not None else self.default_bounds

    @property
    def cmdlog(self):
        """The active run's command log (logs/commands.log in its dir), else None."""
        return self.session.cmdlog if self.session is not None else None

    def path_env(self, name):
        return pathlib.Path(self.settings[name])


@dataclasses.dataclass(frozen=True)
class Options:
    """The command line, parsed once (main) and never changed: every flag of every
    subcommand, each with the value a subcommand that does not take it runs with. A step
    that needs another value makes a copy (dataclasses.replace), as the bench's legs do."""

    cmd: str = None
    connect: str = None  # --connect: the libvirt URI (else LIBVIRT_DEFAULT_URI)
    accel: str = None
    strategy: str = None
    host: str = None
    run: str = None
    certs: str = None
    allow_prod_certs: bool = False
    keep: bool = False
    junit: str = None
    reboot: str = None
    reboot_diff: str = "fail"
    no_reboot: bool = False
    no_idempotence: bool = False
    no_checkpoints: bool = False
    expect_fail: str = None
    from_ref: str = None
    warm_edit: str = None
    no_warm: bool = True  # only bench warms
    fresh: bool = False
    force: bool = False
    images: bool = False
    lines: int = 60
    run_dir: str = None

    @classmethod
    def from_args(cls, namespace):
        """From argparse's namespace; a flag the class does not declare is a TypeError."""
        return cls(**vars(namespace))


# --------------------------------------------------------------------------------------
# Profile: a host's profile files, merged, type-checked, and their paths confined
# --------------------------------------------------------------------------------------
# A profile (tests/integration/profiles/<host>.json, read by the stdlib's json module)
# names the host's groups, applies, stub files, reboots, tolerances and verify playbook;
# the cert tier (--certs) adds its vars file and the vault values (extra_vars_files).


class Profiles:
    """The Profile section as a namespace (its functions called on the class, never an
    instance): loading, merging and validating profile files, confined paths."""

    PROFILE_KEYS = {
        "groups": list,
        "applies": list,
        "extra_vars_files": list,
        "mem_mib": int,
        "vcpus": int,
        "extends": str,
        "reboot": list,
        "reboot_diff_tolerate": (dict, list),
        "verify": str,
        "description": str,
        "reboot_settled_when": str,
    }
    PROFILE_REQUIRED = ("groups", "applies")

    def _rel(path, root=None):
        try:
            return str(pathlib.Path(path).relative_to(root or REPO_ROOT))
        except ValueError:
            return str(path)

    def parse_profile_text(text, path, root=None):
        """JSON -> dict, malformed JSON -> UsageError naming file and line."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(
                f"profile {Profiles._rel(path, root)}: invalid JSON at line {e.lineno} column "
                f"{e.colno}: {e.msg}"
            ) from None
        except (ValueError, RecursionError) as e:  # a 4,300-digit integer, 100k-deep nesting
            raise UsageError(
                f"profile {Profiles._rel(path, root)}: invalid JSON: "
                f"{str(e).splitlines()[0][:120] or type(e).__name__}"
            ) from None
        if not isinstance(data, dict):
            raise UsageError(
                f"profile {Profiles._rel(path, root)}: top level must be a JSON object"
            )
        return data

    def check_tolerance_spec(value, where):
        """Validate a `reboot_diff_tolerate` value; UsageError naming `where`."""
        if isinstance(value, list):
            groups = {"*": value}
        else:
            unknown = sorted(set(value) - set(Reboot.REBOOT_DIFF_CATEGORIES))
            if unknown:
                raise UsageError(
                    f"{where}: key 'reboot_diff_tolerate' has unknown categories "
                    f"{unknown} (known: {', '.join(Reboot.REBOOT_DIFF_CATEGORIES)})"
                )
            groups = value
        for cat, pats in groups.items():
            if not isinstance(pats, list) or not all(isinstance(p, str) and p for p in pats):
                raise UsageError(
                    f"{where}: key 'reboot_diff_tolerate' entries must be lists of "
                    f"non-empty regex strings (category {cat!r})"
                )
            for p in pats:
                try:
                    re.compile(p)
                except re.error as e:
                    raise UsageError(
                        f"{where}: key 'reboot_diff_tolerate' has an invalid regex {p!r}: {e}"
                    ) from None

    def check_profile_types(data, path, root=None):
        """Type-check the keys one profile file sets (not yet merged)."""
        where = f"profile {Profiles._rel(path, root)}"
        for key, value in data.items():
            if key.startswith("_"):
                continue
            if key not in Profiles.PROFILE_KEYS:
                raise UsageError(
                    f"{where}: unknown key {key!r} "
                    f"(known: {', '.join(sorted(Profiles.PROFILE_KEYS))})"
                )
            want = Profiles.PROFILE_KEYS[key]
            if isinstance(value, bool) or not isinstance(value, want):
                tname = (
                    want.__name__ if isinstance(want, type) else "/".join(t.__name__ for t in want)
                )
                raise UsageError(
                    f"{where}: key {key!r} must be {tname}, got {type(value).__name__}"
                )
        for key in ("groups", "extra_vars_files"):
            if key in data and not all(isinstance(x, str) and x for x in data[key]):
                raise UsageError(f"{where}: key {key!r} must be a list of non-empty strings")
        if "groups" in data and not all(re.fullmatch(r"[A-Za-z0-9_]+", g) for g in data["groups"]):
            raise UsageError(f"{where}: key 'groups' holds an invalid group name")
        for i, step in enumerate(data.get("applies", [])):
            if not isinstance(step, dict) or not isinstance(step.get("playbook"), str):
                raise UsageError(f"{where}: key 'applies[{i}].playbook' missing or not a string")
            tags = step.get("tags", [])
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise UsageError(f"{where}: key 'applies[{i}].tags' must be a list of strings")
            step_files = step.get("extra_vars_files", [])
            if not isinstance(step_files, list) or not all(
                isinstance(f, str) and f for f in step_files
            ):
                raise UsageError(
                    f"{where}: key 'applies[{i}].extra_vars_files' "
                    "must be a list of non-empty strings"
                )
            extra = set(step) - {"playbook", "tags", "extra_vars_files"}
            if extra:
                raise UsageError(f"{where}: key 'applies[{i}]' has unknown keys {sorted(extra)}")
        for mode in data.get("reboot", []):
            if mode not in REBOOT_MODES:
                raise UsageError(
                    f"{where}: key 'reboot' entries must be one of "
                    f"{', '.join(REBOOT_MODES)}, got {mode!r}"
                )
        if "reboot_diff_tolerate" in data:
            Profiles.check_tolerance_spec(data["reboot_diff_tolerate"], f"{where}")
        settled = data.get("reboot_settled_when")
        if settled is not None and not (0 < len(settled) <= 500 and settled.isprintable()):
            raise UsageError(
                f"{where}: key 'reboot_settled_when' must be one line of shell, 1-500 "
                "printable characters"
            )
        for key, lo, hi in (("mem_mib", 512, 1 << 20), ("vcpus", 1, 256)):
            if key in data and data[key] < lo:
                raise UsageError(f"{where}: key {key!r} must be >= {lo}")
            if key in data and data[key] > hi:
                raise UsageError(f"{where}: key {key!r} must be <= {hi}")

    def merge_profiles(parent, child):
        """Shallow merge; lists in the child replace the parent's, except extra_vars_files,
        which the child APPENDS to the parent's."""
        merged = dict(parent)
        for k, v in child.items():
            if k == "extends":
                continue
            if k == "extra_vars_files":
                merged[k] = list(parent.get(k, [])) + list(v)
            else:
                merged[k] = v
        return merged

    def resolved_under(path, root):
        """`path` with every symlink resolved, if that lies under `root` (resolved too), else
        None: what a profile, flag or state file names must stay inside its tree."""
        try:
            real, base = pathlib.Path(path).resolve(), pathlib.Path(root).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        return real if real == base or base in real.parents else None

    def _read_profile(path, root):
        try:
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(
                f"profile {Profiles._rel(path, root)}: not UTF-8 (byte {e.start})"
            ) from None
        except OSError as e:
            raise UsageError(
                f"profile {Profiles._rel(path, root)}: not readable: {e.strerror or e}"
            ) from None

    def check_profile_paths(merged, top, repo_root):
        """Every file a merged profile names exists and resolves inside the repository."""
        for i, step in enumerate(merged["applies"]):
            pb = repo_root / "playbooks" / step["playbook"]
            if Profiles.resolved_under(pb, repo_root) is None:
                raise UsageError(
                    f"profile {Profiles._rel(top, repo_root)}: key 'applies[{i}].playbook' "
                    f"names {step['playbook']!r}, which resolves outside the repository"
                )
            if not pb.is_file():
                raise UsageError(
                    f"profile {Profiles._rel(top, repo_root)}: key 'applies[{i}].playbook' names "
                    f"playbooks/{step['playbook']}, which does not exist"
                )
        step_files = [f for step in merged["applies"] for f in step.get("extra_vars_files", [])]
        for f in merged["extra_vars_files"] + step_files:
            if Profiles.resolved_under(repo_root / "tests" / "integration" / f, repo_root) is None:
                raise UsageError(
                    f"profile {Profiles._rel(top, repo_root)}: key 'extra_vars_files' names "
                    f"{f!r}, which resolves outside the repository"
                )
            if not (repo_root / "tests" / "integration" / f).is_file():
                raise UsageError(
                    f"profile {Profiles._rel(top, repo_root)}: key 'extra_vars_files' names "
                    f"tests/integration/{f}, which does not exist"
                )
        if Profiles.resolved_under(repo_root / merged["verify"], repo_root) is None:
            raise UsageError(
                f"profile {Profiles._rel(top, repo_root)}: key 'verify' names "
                f"{merged['verify']!r}, which resolves outside the repository"
            )
        if not (repo_root / merged["verify"]).is_file():
            raise UsageError(
                f"profile {Profiles._rel(top, repo_root)}: verify playbook {merged['verify']} "
                "does not exist"
            )

    def _missing_profile(chain, name, path, profile_dir, rel):
        """The UsageError for a profile file that is not there (named, or by `extends`)."""
        known = sorted(p.stem for p in profile_dir.glob("*.json")) if profile_dir.is_dir() else []
        if chain:
            return UsageError(
                f"profile {rel(chain[-1][1])}: key 'extends' names "
                f"{name!r} but there is no {rel(path)}"
            )
        return UsageError(f"no profile {rel(path)} (known: {', '.join(known) or 'none'})")

    def load_profile(host, profile_dir=None, repo_root=None, read=None):
        """Load, resolve `extends`, validate. Returns the merged profile dict with `name`
        and `path`. Every problem is a UsageError naming the file (and key)."""
        profile_dir = pathlib.Path(profile_dir or PROFILE_DIR)
        repo_root = pathlib.Path(repo_root or REPO_ROOT)
        read = read or (lambda p: Profiles._read_profile(p, repo_root))

        def rel(p):
            return Profiles._rel(p, repo_root)

        if not re.fullmatch(HOST_RE, host or ""):
            raise UsageError(f"invalid host name {host!r} (lower-case letters, digits, - and _)")
        chain, name = [], host
        while name is not None:
            if not re.fullmatch(HOST_RE, name):
                raise UsageError(
                    f"profile {rel(chain[-1][1])}: key 'extends' must name "
                    "a profile (lower-case letters, digits, - and _)"
                )
            path = profile_dir / f"{name}.json"
            if name in [n for n, _, _ in chain]:
                raise UsageError(
                    f"profile {rel(path)}: 'extends' cycle "
                    f"({' -> '.join([n for n, _, _ in chain] + [name])})"
                )
            if not path.is_file():
                raise Profiles._missing_profile(chain, name, path, profile_dir, rel)
            if Profiles.resolved_under(path, profile_dir) is None:
                raise UsageError(
                    f"profile {rel(path)}: resolves outside "
                    f"{rel(profile_dir)} (via 'extends' or a symlink)"
                )
            data = Profiles.parse_profile_text(read(path), path, repo_root)
            Profiles.check_profile_types(data, path, repo_root)
            chain.append((name, path, data))
            name = data.get("extends")
        merged = {}
        for _, _, data in reversed(chain):
            merged = Profiles.merge_profiles(merged, data)
        top = chain[0][1]
        for key in Profiles.PROFILE_REQUIRED:
            if not merged.get(key):
                raise UsageError(f"profile {rel(top)}: missing required key {key!r}")
        merged.setdefault("extra_vars_files", [])
        merged.setdefault("mem_mib", DEFAULT_MEM_MIB)
        merged.setdefault("vcpus", DEFAULT_VCPUS)
        merged.setdefault("reboot", ["graceful"])
        merged.setdefault("verify", DEFAULT_VERIFY)
        Profiles.check_profile_paths(merged, top, repo_root)
        merged["name"] = host
        merged["root"] = chain[-1][0]  # whose booted checkpoint it shares (ADR-031)
        merged["path"] = str(top)
        return merged

    def extra_vars_files(profile, tier, integ_dir=None, vault_values=None, step=None):
        """Ordered -e @files: profile files, then the apply `step`'s own, then the cert tier,
        then test vault values (except for REAL_SECRET_TIERS, which use the production vault)."""
        integ_dir = pathlib.Path(integ_dir or INTEG_DIR)
        files = [integ_dir / f for f in profile["extra_vars_files"]]
        files += [integ_dir / f for f in (step or {}).get("extra_vars_files", [])]
        files.append(integ_dir / "certs" / f"{tier}.yml")
        vault_values = pathlib.Path(vault_values or TEST_VAULT_VALUES)
        if tier not in REAL_SECRET_TIERS and vault_values.is_file():
            files.append(vault_values)
        return files


# --------------------------------------------------------------------------------------
# Image: the golden image, built (mmdebstrap recipe) or fetched, keyed and published
# --------------------------------------------------------------------------------------
# The recipe and its key (a rebuild only when an input changes), the build and the fetch,
# and the atomic publish into the cache.


class Images:
    """The Image section as a namespace (its functions called on the class, never an instance):
    the golden image's recipe, key, build, fetch and publish."""

    # Golden image recipe (source "build"). Bump IMAGE_RECIPE_VERSION whenever the build
    # procedure changes in a way the inputs below do not capture.
    IMAGE_RECIPE_VERSION = 2
    IMAGE_SUITE = "trixie"
    IMAGE_DISK_SIZE = "8G"
    # The package classes of Debian's genericcloud trixie image (ADR-028), and the few
    # packages the harness adds to them, each with its reason. Nothing a role installs.
    IMAGE_REFERENCE_LIST = "tests/integration/image/debian-cloud-13-packages.txt"
    IMAGE_EXTRAS_LIST = "tests/integration/image/image-extras.txt"
    _PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
    KERNEL_ARGS = "root=LABEL=root ro console=ttyS0,115200n8"
    # The root filesystem's partition starts at 1 MiB; the MBR gap before it holds GRUB's
    # core.img (sector 1 on), as grub-install would embed it.
    PARTITION_OFFSET = 1 << 20
    CLOUD_CFG = """# boma integration golden image (scripts/integration-vm.py)
datasource_list: [NoCloud, None]
"""
    FSTAB = "LABEL=root / ext4 defaults 0 1\n"
    SSHD_IMAGE_CONF = """# boma golden image: keys only (the base role hardens the rest).
PasswordAuthentication no
KbdInteractiveAuthentication no
"""
    # As Debian's cloud image: apt's daily timers run unattended-upgrades.
    AUTO_UPGRADES = """APT::Periodic::Update-Package-Lists "1";
APT::Periodic::Unattended-Upgrade "1";
"""
    # The first boot's GRUB menu: the /vmlinuz and /initrd.img symlinks, which a kernel
    # package's postinst moves to the newest kernel. The guest's own update-grub (run by
    # /etc/kernel/postinst.d/zz-update-grub once this file exists) replaces it on the first
    # kernel install, as on a provider's image.
    GRUB_CFG = f"""# boma golden image: first-boot menu (the guest's update-grub replaces it)
set timeout=0
serial --speed=115200
terminal_input console serial
terminal_output console serial
menuentry 'Debian GNU/Linux' {{
  search --no-floppy --label root --set=root
  linux /vmlinuz {KERNEL_ARGS}
  initrd /initrd.img
}}
"""
    # GRUB's i386-pc modules where grub.cfg's insmod finds them, and core.img built by the
    # image's own grub-mkimage; both run inside the built root (mmdebstrap customize hooks).
    GRUB_HOOKS = (
        'mkdir -p "$1/boot/grub/i386-pc" && cp "$1"/usr/lib/grub/i386-pc/*.mod '
        '"$1"/usr/lib/grub/i386-pc/*.lst "$1"/usr/lib/grub/i386-pc/boot.img '
        '"$1/boot/grub/i386-pc/"',
        'chroot "$1" grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img '
        "-p '(hd0,msdos1)/boot/grub' biosdisk part_msdos ext2 search search_label",
    )

    def read_package_list(path, need_reason=False):
        """Package names from a list file: one per line, `#` comments and blank lines
        skipped. With need_reason, every package line must carry a `# reason`."""
        path = REPO_ROOT / path
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise UsageError(f"image: cannot read {path}: {e.strerror}") from None
        names = []
        for n, line in enumerate(lines, 1):
            name, _, reason = line.partition("#")
            name = name.strip()
            if not name:
                continue
            if not Images._PACKAGE_NAME.fullmatch(name) or (need_reason and not reason.strip()):
                want = "`package  # reason`" if need_reason else "one package name"
                raise UsageError(f"image: {path.name}:{n}: want {want}, got {line.strip()!r}")
            names.append(name)
        return names

    def reference_packages():
        return Images.read_package_list(Images.IMAGE_REFERENCE_LIST)

    def extra_packages():
        return Images.read_package_list(Images.IMAGE_EXTRAS_LIST, need_reason=True)

    def image_packages():
        """The reference list and the extras, exactly: what mmdebstrap --include installs."""
        return sorted(set(Images.reference_packages()) | set(Images.extra_packages()))

    def seal_spec():
        """Everything the sealing step does to the root, as data (part of the image key).
        The network is cloud-init's (its fallback config, rendered through netplan to
        systemd-networkd, as on Debian's cloud image); the empty machine-id gives every clone
        its own DHCP client id. Every timer the packages enable stays enabled."""
        unit_dir = "/usr/lib/systemd/system"
        return {
            "files": {
                "etc/cloud/cloud.cfg.d/90-boma.cfg": Images.CLOUD_CFG,
                "etc/apt/apt.conf.d/20auto-upgrades": Images.AUTO_UPGRADES,
                "boot/grub/grub.cfg": Images.GRUB_CFG,
                "etc/fstab": Images.FSTAB,
                "etc/machine-id": "",
                "etc/ssh/sshd_config.d/05-boma-image.conf": Images.SSHD_IMAGE_CONF,
            },
            "symlinks": {
                f"etc/systemd/system/{link}": f"{unit_dir}/{unit}"
                for link, unit in (
                    (
                        "multi-user.target.wants/systemd-networkd.service",
                        "systemd-networkd.service",
                    ),
                    ("sockets.target.wants/systemd-networkd.socket", "systemd-networkd.socket"),
                    (
                        "network-online.target.wants/systemd-networkd-wait-online.service",
                        "systemd-networkd-wait-online.service",
                    ),
                    ("dbus-org.freedesktop.network1.service", "systemd-networkd.service"),
                    (
                        "multi-user.target.wants/systemd-resolved.service",
                        "systemd-resolved.service",
                    ),
                    ("dbus-org.freedesktop.resolve1.service", "systemd-resolved.service"),
                )
            }
            | {"etc/resolv.conf": "../run/systemd/resolve/stub-resolv.conf"},
            "remove_globs": ["etc/ssh/ssh_host_*", "var/lib/dbus/machine-id"],
        }

    def image_inputs(mirror=DEFAULT_MIRROR, suite=IMAGE_SUITE):
        return {
            "recipe_version": Images.IMAGE_RECIPE_VERSION,
            "source": "build",
            "suite": suite,
            "mirror": mirror,
            "packages": Images.image_packages(),
            "seal": Images.seal_spec(),
            "disk_size": Images.IMAGE_DISK_SIZE,
            "kernel_args": Images.KERNEL_ARGS,
            "boot_hooks": list(Images.GRUB_HOOKS),
        }

    def image_key(inputs):
        blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def fetch_inputs(url=IMAGE_URL):
        return {"recipe_version": Images.IMAGE_RECIPE_VERSION, "source": "fetch", "url": url}

    def mmdebstrap_argv(suite, root, mirror, packages, hooks=GRUB_HOOKS):
        """minbase plus `packages`, without Recommends (mmdebstrap's default, as the
        reference's install-norec), then the boot-loader hooks inside the root."""
        return [
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(packages),
            *(f"--customize-hook={h}" for h in hooks),
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            # Keep the package lists: a role's apt task within the hour needs no
            # `apt-get update` (~30 s under TCG); older lists are refreshed by
            # cache_valid_time as on any host.
            "--skip=cleanup/apt/lists",
            suite,
            str(root),
            mirror,
        ]

    def mkfs_argv(root, raw, disk_bytes, offset=PARTITION_OFFSET):
        """ext4 from `root` into the disk's one partition: it starts at `offset` and ends
        with the disk (a filesystem larger than its partition fails at boot: bad geometry)."""
        size_k = (disk_bytes - offset) // 1024
        return [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "root",
            "-E",
            f"offset={offset}",
            "-d",
            str(root),
            str(raw),
            f"{size_k}k",
        ]

    def mbr_bytes(boot_img, disk_bytes, offset=PARTITION_OFFSET):
        """The first sector: GRUB's boot.img code (first 440 bytes; its defaults load core.img
        from sector 1), a disk signature, one bootable Linux partition from `offset` to the
        end of the disk, and the 0x55AA mark."""
        if len(boot_img) < 440:
            raise InfraError("image", f"GRUB boot.img is {len(boot_img)} bytes, want 512")
        start, count = offset // 512, (disk_bytes - offset) // 512
        entry = struct.pack("<B3sB3sII", 0x80, b"\x20\x21\x00", 0x83, b"\xfe\xff\xff", start, count)
        return boot_img[:440] + b"boma" + b"\0\0" + entry + bytes(48) + b"\x55\xaa"

    def qemu_img_convert_argv(raw, qcow2):
        return ["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)]

    def size_bytes(spec):
        m = re.fullmatch(r"(\d+)([KMGT]?)", spec)
        if not m:
            raise ValueError(f"bad size {spec!r}")
        return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")

    def find_boot_file(root, link_name, prefix):
        """Resolve /vmlinuz (or /initrd.img) INSIDE root, else the newest /boot/<prefix>-*."""
        root = pathlib.Path(root)
        link = root / link_name
        if link.is_symlink():
            target = pathlib.PurePosixPath(os.readlink(link))
            cand = root / target.relative_to("/") if target.is_absolute() else root / target
            if cand.is_file():
                return cand
        cands = sorted(
            (root / "boot").glob(f"{prefix}-*"),
            key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)],
        )
        return cands[-1] if cands else None

    def _expected_sha(sha_text, filename):
        for line in sha_text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == filename:
                return parts[0]
        return None

    def image_source(ctx):
        return ctx.settings["BOMA_IT_IMAGE_SOURCE"]

    def current_image_key(ctx):
        if Images.image_source(ctx) == "fetch":
            return Images.image_key(Images.fetch_inputs(ctx.settings["BOMA_IT_IMAGE_URL"]))
        return Images.image_key(Images.image_inputs(ctx.settings["BOMA_IT_MIRROR"]))

    def image_from_dir(d, key):
        kernel, initrd = d / "vmlinuz", d / "initrd.img"
        return Image(
            d,
            d / "disk.qcow2",
            kernel if kernel.is_file() else None,
            initrd if initrd.is_file() else None,
            key,
        )

    def ensure_image(ctx, force=False):
        """The golden image for the current inputs, building/fetching it if missing."""
        src = Images.image_source(ctx)
        key = Images.current_image_key(ctx)
        dest = Utilities.owned_path(ctx.cache, "images", key)
        with Utilities.file_lock(ctx, ctx.cache / "image.lock", "image"):
            if (dest / "manifest.json").is_file() and not force:
                return Images.image_from_dir(dest, key)
            if dest.exists():
                shutil.rmtree(dest)
            (Images.build_image if src == "build" else Images.fetch_image)(ctx, key, dest)
        img = Images.image_from_dir(dest, key)
        img.built = True
        return img

    def apply_seal(root, spec):
        root = pathlib.Path(root)
        for pattern in spec["remove_globs"]:
            for p in root.glob(pattern):
                if p.is_file() or p.is_symlink():
                    p.unlink()
        for rel, content in spec["files"].items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.is_symlink():
                p.unlink()
            p.write_text(content)
        for rel, target in spec["symlinks"].items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.is_symlink() or p.exists():
                p.unlink()
            p.symlink_to(target)

    def build_image(ctx, key, dest):
        """mmdebstrap a trixie root, seal it, copy out kernel+initrd, make an ext4 qcow2.
        Everything lands in a temp dir renamed atomically to images/<key>/."""
        mirror = ctx.settings["BOMA_IT_MIRROR"]
        inputs = Images.image_inputs(mirror)
        tmp = ctx.cache / "images" / f".tmp-{key}-{os.getpid()}"
        t0 = time.monotonic()
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            root = tmp / "root"
            Env.progress(ctx, "image", f"building golden image {key} from {mirror} (mmdebstrap)")
            run(
                Images.mmdebstrap_argv(Images.IMAGE_SUITE, root, mirror, Images.image_packages()),
                timeout=ctx.bounds["image-build"],
                check=True,
                stage="image",
                stream_log=tmp / "build.log",
                cmdlog=ctx.cmdlog,
            )
            Images.apply_seal(root, inputs["seal"])
            Images._copy_boot_files(root, tmp)
            Images._make_disk(ctx, root, tmp)
            shutil.rmtree(root)
            sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
            Images.publish_image_dir(
                tmp,
                dest,
                {
                    "key": key,
                    "inputs": inputs,
                    "built_at": Env.now_iso(),
                    "build_seconds": round(time.monotonic() - t0, 1),
                    "sizes": sizes,
                },
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        Env.progress(ctx, "image", f"built {dest} in {time.monotonic() - t0:.0f}s")

    def _copy_boot_files(root, tmp):
        """Copy the built root's kernel and initrd out beside the disk (mode 644): only the
        accelerator probe boots them; the guest boots its own disk (GRUB)."""
        for link, prefix, out in (
            ("vmlinuz", "vmlinuz", "vmlinuz"),
            ("initrd.img", "initrd.img", "initrd.img"),
        ):
            src = Images.find_boot_file(root, link, prefix)
            if src is None:
                raise InfraError("image", f"no /boot/{prefix}-* in the built root")
            shutil.copyfile(src, tmp / out)
            os.chmod(tmp / out, 0o644)

    def _boot_code(root):
        """(boot.img, core.img) the image's grub-mkimage hook left in the built root."""
        d = pathlib.Path(root) / "boot" / "grub" / "i386-pc"
        try:
            boot, core = (d / "boot.img").read_bytes(), (d / "core.img").read_bytes()
        except OSError as e:
            raise InfraError("image", f"no GRUB boot code in the built root: {e}") from None
        if len(core) > Images.PARTITION_OFFSET - 512:
            raise InfraError(
                "image", f"GRUB core.img ({len(core)} bytes) does not fit before 1 MiB"
            )
        return boot, core

    def _make_disk(ctx, root, tmp):
        """The built root as the ext4 partition of an MBR disk that GRUB boots (BIOS), in
        tmp/disk.qcow2: boot.img in the MBR, core.img in the gap before the partition."""
        raw = tmp / "disk.raw"
        disk_bytes = Images.size_bytes(Images.IMAGE_DISK_SIZE)
        boot, core = Images._boot_code(root)
        with open(raw, "wb") as fh:
            fh.truncate(disk_bytes)
        run(
            Images.mkfs_argv(root, raw, disk_bytes),
            timeout=ctx.bounds["image-build"],
            check=True,
            stage="image",
            cmdlog=ctx.cmdlog,
        )
        with open(raw, "r+b") as fh:
            fh.write(Images.mbr_bytes(boot, disk_bytes))
            fh.write(core)
        run(
            Images.qemu_img_convert_argv(raw, tmp / "disk.qcow2"),
            timeout=ctx.bounds["image-build"],
            check=True,
            stage="image",
            cmdlog=ctx.cmdlog,
        )
        raw.unlink()

    def publish_image_dir(tmp, dest, manifest):
        """Finish a golden image staged in `tmp`: write its manifest, make it readable by
        libvirt's qemu user, and rename it into place atomically (a half-built image is
        never visible under images/<key>/)."""
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        os.chmod(tmp, 0o755)
        tmp.rename(dest)

    def _download(url, dest, deadline, bound):
        """url -> dest, the whole transfer bounded by `deadline` (time.monotonic()); each
        socket wait by what is left of it (at most 60 s)."""
        import urllib.request  # lazy: only the fetch source needs it

        def left():
            rest = deadline - time.monotonic()
            if rest <= 0:
                raise InfraError(
                    "image", f"download of {url} exceeded BOMA_IT_TIMEOUT_DOWNLOAD ({bound:g}s)"
                )
            return rest

        with urllib.request.urlopen(url, timeout=min(60.0, left())) as resp, open(dest, "wb") as fh:
            while True:
                chunk = resp.read(1 << 20)
                left()
                if not chunk:
                    return
                fh.write(chunk)

    def fetch_image(ctx, key, dest):
        """Download Debian's genericcloud qcow2 + SHA512SUMS; .part + rename; a mismatch
        deletes the download and refuses."""
        url = ctx.settings["BOMA_IT_IMAGE_URL"]
        sha_url = ctx.settings["BOMA_IT_SHA_URL"]
        name = url.rsplit("/", 1)[-1]
        tmp = ctx.cache / "images" / f".tmp-{key}-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        part = tmp / (name + ".part")
        try:
            Env.progress(ctx, "image", f"downloading {url}")
            try:
                deadline = time.monotonic() + ctx.bounds["download"]
                Images._download(url, part, deadline, ctx.bounds["download"])
                Images._download(sha_url, tmp / "SHA512SUMS", deadline, ctx.bounds["download"])
                sha_text = (tmp / "SHA512SUMS").read_text()
            except OSError as e:
                raise InfraError("image", f"download failed: {e}") from None
            want = Images._expected_sha(sha_text, name)
            if not want:
                raise InfraError("image", f"checksum for {name} not found at {sha_url}")
            h = hashlib.sha512()
            with open(part, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != want:
                raise InfraError(
                    "image", "golden image SHA512 mismatch — deleted, refusing to use it"
                )
            part.rename(tmp / "disk.qcow2")
            Images.publish_image_dir(
                tmp,
                dest,
                {
                    "key": key,
                    "inputs": Images.fetch_inputs(url),
                    "built_at": Env.now_iso(),
                    "sha512": want,
                },
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@dataclasses.dataclass
class Image:
    dir: pathlib.Path
    disk: pathlib.Path
    kernel: pathlib.Path = None
    initrd: pathlib.Path = None
    key: str = ""
    built: bool = False


# --------------------------------------------------------------------------------------
# Network and accelerator: the isolated libvirt network, DHCP leases, KVM or TCG
# --------------------------------------------------------------------------------------
# The harness's own NAT network, the lease table, and the accelerator choice (a cached
# probe keyed by the host's boot id).


class Network:
    """The Network section as a namespace (its functions called on the class, never an
    instance): the harness network, DHCP leases, KVM or TCG."""

    NET_NAME = "boma-it"

    # stp='off': the bridge holds only the harness's own VMs' taps, so there is no loop to
    # break, and with STP on Linux holds every new port (each `virsh start` or `restore` makes
    # one) in listening and learning for its minimum 2 s forward delay each. A restored guest
    # answered TCP 22 3.2 s after `virsh restore` returned with STP on, 0.01 s with it off.
    def net_xml(subnet=DEFAULT_NET_SUBNET):
        """The harness network's definition for `subnet` (a /24): the bridge takes .1 and
        libvirt's dnsmasq leases .10-.254. roles/integration_test defines the same shape."""
        p = Env.net_subnet(subnet).rsplit(".", 1)[0]
        return f"""<network>
  <name>boma-it</name>
  <forward mode='nat'/>
  <bridge name='virbr-boma' stp='off' delay='0'/>
  <ip address='{p}.1' netmask='255.255.255.0'>
    <dhcp><range start='{p}.10' end='{p}.254'/></dhcp>
  </ip>
</network>
"""

    NET_XML = net_xml()

    def ctx_net_xml(ctx):
        """The network this process's settings ask for (BOMA_IT_NET_SUBNET)."""
        return Network.net_xml(ctx.settings["BOMA_IT_NET_SUBNET"])

    def net_shape(xml):
        """What the harness relies on in a network definition (NAT, the bridge and its STP,
        the subnet and its DHCP range), libvirt's defaults filled in; {} when the XML does
        not parse. Libvirt adds a uuid and a MAC to what it was given: those are not compared."""
        try:
            el = ET.fromstring(xml)
        except ET.ParseError:
            return {}

        def attr(path, name, default=None):
            node = el.find(path)
            return None if node is None else node.get(name, default)

        return {
            "forward": attr("forward", "mode", "nat") or "isolated",
            "bridge": attr("bridge", "name"),
            "stp": attr("bridge", "stp", "on"),
            "delay": attr("bridge", "delay", "0"),
            "address": attr("ip", "address"),
            "netmask": attr("ip", "netmask"),
            "dhcp": f"{attr('ip/dhcp/range', 'start')}-{attr('ip/dhcp/range', 'end')}",
        }

    _UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)

    def net_drift(defined_xml, want_xml=NET_XML):
        """The fields where a defined network differs from `want_xml`, as `name=defined` texts."""
        want, have = Network.net_shape(want_xml), Network.net_shape(defined_xml)
        return [f"{k}={have.get(k)}" for k in want if have.get(k) != want[k]]

    def define_network(ctx):
        xml = ctx.cache / "net.xml"
        Utilities.write_owned(xml, Network.ctx_net_xml(ctx))
        virsh(ctx, "net-define", xml, check=True, stage="network")
        virsh(ctx, "net-autostart", Network.NET_NAME, stage="network")

    def network_drift(ctx):
        r = virsh(ctx, "net-dumpxml", "--inactive", Network.NET_NAME, check=True, stage="network")
        return ", ".join(Network.net_drift(r.stdout, Network.ctx_net_xml(ctx)))

    def redo_drifted_network(ctx):
        """A network an older harness defined (STP on, before 2026-12-05) is defined again
        from NET_XML; True if it was. Never under a VM: not while a harness VM exists
        (running, or defined and about to start) nor while any VM's NIC is on it; it then
        stays, and a line says so. Decided and done under the lock a run holds to define its
        VM, so two runs never redo it at once."""
        if not Network.network_drift(ctx):
            return False
        with Utilities.file_lock(ctx, ctx.cache / "lock", "network"):
            drift = Network.network_drift(
                ctx
            )  # again, under the lock: another run may have redone it
            if not drift:
                return False
            active = (
                Network.parse_net_info(virsh(ctx, "net-info", Network.NET_NAME).stdout).get(
                    "active"
                )
                == "yes"
            )
            users = ", ".join(sorted(Utilities.owned_domains(ctx)))
            if not users and active:  # an inactive network has no ports (a fresh libvirtd's)
                ports = virsh(ctx, "net-port-list", Network.NET_NAME, check=True, stage="network")
                users = "a VM's NIC" if Network._UUID.search(ports.stdout) else ""
            if users:
                Env.progress(
                    ctx,
                    "network",
                    f"{Network.NET_NAME} differs ({drift}); kept while in use: {users}",
                )
                return False
            if active:
                virsh(ctx, "net-destroy", Network.NET_NAME, check=True, stage="network")
            virsh(ctx, "net-undefine", Network.NET_NAME, check=True, stage="network")
            Network.define_network(ctx)
        Env.progress(ctx, "network", f"{Network.NET_NAME} redefined: it differed ({drift})")
        return True

    def ensure_network(ctx):
        """The harness's network, defined as NET_XML says and active."""
        r = virsh(ctx, "net-info", Network.NET_NAME)
        if r.returncode != 0:
            Network.define_network(ctx)
        if r.returncode != 0 or Network.redo_drifted_network(ctx):
            r = virsh(ctx, "net-info", Network.NET_NAME, check=True, stage="network")
        if Network.parse_net_info(r.stdout).get("active") != "yes":
            virsh(ctx, "net-start", Network.NET_NAME, check=True, stage="network")

    _LEASE_ROW = re.compile(
        r"^\s*\S+\s+([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5})\s+ipv4\s+(\d+\.\d+\.\d+\.\d+)",
        re.MULTILINE,
    )

    def parse_lease_ip(domifaddr_output, mac=None):
        """IPv4 address from `virsh domifaddr --source lease`; with `mac`, only that NIC's."""
        for m in Network._LEASE_ROW.finditer(domifaddr_output):
            if mac is None or m.group(1).lower() == mac.lower():
                return m.group(2)
        if mac is None:
            m = re.search(r"ipv4\s+(\d+\.\d+\.\d+\.\d+)", domifaddr_output)
            return m.group(1) if m else None
        return None

    def make_mac(rand3):
        """A locally administered libvirt-style MAC from three random bytes."""
        return "52:54:00:" + ":".join(f"{b:02x}" for b in rand3[:3])

    def parse_net_info(text):
        info = {}
        for line in (text or "").splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                info[k.strip().lower()] = v.strip()
        return info

    ACCEL_BAD_MARKERS = (
        "KVM internal error",
        "emulation failure",
        "Could not access KVM",
        "failed to initialize kvm",
        "failed to initialize KVM",
    )
    ACCEL_GOOD_MARKERS = ("VFS:", "Kernel panic", "Unable to mount root")

    def accel_probe_argv(kernel, qemu="qemu-system-x86_64"):
        return [
            qemu,
            "-accel",
            "kvm",
            "-machine",
            "q35",
            "-cpu",
            "host",
            "-m",
            "256",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 panic=-1 root=/dev/nonexistent",
        ]

    def classify_accel_probe(output, timed_out=False, bound=None):
        """('kvm'|'tcg', reason) from a KVM probe's serial output."""
        text = output or ""
        for marker in Network.ACCEL_BAD_MARKERS:
            if marker in text:
                return "tcg", f"KVM probe failed: {marker!r}"
        for marker in Network.ACCEL_GOOD_MARKERS:
            if marker in text:
                return "kvm", f"KVM probe booted a kernel to its root-mount panic ({marker!r})"
        if timed_out:
            return "tcg", f"KVM probe reached no root-mount panic within {bound}s"
        return "tcg", "KVM probe ended without reaching the kernel's root-mount panic"

    def kvm_group_accessible(mode, gid, kvm_gid):
        """Can libvirt's qemu user (group kvm) open /dev/kvm read-write?"""
        if mode & 0o006 == 0o006:
            return True
        return kvm_gid is not None and gid == kvm_gid and mode & 0o060 == 0o060

    def kvm_dev_status(ctx):
        """(exists, accessible_by_kvm_group, description)."""
        dev = ctx.path_env("BOMA_IT_KVM_DEV")
        try:
            st = dev.stat()
        except OSError:
            return False, False, f"{dev} absent"
        try:
            import grp

            kvm_gid = grp.getgrnam("kvm").gr_gid
            gname = grp.getgrgid(st.st_gid).gr_name
        except (KeyError, ImportError):
            kvm_gid, gname = None, str(st.st_gid)
        ok = Network.kvm_group_accessible(st.st_mode, st.st_gid, kvm_gid)
        return True, ok, f"{dev} mode {st.st_mode & 0o777:04o} group {gname}"

    def host_boot_id(ctx):
        try:
            return ctx.path_env("BOMA_IT_BOOT_ID_PATH").read_text().strip()
        except OSError:
            return "unknown"

    def choose_accel(ctx, image):
        """'kvm' or 'tcg', printed with the reason; auto verdicts cached per host boot."""
        if ctx.accel_request in ("kvm", "tcg"):
            verdict, reason = ctx.accel_request, "forced by --accel/BOMA_IT_ACCEL"
        else:
            verdict, reason = Network.probe_accel(ctx, image.kernel if image else None)
        Env.progress(ctx, "accel", f"{verdict} ({reason})")
        return verdict

    def probe_accel(ctx, kernel):
        exists, group_ok, desc = Network.kvm_dev_status(ctx)
        if not exists:
            return "tcg", f"{desc}; not probed"
        if kernel is None:
            host_kernels = sorted(pathlib.Path("/boot").glob("vmlinuz-*"))
            kernel = next((k for k in reversed(host_kernels) if os.access(k, os.R_OK)), None)
        cache_file = ctx.cache / "accel.json"
        key = {
            "boot_id": Network.host_boot_id(ctx),
            "kernel": str(kernel),
            "size": kernel.stat().st_size if kernel else None,
            "dev": desc,
        }
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key:
                return cached["verdict"], cached["reason"] + " [cached]"
        except (OSError, ValueError, KeyError):
            pass
        qemu = shutil.which("qemu-system-x86_64", path=ctx.environ.get("PATH"))
        if kernel is None or qemu is None:
            verdict, reason = (
                (
                    "tcg",
                    "not probed: no guest kernel yet (run `integration-vm "
                    "image`); a cycle probes KVM before it boots",
                )
                if group_ok
                else ("tcg", f"{desc}: libvirt's qemu user cannot open it")
            )
        else:
            bound = ctx.bounds["accel-probe"]
            r = run(Network.accel_probe_argv(kernel, qemu), timeout=bound, cmdlog=ctx.cmdlog)
            verdict, reason = Network.classify_accel_probe(r.stdout + r.stderr, r.timed_out, bound)
            if verdict == "kvm" and not group_ok and ctx.uri.startswith("qemu:///system"):
                verdict, reason = "tcg", f"KVM works but {desc}: libvirt's qemu user cannot open it"
        try:
            ctx.cache.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(
                json.dumps({"key": key, "verdict": verdict, "reason": reason, "at": Env.now_iso()})
                + "\n"
            )
        except OSError:
            pass
        return verdict, reason


# --------------------------------------------------------------------------------------
# Guest: a run's state, cloud-init, the argv to create and reach it, the wait helper
# --------------------------------------------------------------------------------------
# A run is one VM: its state dir (run.json, owned paths), its NoCloud seed and overlay,
# virt-install's and ssh's argv, wait_until (the one bounded poll), and what a reboot leaves
# (its warnings, the boot history). The VM's verbs are the Machine's (its own section).


class Guest:
    """The Guest section as a namespace (its functions called on the class, never an instance):
    a run's state files, cloud-init, virt-install and ssh argv, the wait helper, boot notes."""

    def vm_name(host, suffix=None):
        suffix = suffix or uuid.uuid4().hex[:8]
        return f"{NAME_PREFIX}{host}-{suffix}"

    # What one SSH command's output may hold (each of stdout and stderr, its tail kept): a
    # guest printing 128 MiB into a diagnostics command once took 410 MiB of the driver.
    GUEST_OUTPUT_MAX = 8 << 20

    def is_ipv4(value):
        """`value` is an IPv4 address written the one canonical way (no leading zeros, no
        padding, nothing around it)."""
        try:
            return isinstance(value, str) and str(ipaddress.IPv4Address(value)) == value
        except ValueError:
            return False

    def _count(lo):
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def _text(pattern):
        return lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None

    # What each field a state file (run.json, a checkpoint's manifest.json) carries must be
    # when it is read back: the driver runs as root, the files sit in a user's checkout or
    # cache, and their values reach virsh, ssh and the transient inventory.
    STATE_FIELD_CHECKS = {
        "ip": is_ipv4,
        "mac": _text(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}"),
        "host": _text(HOST_RE),
        "domain": _text(RUN_NAME_RE.pattern),
        "created_by": _text(RUN_NAME_RE.pattern),
        "accel": lambda v: v in ACCEL_CHOICES,
        "boot_id": _text(r"[0-9a-f-]{1,64}"),
        "mem_mib": _count(1),
        "vcpus": _count(1),
        "applied_steps": _count(0),
        "checkpoints_read": lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v),
    }
    # Text that would be code to Ansible's templating (Jinja's three openers) or to a
    # terminal (control characters) is no state the harness ever wrote.
    _HOSTILE_TEXT = re.compile(r"\{\{|\{%|\{#|[\x00-\x08\x0b-\x1f\x7f]")

    def hostile_text(value, depth=0):
        """The first string in `value` (any depth) that holds a template opener or a control
        character, or None."""
        if isinstance(value, str):
            return value if Guest._HOSTILE_TEXT.search(value) else None
        items = (
            value.items() if isinstance(value, dict) else value if isinstance(value, list) else ()
        )
        for item in items:
            for part in item if isinstance(value, dict) else (item,):
                found = None if depth > 20 else Guest.hostile_text(part, depth + 1)
                if found is not None:
                    return found
        return None

    def state_fields_problem(data, nullable=()):
        """Why a state file's fields are not what the harness writes (one field named), or
        None. Fields in `nullable` may also be null."""
        for key, ok in Guest.STATE_FIELD_CHECKS.items():
            if key in data and not (data[key] is None and key in nullable) and not ok(data[key]):
                return f"bad {key}"
        for key, value in data.items():
            if Guest.hostile_text({key: value}) is not None:
                return f"bad {key}: template or control characters"
        return None

    def run_data_problem(data, dirname):
        """Why a run.json found in .run/<dirname> is not one the harness wrote, or None."""
        if not isinstance(data, dict):
            return "not a JSON object"
        if data.get("name") != dirname or not RUN_NAME_RE.fullmatch(dirname):
            return "its name is not its directory's harness run name"
        for key in ("created_at", "state", "certs", "image", "profile", "owner", "kept_by"):
            if data.get(key) is not None and not isinstance(data[key], str):
                return f"bad {key}"
        return Guest.state_fields_problem(
            {"host": data.get("host"), **data}, nullable=("ip", "mac", "accel", "mem_mib", "vcpus")
        )

    def run_paths_problem(ctx, data):
        """Why a run.json's paths are not inside the trees the harness owns, or None."""
        image = data.get("image")
        if image is None:
            return None
        try:
            resolved = pathlib.Path(image).resolve()
            cache = ctx.cache.resolve()
        except (OSError, RuntimeError, ValueError):
            return "bad image"
        if not pathlib.Path(image).is_absolute() or not resolved.is_relative_to(cache):
            return f"bad image: not under {ctx.cache}"
        return None

    _SKIPPED_RUNS = set()

    def list_runs(ctx):
        """The runs under the run root: only real dirs holding a run.json that names that dir;
        anything else is skipped with one line (once)."""
        runs = []
        if not ctx.run_parent.is_dir():
            return runs
        for p in sorted(ctx.run_parent.iterdir()):
            f = p / "run.json"
            if p.is_symlink() or not p.is_dir() or not f.is_file():
                continue
            try:
                why = "run.json is a symlink" if f.is_symlink() else None
                data = None if why else json.loads(f.read_bytes().decode("utf-8"))
            except (OSError, ValueError, RecursionError) as e:
                why = f"unreadable run.json ({type(e).__name__})"
            why = why or Guest.run_data_problem(data, p.name) or Guest.run_paths_problem(ctx, data)
            if why:
                if p not in Guest._SKIPPED_RUNS:
                    Guest._SKIPPED_RUNS.add(p)
                    print(f"integration-vm: skipping {p}: {why}", file=sys.stderr)
                continue
            runs.append(RunState(ctx, RunRecord.from_json(data)))
        return sorted(runs, key=lambda r: r.record.created_at or "")

    def select_run(ctx, run_name=None, host=None, live=True):
        runs = Guest.list_runs(ctx)
        if run_name:
            for r in runs:
                if r.name == run_name:
                    return r
            raise UsageError(
                f"no run {run_name!r} under {ctx.run_parent} "
                f"(runs: {', '.join(r.name for r in runs) or 'none'})"
            )
        cands = [r for r in runs if host is None or r.record.host == host]
        if live:
            up_ = [r for r in cands if r.record.state != "down"]
            cands = up_ or ([] if live == "required" else cands)
        if not cands:
            raise UsageError(
                "no run found"
                + (f" for host {host!r}" if host else "")
                + "; start one with `integration-vm up --host <name>`"
            )
        if host is None and len({r.record.host for r in cands}) > 1:
            raise UsageError(
                f"several runs exist; pass --host or --run ({', '.join(r.name for r in cands)})"
            )
        return cands[-1]

    def render_current(name, ip, host):
        """tests/integration/.run/current (spec format: name, ip, host lines)."""
        return f"{name}\n{ip or ''}\n{host}\n"

    def write_current(ctx, run_state):
        ctx.run_parent.mkdir(parents=True, exist_ok=True)
        Utilities.write_owned(
            ctx.run_parent / "current",
            Guest.render_current(run_state.name, run_state.ip, run_state.record.host),
        )

    def render_meta_data(instance_id, hostname):
        return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"

    def render_user_data(ssh_pubkey, ansible_user, host_key_private=None, host_key_public=None):
        """cloud-config: the ansible user (NOPASSWD sudo, the run's client key) and, when
        given, the run's ed25519 HOST key pair (so the client can pin it in known_hosts).
        cloud-init's cc_ssh deletes image host keys (ssh_deletekeys defaults true) and writes
        the provided `ssh_keys`; `ssh_genkeytypes: [ed25519]` generates nothing more (the
        ed25519 key is provided; an empty list fails cloud-init's schema). No `ssh_pwauth`:
        it makes cloud-init restart sshd mid-boot; the image's sshd drop-in already refuses
        passwords."""
        lines = [
            "#cloud-config",
            "users:",
            f"  - name: {ansible_user}",
            "    sudo: 'ALL=(ALL) NOPASSWD:ALL'",
            "    shell: /bin/bash",
            "    lock_passwd: true",
            "    ssh_authorized_keys:",
            f"      - {ssh_pubkey.strip()}",
            "disable_root: true",
            "package_update: false",
            "package_upgrade: false",
            "manage_etc_hosts: true",
        ]
        if host_key_private and host_key_public:
            lines += [
                "ssh_deletekeys: true",
                "ssh_genkeytypes: [ed25519]",
                "ssh_keys:",
                "  ed25519_private: |",
            ]
            lines += [f"    {ln}" for ln in host_key_private.strip().splitlines()]
            lines += [f"  ed25519_public: {host_key_public.strip()}"]
        return "\n".join(lines) + "\n"

    def ssh_options(run_dir, alias, port=22):
        """Pinned-host-key SSH options (never StrictHostKeyChecking=no)."""
        run_dir = pathlib.Path(run_dir)
        return [
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={run_dir / 'known_hosts'}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            f"HostKeyAlias={alias}",
            "-o",
            "CheckHostIP=no",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-i",
            str(run_dir / "id_ed25519"),
            "-o",
            "ConnectTimeout=10",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "LogLevel=ERROR",
            "-p",
            str(port),
        ]

    # The driver's own SSH calls to one boot of a guest share one connection (OpenSSH
    # multiplexing). Under TCG a handshake costs the guest's sshd 1-3 s of emulated crypto; a
    # command over the open connection costs ~0.1 s. The shared connection is an
    # optimisation, never a dependency: a call that finds none connects on its own and,
    # through ControlMaster=auto, becomes the next one. RunState.close_ssh ends it before each
    # reboot and checkpoint (a master on a connection whose guest has gone hangs the next call
    # until ServerAlive gives up) and when the command ends; ControlPersist bounds the life of
    # one a killed driver leaves behind.
    SSH_MUX_NAME = "ssh-mux"
    SSH_MUX_PERSIST_S = 30
    SSH_MUX_MAX_PATH = 90  # a socket address holds 108 bytes; ssh binds path + a 17-byte suffix

    def ssh_mux_path(disk_dir):
        """The control socket of the driver's shared SSH connection to this run's guest, or
        None when the path would not fit a socket address. It lives beside the run's disks
        (a short path under the cache, and removed with them); ssh makes it owner-only."""
        p = pathlib.Path(disk_dir) / Guest.SSH_MUX_NAME
        return p if len(os.fsencode(str(p))) <= Guest.SSH_MUX_MAX_PATH else None

    def ssh_argv(run_dir, alias, ip, command, user=ANSIBLE_USER, port=22, mux=None):
        """ssh to the guest with the pinned options; `mux`: through that shared connection."""
        shared = (
            ["-o", f"ControlPath={mux}", "-o", "ControlMaster=auto"]
            + ["-o", f"ControlPersist={Guest.SSH_MUX_PERSIST_S}"]
            if mux
            else []
        )
        return ["ssh", *Guest.ssh_options(run_dir, alias, port), *shared, f"{user}@{ip}", command]

    def ssh_mux_exit_argv(mux):
        """End the shared connection behind control socket `mux` (the host name is unused)."""
        return ["ssh", "-o", f"ControlPath={mux}", "-O", "exit", "boma-it-guest"]

    def known_hosts_line(alias, host_pubkey):
        parts = host_pubkey.split()
        return f"{alias} {parts[0]} {parts[1]}\n"

    def ssh_keygen_argv(path, comment):
        return ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]

    def qemu_img_overlay_argv(golden, overlay):
        return [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            str(golden),
            str(overlay),
        ]

    def cloud_localds_argv(seed, user_data, meta_data):
        return ["cloud-localds", str(seed), str(user_data), str(meta_data)]

    OSINFO_PREFERENCE = ("debian13", "debian12", "debian11")

    def choose_osinfo(osinfo_list_output, preference=OSINFO_PREFERENCE):
        """The newest Debian id `virt-install --osinfo list` knows (bookworm's osinfo-db
        stops at debian11), else let virt-install detect without requiring it."""
        tokens = set(re.findall(r"[A-Za-z0-9._-]+", osinfo_list_output or ""))
        return next((p for p in preference if p in tokens), "detect=on,require=off")

    def osinfo_for(ctx):
        """choose_osinfo() over `virt-install --osinfo list`, cached per virt-install binary."""
        vi = shutil.which("virt-install", path=ctx.environ.get("PATH")) or "virt-install"
        try:
            key = f"{vi}:{os.stat(vi).st_mtime_ns}"
        except OSError:
            key = vi
        cache = ctx.cache / "osinfo.json"
        try:
            cached = json.loads(cache.read_text())
            if (
                isinstance(cached, dict)
                and cached.get("key") == key
                and isinstance(cached.get("osinfo"), str)
            ):
                return cached["osinfo"]
        except (OSError, ValueError, RecursionError):
            pass
        osinfo = Guest.choose_osinfo(
            run(["virt-install", "--osinfo", "list"], timeout=60, cmdlog=ctx.cmdlog).stdout
        )
        with contextlib.suppress(OSError):
            Utilities.write_owned(cache, json.dumps({"key": key, "osinfo": osinfo}) + "\n")
        return osinfo

    def virt_install_argv(
        uri,
        name,
        mem_mib,
        vcpus,
        overlay,
        seed,
        mac,
        console_log,
        virt_type,
        osinfo,
    ):
        """virt-install that PRINTS the domain XML (we add ownership metadata, then define):
        a domain never exists without the boma metadata that prune/status rely on. The guest
        boots its own disk (its boot loader and kernel, ADR-028): no direct kernel boot."""
        return [
            "virt-install",
            "--connect",
            uri,
            "--name",
            name,
            "--memory",
            str(mem_mib),
            "--vcpus",
            str(vcpus),
            "--import",
            "--disk",
            f"path={overlay},format=qcow2,bus=virtio",
            "--disk",
            f"path={seed},format=raw,bus=virtio,readonly=on",
            "--network",
            f"network={Network.NET_NAME},model=virtio,mac={mac}",
            "--osinfo",
            osinfo,
            "--graphics",
            "none",
            # A pty (so `virsh console` attaches) whose output virtlogd also writes to a file.
            "--serial",
            f"pty,log.file={console_log}",
            "--noautoconsole",
            "--virt-type",
            virt_type,
            "--print-xml",
        ]

    def add_domain_metadata(domain_xml, metadata_xml):
        """Insert our element into the domain's <metadata> (creating it) — string surgery so
        the rest of virt-install's XML stays byte-identical."""
        if "<metadata>" in domain_xml:
            return domain_xml.replace("<metadata>", f"<metadata>\n    {metadata_xml}", 1)
        if "<metadata/>" in domain_xml:
            return domain_xml.replace(
                "<metadata/>", f"<metadata>\n    {metadata_xml}\n  </metadata>", 1
            )
        idx = domain_xml.rfind("</domain>")
        if idx < 0:
            raise InfraError("define", "virt-install --print-xml produced no <domain> XML")
        return (
            domain_xml[:idx]
            + f"  <metadata>\n    {metadata_xml}\n  </metadata>\n"
            + domain_xml[idx:]
        )

    def domain_name_from_xml(domain_xml):
        m = re.search(r"<name>([^<]+)</name>", domain_xml)
        return m.group(1) if m else None

    def open_run(ctx, data, session):
        """A run's private dir (0700) and disk dir, attached to `session` at once so
        a failure anywhere after is cleaned up by Machine.destroy. `data` is checked against
        run.json's schema (RunRecord): a field it does not declare is an error."""
        rs = RunState(ctx, RunRecord.from_json(data, strict=True))
        session.attach(rs)
        rs.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(rs.dir, 0o700)
        (rs.dir / "logs").mkdir(exist_ok=True)
        rs.save()
        rs.disk_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(rs.disk_dir, 0o755)
        return rs

    def make_overlay(ctx, backing, overlay, stage):
        """A fresh qcow2 overlay on `backing`, root-only (DISK_MODE: a run's disk may hold
        what a role wrote, secrets included). The run's, a checkpoint's and a resume's."""
        run(
            Guest.qemu_img_overlay_argv(backing, overlay),
            timeout=60,
            check=True,
            stage=stage,
            cmdlog=ctx.cmdlog,
        )
        os.chmod(overlay, DISK_MODE)

    # A guest kernel that panicked will not answer, however long we wait: say so at once.
    # Only the kernel's own line: at a line's start, after its printk time when it has one
    # (`[   11.120851] Kernel panic - not syncing: ...`). A unit's stop-job or status line
    # that quotes it (`[FAILED] Stopping ... Kernel panic - not syncing`) is not a panic.
    KERNEL_PANIC = re.compile(
        r"^\r*(?:\[\s*\d+\.\d+\]\s?)?(?:---\[ end )?(Kernel panic - not syncing[^\r\n]*)",
        re.MULTILINE,
    )
    CONSOLE_HEAD_BYTES = 256
    # The console lines that split a boot before systemd: the boot loader's first (GRUB's
    # menu entry), then the kernel's first (its printk time comes before it).
    CONSOLE_MILESTONES = (("loader", "Booting `"), ("kernel", "] Linux version "))

    def note_span(ctx, what, t0, who="harness", seconds=None):
        """One span of the run's time into result.json's `timeline` (the report draws it, the
        bench sums the harness's): `who` is harness (time the guest did not need: a state
        capture, the VM's creation, a wait between polls) or guest (a boot, from `virsh start`
        to the stage the harness waits for). t0: time.monotonic() at its start."""
        result = ctx.session.result if ctx.session is not None else None
        if result is None:
            return
        if result.timeline is None:
            result.timeline = []
        phases = result.phase_details or []
        result.timeline.append(
            {
                "phase": phases[-1]["name"] if phases else None,
                "what": what,
                "who": who,
                "at": round(t0 - ctx.t0, 1),
                "seconds": round(time.monotonic() - t0 if seconds is None else seconds, 2),
            }
        )

    def wait_until(ctx, stage, bound, probe, what, rs=None, poll=None):
        """Poll probe() -> value|None until truthy or `bound` seconds pass, every `poll`
        seconds (ctx.poll unless given). With a run, a kernel panic on its console since the
        boot was issued ends the wait at once. The last pause before the probe that saw it
        ready is a `poll-wait` span: the guest was ready at some point within it."""
        deadline, pause = time.monotonic() + bound, None
        while True:
            value = probe(deadline)
            if value:
                if pause is not None:
                    Guest.note_span(ctx, "poll-wait", pause[0], seconds=pause[1])
                return value
            panic = rs.console_panic() if rs is not None else None
            if panic:
                raise GuestPanicked(
                    stage,
                    f"the guest's kernel panicked while waiting for {what} ({panic}); "
                    f"console log: {rs.console_log}",
                    panic,
                )
            if time.monotonic() >= deadline:
                where = f"; console log: {rs.console_log}" if rs is not None else ""
                raise InfraError(stage, f"timed out after {bound:.0f}s waiting for {what}{where}")
            pause = (time.monotonic(), min(poll or ctx.poll, max(0.0, deadline - time.monotonic())))
            time.sleep(pause[1])

    def local_poll(ctx):
        """The poll of a wait whose probe costs the guest nothing (LOCAL_POLL)."""
        return min(ctx.poll, LOCAL_POLL)

    def tcp_open(ip, port, timeout):
        try:
            with socket.create_connection((ip, port), timeout=max(0.2, timeout)):
                return True
        except OSError:
            return False

    # cloud-init writes this when its last stage of THIS boot has finished (/run is the boot's),
    # with every stage's errors: the file `cloud-init status` itself reads. The guest waits for
    # it (a shell loop, one SSH call) and prints it. `cloud-init status --wait` did the same,
    # and under TCG its Python start-up alone took ~3 s after cloud-init had finished.
    CLOUD_INIT_RESULT = "/run/cloud-init/result.json"
    CLOUD_INIT_WAIT = (
        f"until [ -e {CLOUD_INIT_RESULT} ]; do sleep 0.2; done; cat {CLOUD_INIT_RESULT}"
    )

    def parse_cloud_init_result(text):
        """result.json -> (errors, recoverable): every stage's errors, and the recoverable
        ones (`cloud-init status` exit 2: warnings, deprecations) as "LEVEL: message". Text
        that is not the format is one error that quotes it."""
        try:
            v1 = json.loads(text)["v1"]
            errors = [str(e) for e in v1.get("errors") or []]
            recoverable = [
                f"{level}: {msg}"
                for level, msgs in (v1.get("recoverable_errors") or {}).items()
                for msg in msgs or []
            ]
        except (ValueError, KeyError, TypeError, AttributeError):
            return [f"unreadable {Guest.CLOUD_INIT_RESULT}: {text.strip()[:200]!r}"], []
        return errors, recoverable

    # A boot much slower than the profile's last passing run (same accelerator) is worth a
    # line: the system under test may have grown a slow unit. Never a failure (TCG timings
    # move with the machine's load); the default thresholds (BOMA_IT_SLOW_BOOT_*) are loose.
    def slow_boot_warnings(last_pass, reboots, factor=1.5, slack=15.0):
        """[message] for each reboot that took `factor` times (and `slack` seconds) longer
        to `running` than the same reboot of the last passing run. Both are result.json's
        `reboot_stages` lists."""
        out = []
        for prev, cur in zip(last_pass or [], reboots, strict=False):
            p, c = prev.get("seconds_to_running"), cur.get("seconds_to_running")
            if prev.get("mode") == cur.get("mode") and p and c and c > p * factor and c - p > slack:
                out.append(
                    f"the {cur['mode']} reboot took {c:.0f}s to `running`, {c / p:.1f}x "
                    f"the last passing run's {p:.0f}s (see reboot_diffs[].boot)"
                )
        return out

    def reboot_dir(rs, index, mode):
        """The diagnostics of a run's index-th reboot (1-based), no symlink on the way."""
        return Utilities.owned_path(rs.diag_dir, f"reboot-{index}-{mode}")

    def warn_reboot(result, reboots, rs):
        """Warning lines (into result.json) about the last reboot -> them joined, or None:
        - its shutdown waited on a unit that would not stop: every reboot of the real host
          waits as long;
        - its boot was taken as finished while timer-started jobs still ran (they hold
          systemd `starting`, and they slow whatever the run does next)."""
        last, lines = reboots[-1], []
        if last.get("stop_jobs"):
            where = Guest.reboot_dir(rs, len(reboots), last["mode"]) / "shutdown-console.txt"
            lines.append(
                f"the {last['mode']} reboot's shutdown waited for {'; '.join(last['stop_jobs'])} "
                f"(the guest was off after {last['seconds_to_off']:.0f}s; console: {where})"
            )
        if last.get("emulator_oops"):
            lines.append(
                f"the {last['mode']} reboot's first boot died of the emulator's code-patching "
                f"race under TCG ({last['emulator_oops']}; Oops: int3) and was powered on once "
                "more"
            )
        if last.get("timer_jobs"):
            lines.append(
                f"the {last['mode']} reboot's boot was over at {last['seconds_to_running']:.0f}s "
                f"but for jobs timers started during it, still running: "
                f"{', '.join(last['timer_jobs'])} (not waited for; systemd stays `starting` "
                "until they end)"
            )
        for w in lines:
            result.add_warning(w)
            print(f"integration-vm: warning: {w}", file=sys.stderr)
        return "; ".join(lines) or None

    def note_boot_times(ctx, result, run_name):
        """Compare this run's reboots with the profile's last passing run on this
        accelerator (warnings into result.json), and remember them when this one passed."""
        host, reboots = result.host, result.reboot_stages
        if not host or not reboots or not re.fullmatch(HOST_RE, host):
            return
        try:
            d = Utilities.owned_path(ctx.cache, "boot-history")
            f = Utilities.owned_path(d, f"{host}-{result.accel or 'unknown'}.json")
            last = json.loads(f.read_text()) if f.is_file() else {}
            for w in Guest.slow_boot_warnings(
                last.get("reboot_stages"),
                reboots,
                ctx.settings["BOMA_IT_SLOW_BOOT_FACTOR"],
                ctx.settings["BOMA_IT_SLOW_BOOT_SLACK"],
            ):
                result.add_warning(w)
                print(f"integration-vm: warning: {w}", file=sys.stderr)
            if result.verdict == "pass":
                d.mkdir(parents=True, exist_ok=True)
                Utilities.write_owned(
                    f,
                    json.dumps(
                        {"run": run_name, "at": Env.now_iso(), "reboot_stages": reboots}, indent=1
                    )
                    + "\n",
                )
        except (OSError, ValueError, HarnessError) as e:  # a note must not change the verdict
            print(f"integration-vm: warning: boot history: {e}", file=sys.stderr)

    # The guest waits for its boot to finish (`is-system-running --wait`, re-armed every
    # BOOT_WAIT_POLL seconds) and prints the state. It stops early, printing `starting` and
    # `timer-jobs: <units>`, when the boot target is reached and every job still queued is a
    # service a timer started: a timer that elapses during the boot (trixie's hourly
    # apt-listchanges at hh:00, whose first run takes 16 min under TCG) keeps systemd
    # `starting` until its job ends, though the boot itself is over.
    BOOT_WAIT_POLL = 5

    def boot_wait_script(poll=BOOT_WAIT_POLL):
        """The guest-side wait (POSIX sh, no single quotes: it runs inside `sh -c '...'`)."""
        return (
            "while :; do "
            f"s=$(timeout {poll} systemctl is-system-running --wait); "
            '[ -n "$s" ] && { echo "$s"; exit 0; }; '
            "systemctl is-active --quiet default.target || continue; "
            "j=$(systemctl list-jobs --no-legend --no-pager "
            '| while read -r id unit rest; do echo "$unit"; done); '
            '[ -n "$j" ] || continue; '
            'for u in $j; do systemctl show -P TriggeredBy "$u" | grep -q "[.]timer" || '
            "continue 2; "
            "done; "
            'echo starting; echo "timer-jobs:" $j; exit 0; '
            "done"
        )

    def _reboot_story(record, stages):
        """One line: how far the reboot got after how long, from the guest's shutdown on."""
        reached = [
            f"{what} after {stages[key]}s"
            for what, key in (
                ("powered off", "seconds_to_off"),
                ("boot loader", "seconds_to_loader"),
                ("kernel", "seconds_to_kernel"),
                ("SSH", "seconds_to_ssh"),
            )
            if stages[key] is not None
        ]
        failed, waited = record["failed_units"], record.get("stop_jobs")
        timer_jobs = record.get("timer_jobs")
        return (
            (f"its shutdown waited for {'; '.join(waited)}; " if waited else "")
            + ", ".join(reached)
            + f", system {record['system_state']} after {stages['seconds_to_running']}s"
            + (
                f" with only timer-started jobs left ({', '.join(timer_jobs)})"
                if timer_jobs
                else ""
            )
            + (f", failed units: {', '.join(failed)}" if failed else "")
            + (
                f", settled after {stages['seconds_to_settled']}s"
                if stages.get("seconds_to_settled") is not None
                else ""
            )
        )

    # systemd's status line while a unit's stop outlasts a few seconds at shutdown (with the
    # default 90 s stop timeout, the wait a hung unit adds to every reboot of the host).
    STOP_JOB = re.compile(r"A stop job is running for (.+?) \(\d")
    ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

    def shutdown_stop_jobs(console_text):
        """The units systemd said it was waiting for while the guest shut down, in order."""
        seen = []
        for m in Guest.STOP_JOB.finditer(Guest.ANSI_ESCAPE.sub("", console_text or "")):
            if m.group(1) not in seen:
                seen.append(m.group(1))
        return seen

    # The emulator's own race, not the host's (see Machine.start()): under TCG the kernel's code
    # patching now and then hits an int3 the patch already removed, `Oops: int3` then a panic,
    # ~11 s into a boot. It has ended reboots after the applies too (2026-12-05, in
    # devcgroup_check_permission). Such a boot is powered on once more, with a warning; a
    # panic without that oops, a second panic, or any panic under KVM is the error it was.
    # (the kernel's own line only, as KERNEL_PANIC)
    TCG_INT3_OOPS = re.compile(r"^\r*(?:\[\s*\d+\.\d+\]\s?)?Oops: int3\b", re.MULTILINE)


class JsonRecord:
    """A JSON file's schema as a dataclass: a subclass declares every field once (name,
    type, default). Fields in ABSENT_WHEN_NONE are left out of the JSON while None (they
    appear once they apply). Keys a file holds that the schema does not name (an older or
    newer harness's) are kept in `extra` and written back unchanged, unless `strict`
    (data this harness just built), where they are an error (ValueError)."""

    ABSENT_WHEN_NONE = frozenset()

    @classmethod
    def field_names(cls):
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_json(cls, data, strict=False):
        known = set(cls.field_names())
        unknown = {k: v for k, v in data.items() if k not in known}
        if strict and unknown:
            raise ValueError(f"{cls.__name__}: undeclared field(s) {', '.join(sorted(unknown))}")
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.extra = unknown
        return record

    def __setattr__(self, name, value):
        """Only the declared fields (and `extra`): a misspelt name is an error, not a new
        field that is never written."""
        if name != "extra" and name not in self.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__} declares no field {name!r}")
        super().__setattr__(name, value)

    def to_json(self):
        out = dict(self.extra)
        for name in self.field_names():
            value = getattr(self, name)
            if value is not None or name not in self.ABSENT_WHEN_NONE:
                out[name] = value
        return out


@dataclasses.dataclass
class RunRecord(JsonRecord):
    """run.json: one run's state (RunState.record, live). .ci/run, `status`,
    `down` and the runbook read name, host, state, ip, accel, domain and resumed_from."""

    name: str
    host: str
    profile: str = None
    certs: str = None
    accel: str = None
    mac: str = None
    ip: str = None
    created_at: str = None
    owner: str = None
    image: str = None  # the disk its overlay sits on (the golden image or a checkpoint's)
    image_key: str = None
    state: str = "creating"  # creating, defined|restored, booting, up, down
    boot_ids: list = dataclasses.field(default_factory=list)
    uri: str = None
    mem_mib: int = None
    vcpus: int = None
    domain: str = None  # a resumed run's: its checkpoint's domain (else its name)
    resumed_from: dict = None  # {stage, key, created_at} of the checkpoint it resumed
    checkpoints_read: list = None  # the checkpoint keys its disk chain reads
    checkpoints_taken: list = None
    applied_steps: int = None  # playbooks already applied (a resumed checkpoint's)
    # the checkpoint-chain keys of what it has applied (booted, applied-1, ...): the
    # inputs its state came from, which the next quick loop compares with its own
    applied_keys: list = None
    boot_stages: dict = None  # seconds from start to each boot stage
    reboots: list = None  # each reboot's mode, boot ids and seconds
    kept_by: str = None  # "loop": the next run of the profile tears it down
    down_at: str = None
    lineage: str = None  # its checkpoints': "fresh", or "from:<ref>" (--from)
    extra: dict = dataclasses.field(default_factory=dict, repr=False)

    ABSENT_WHEN_NONE = frozenset(
        {
            "lineage",
            "domain",
            "resumed_from",
            "checkpoints_read",
            "checkpoints_taken",
            "applied_steps",
            "applied_keys",
            "boot_stages",
            "reboots",
            "kept_by",
            "down_at",
        }
    )


@dataclasses.dataclass
class RunState:
    ctx: Ctx
    record: RunRecord  # run.json, live: its fields set as attributes, written by save()
    console_mark: int = 0  # console.log's size when the current boot was issued
    # time.monotonic() when a poll first saw each CONSOLE_MILESTONES line of this boot:
    # firmware and boot loader, which systemd-analyze cannot see, come before the kernel
    console_seen: dict = dataclasses.field(default_factory=dict)

    console_head: bytes = b""  # its first bytes then: another head means a new file

    def mark_console(self):
        """Remember where the console log stands: what follows is this boot's."""
        self.console_seen = {}
        try:
            with open(self.console_log, "rb") as fh:
                self.console_head = fh.read(Guest.CONSOLE_HEAD_BYTES)
                self.console_mark = os.fstat(fh.fileno()).st_size
        except OSError:
            self.console_mark, self.console_head = 0, b""

    def console_since_mark(self):
        """What the console printed since mark_console(), or None when unreadable."""
        try:
            with open(self.console_log, "rb") as fh:
                # A new QEMU process (destroy + start) has virtlogd start the file afresh.
                head = fh.read(len(self.console_head))
                if os.fstat(fh.fileno()).st_size < self.console_mark or head != self.console_head:
                    self.console_mark, self.console_head = 0, b""
                fh.seek(self.console_mark)
                return fh.read().decode(errors="replace")
        except OSError:
            return None

    def console_panic(self):
        """The `Kernel panic` line this boot printed on the console, or None (and the
        first sightings of the CONSOLE_MILESTONES, in console_seen)."""
        text = self.console_since_mark()
        if text is None:
            return None
        for name, line in Guest.CONSOLE_MILESTONES:
            if name not in self.console_seen and line in text:
                self.console_seen[name] = time.monotonic()
        m = Guest.KERNEL_PANIC.search(text)
        return m.group(1).strip() if m else None

    @contextlib.contextmanager
    def watching_for_the_kernel(self, every=0.25):
        """While the body waits for a boot: a thread that notes when the kernel banner
        reaches the console (the waits' own polls are seconds apart while SSH attempts
        time out against a guest still in its firmware)."""
        stop = threading.Event()

        def watch():
            while "kernel" not in self.console_seen and not stop.wait(every):
                self.console_panic()

        t = threading.Thread(target=watch, name="kernel-banner", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(timeout=2)
            self.console_panic()  # a banner printed since the thread's last look

    def seconds_to(self, milestone, since):
        """Seconds from `since` to this boot's console `milestone`, when a watch saw it."""
        seen = self.console_seen.get(milestone)
        return None if seen is None else round(seen - since, 1)

    @property
    def name(self):
        return self.record.name

    @property
    def domain(self):
        """The libvirt domain, guest hostname, inventory host and SSH HostKeyAlias. A run
        resumed from a checkpoint keeps the checkpoint's (a saved memory image pins its
        name, UUID and MAC); its own name still names its dirs, logs and diagnostics."""
        return self.record.domain or self.record.name

    @property
    def dir(self):
        return Utilities.owned_path(self.ctx.run_parent, self.name)

    @property
    def disk_dir(self):
        return Utilities.owned_path(self.ctx.cache, "runs", self.name)

    @property
    def diag_dir(self):
        return Utilities.owned_path(self.ctx.diag_root, self.name)

    @property
    def console_log(self):
        return self.disk_dir / "console.log"

    @property
    def overlay(self):
        return self.disk_dir / "overlay.qcow2"

    @property
    def ip(self):
        return self.record.ip

    def save(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        record = self.record.to_json()
        Utilities.write_owned(
            self.dir / "run.json", json.dumps(record, indent=2, sort_keys=True) + "\n"
        )

    def ssh(self, command, timeout, stage="ssh", input=None, shared=True):
        """`command` on the guest over pinned SSH. shared: through this boot's shared
        connection (ssh_mux_path; the first call opens it); False: a connection of its
        own, for attempts that may reach a boot on its way down."""
        mux = Guest.ssh_mux_path(self.disk_dir) if shared else None
        return run(
            Guest.ssh_argv(
                self.dir, self.domain, self.ip, command, port=self.ctx.ssh_port, mux=mux
            ),
            timeout=timeout,
            stage=stage,
            cmdlog=self.ctx.cmdlog,
            input=input,
            max_output=Guest.GUEST_OUTPUT_MAX,
        )

    def close_ssh(self):
        """End the shared SSH connection to this boot, if one is open (before a reboot or a
        checkpoint, at teardown, when the command ends). Never fails: a master that does
        not answer loses its socket, so the next call connects afresh."""
        try:
            mux = Guest.ssh_mux_path(self.disk_dir)
        except InfraError:  # the run dir is not the harness's: nothing of ours to end
            return
        if mux is None or not os.path.lexists(mux):
            return
        with contextlib.suppress(InfraError):
            run(Guest.ssh_mux_exit_argv(mux), timeout=5, cmdlog=self.ctx.cmdlog)
        with contextlib.suppress(OSError):
            mux.unlink()


# --------------------------------------------------------------------------------------
# Reboot diff: what a reboot changed (firewall, ports, listeners, units) and boot time
# --------------------------------------------------------------------------------------
# Capture the guest's state before and after each reboot in one SSH round trip, normalise
# it into diffable lines, diff, classify against the profile's tolerances; boot analysis.


class Reboot:
    """The Reboot diff section as a namespace (its functions called on the class, never an
    instance): state capture, normalisation, diff, tolerances, boot analysis, the reboot's
    stage rows."""

    # One SSH round trip per capture: a shell script (run as root through one `sudo -n sh -s`,
    # fed on stdin) prints each command's output between marker lines that carry a per-call
    # nonce; parse_capture_output() splits it, the normalise_* functions make each category a
    # list of stable, diffable lines. Every guest command is bounded by `timeout`.
    REBOOT_DIFF_CATEGORIES = ("nft", "ports", "sockets", "failed_units", "services")
    REBOOT_DIFF_POLICIES = ("fail", "warn")
    # The sections run side by side and are printed once all have finished: under TCG each
    # command is mostly seconds of emulated start-up (docker's CLI, systemd-analyze), and the
    # guest has more than one vCPU. Only the docker and unit sections depend on each other, so
    # each of those chains is one background job.
    CAPTURE_SCRIPT = r"""M='@@boma-@NONCE@'
T=@BOUND@
d=$(mktemp -d) || exit 97
trap 'rm -rf "$d"' EXIT
sec() {
  n=$1; shift
  timeout -k 2 "$T" "$@" </dev/null >"$d/$n.o" 2>"$d/$n.e"; rc=$?
  { echo "$M begin $n"; cat "$d/$n.o"; echo
    echo "$M end $n $rc $(head -c 300 "$d/$n.e" | tr -s '\n\t' '  ')"; } >"$d/$n.s"
}
docker_sections() {
  if ! command -v docker >/dev/null 2>&1; then
    sec docker echo 'docker: absent'
  elif ! timeout -k 2 "$T" systemctl is-active --quiet docker.service </dev/null; then
    sec docker echo 'docker: not running'
  else
    sec docker docker ps --format '{{.Names}} {{.Ports}}'
    names=$(awk '{print $1}' "$d/docker.o")
    if [ -n "$names" ]; then
      sec containers docker inspect --format \
      '{{.Name}}{{range .NetworkSettings.Networks}} {{.IPAddress}} {{.GlobalIPv6Address}}{{end}}' \
      $names
    fi
  fi
}
unit_sections() {
  sec enabled_units systemctl list-unit-files --state=enabled --type=service --no-legend --no-pager
  units=$(awk '$1 !~ /@\.service$/ {print $1}' "$d/enabled_units.o")
  if [ -n "$units" ]; then sec enabled_active systemctl is-active $units; fi
}
sec boot_id cat /proc/sys/kernel/random/boot_id &
sec port_range cat /proc/sys/net/ipv4/ip_local_port_range &
sec nft_json nft -j list ruleset &
sec nft_text nft list ruleset &
docker_sections &
sec sockets ss -H -tulnp &
sec failed_units systemctl --failed --plain --no-legend --no-pager &
if [ "@ANALYZE@" != 0 ]; then
  sec boot_time systemd-analyze time &
fi
if [ "@ANALYZE@" = 1 ]; then
  sec boot_blame sh -c 'systemd-analyze blame --no-pager | head -n 15' &
  sec boot_chain systemd-analyze critical-chain --no-pager &
fi
unit_sections &
wait
cat "$d"/*.s
exit 0
"""
    CAPTURE_COMMANDS = 14  # upper bound of `timeout`-bounded commands in the script

    # iptables-nft's tables (Docker's): their rules are compared per chain as a multiset,
    # because Docker rebuilds them at start in an order that follows its network restore
    # order, not the order they were first created in.
    XTABLES_FAMILIES = ("ip", "ip6", "arp", "bridge")
    XTABLES_TABLES = ("filter", "nat", "mangle", "raw", "security")
    _NFT_VOLATILE = ("handle", "expires", "used", "used_unit")
    _NFT_VERDICTS = ("accept", "drop", "continue", "return", "queue", "masquerade", "notrack")

    def render_capture_script(nonce, command_bound, analyze=True):
        """The capture script for one call. analyze=False leaves out systemd-analyze (~5 s
        of the guest's time under TCG): a capture BEFORE a reboot describes the old boot.
        analyze="time": only `systemd-analyze time` (the boot's startup figures), not blame
        and critical-chain (~3 s each)."""
        level = "time" if analyze == "time" else "1" if analyze else "0"
        return (
            Reboot.CAPTURE_SCRIPT.replace("@NONCE@", nonce)
            .replace("@BOUND@", str(max(1, int(round(command_bound)))))
            .replace("@ANALYZE@", level)
        )

    def parse_capture_output(text, nonce):
        """{section: {"rc": int|None, "out": str, "err": str}} from the capture script's
        stdout. A section whose end marker never came (the SSH call was cut) has rc None."""
        marker = f"@@boma-{nonce} "
        sections, name, body = {}, None, []
        for line in (text or "").splitlines():
            if line.startswith(marker):
                parts = line[len(marker) :].split(" ", 3)
                if parts[0] == "begin" and len(parts) > 1:
                    name, body = parts[1], []
                elif parts[0] == "end" and len(parts) > 2 and parts[1] == name:
                    rc = int(parts[2]) if parts[2].lstrip("-").isdigit() else None
                    sections[name] = {
                        "rc": rc,
                        "out": "\n".join(body).strip("\n"),
                        "err": (parts[3] if len(parts) > 3 else "").strip(),
                    }
                    name = None
                continue
            if name is not None:
                body.append(line)
        if name is not None:
            sections[name] = {"rc": None, "out": "\n".join(body).strip("\n"), "err": "cut off"}
        return sections

    def _capture_error(what, sec):
        """One sortable line saying why a category could not be captured."""
        if sec is None:
            return f"! {what}: not captured"
        if sec["rc"] is None:
            return f"! {what}: cut off"
        if sec["rc"] == 124:
            return f"! {what}: timed out"
        return f"! {what}: exit {sec['rc']}" + (f": {sec['err'][:200]}" if sec["err"] else "")

    def _strip_nft_volatile(obj):
        if isinstance(obj, dict):
            return {
                k: Reboot._strip_nft_volatile(v)
                for k, v in obj.items()
                if k not in Reboot._NFT_VOLATILE
            }
        if isinstance(obj, list):
            return [Reboot._strip_nft_volatile(v) for v in obj]
        return obj

    def _canon_json(obj):
        return json.dumps(obj, sort_keys=True, separators=(",", ":"))

    def nft_expr_text(x):
        """A compact canonical string for an nft JSON expression or statement: nft-like
        where that is easy, canonical JSON otherwise. Counter values, handles, expiry times
        and anonymous-set element order are dropped (they change without meaning)."""
        if x is None:
            return ""
        if isinstance(x, bool):
            return str(x).lower()
        if isinstance(x, (int, float)):
            return str(x)
        if isinstance(x, str):
            return x if x and re.fullmatch(r"[^\s{}\",]+", x) else json.dumps(x)
        if isinstance(x, list):
            elems = sorted(
                (Reboot.nft_expr_text(v) for v in x),
                key=lambda t: (0, int(t), "") if t.isdigit() else (1, 0, t),
            )
            return "{ " + ", ".join(elems) + " }"
        if not isinstance(x, dict):
            return Reboot._canon_json(x)
        x = Reboot._strip_nft_volatile(x)
        if len(x) != 1:
            return " ".join(f"{k} {Reboot.nft_expr_text(v)}" for k, v in sorted(x.items()))
        ((k, v),) = x.items()
        return Reboot._nft_keyed_text(k, v)

    def _nft_keyed_text(k, v):
        """nft_expr_text() of a one-key expression or statement {k: v}."""
        if k == "match":
            op = v.get("op", "==")
            left, right = Reboot.nft_expr_text(v.get("left")), Reboot.nft_expr_text(v.get("right"))
            return f"{left} {right}" if op in ("==", "in") else f"{left} {op} {right}"
        if k == "payload" and isinstance(v, dict):
            if "protocol" in v:
                return f"{v['protocol']} {v.get('field', '')}".strip()
            return f"@{v.get('base')},{v.get('offset')},{v.get('len')}"
        if k in ("meta", "rt", "socket", "osf") and isinstance(v, dict) and "key" in v:
            return f"{k} {v['key']}"
        if k == "ct" and isinstance(v, dict):
            return " ".join(
                str(p) for p in ("ct", v.get("dir"), v.get("family"), v.get("key")) if p
            )
        if k == "fib" and isinstance(v, dict):
            flags = v.get("flags", [])
            flags = [flags] if isinstance(flags, str) else sorted(flags)
            return "fib " + " . ".join(flags) + f" {v.get('result', '')}".rstrip()
        if k == "set":
            return Reboot.nft_expr_text(v if isinstance(v, list) else [v])
        if k == "prefix" and isinstance(v, dict):
            return f"{Reboot.nft_expr_text(v.get('addr'))}/{v.get('len')}"
        if k == "range" and isinstance(v, list) and len(v) == 2:
            return f"{Reboot.nft_expr_text(v[0])}-{Reboot.nft_expr_text(v[1])}"
        if k == "elem" and isinstance(v, dict):
            rest = {a: b for a, b in v.items() if a != "val"}
            return Reboot.nft_expr_text(v.get("val")) + (
                f" {Reboot._canon_json(rest)}" if rest else ""
            )
        if k == "concat" and isinstance(v, list):
            return " . ".join(Reboot.nft_expr_text(p) for p in v)
        if k in ("&", "|", "^", "<<", ">>") and isinstance(v, list) and len(v) == 2:
            return f"{Reboot.nft_expr_text(v[0])} {k} {Reboot.nft_expr_text(v[1])}"
        if k == "counter":
            return "counter" if not isinstance(v, str) else f"counter name {v}"
        if k in ("jump", "goto") and isinstance(v, dict):
            return f"{k} {v.get('target')}"
        if k in Reboot._NFT_VERDICTS and not v:
            return k
        if k in ("dnat", "snat") and isinstance(v, dict):
            to = Reboot.nft_expr_text(v.get("addr")) if "addr" in v else ""
            if "port" in v:
                to += f":{Reboot.nft_expr_text(v['port'])}"
            extra = {a: b for a, b in v.items() if a not in ("addr", "port", "family")}
            return (f"{k} {v['family']} to {to}" if v.get("family") else f"{k} to {to}") + (
                f" {Reboot._canon_json(extra)}" if extra else ""
            )
        if k == "xt" and isinstance(v, dict):
            return f"xt {v.get('type', '')} {v.get('name', '')}".strip()
        if isinstance(v, dict) and not v:
            return k
        if v is None:
            return k
        return f"{k} {Reboot._canon_json(v)}"

    def _nft_object_line(kind, obj):
        head = f"{kind} {obj.get('family', '?')} {obj.get('table', obj.get('name', '?'))}"
        if kind == "table":
            rest = {a: b for a, b in obj.items() if a not in ("family", "name")}
            return head + (f" {Reboot._canon_json(rest)}" if rest else "")
        head += f" {obj.get('name', '?')}"
        if kind == "chain":
            if "hook" in obj:
                keys = ("type", "hook", "prio", "policy", "dev")
                head += " {" + " ".join(f"{a} {obj[a]}" for a in keys if a in obj) + "}"
            return head
        if kind in ("set", "map"):
            rest = {a: b for a, b in obj.items() if a not in ("family", "table", "name", "elem")}
            elems = Reboot.nft_expr_text(obj.get("elem", []))
            return head + f" {Reboot._canon_json(rest)} elements {elems}"
        drop = ("family", "table", "name") + (("packets", "bytes") if kind == "counter" else ())
        rest = {a: b for a, b in obj.items() if a not in drop}
        return head + f" {Reboot._canon_json(rest)}"

    def parse_container_ips(text):
        """`docker inspect --format '{{.Name}}{{range .NetworkSettings.Networks}} {{.IPAddress}}
        {{.GlobalIPv6Address}}{{end}}'` -> {address: container name}."""
        ips = {}
        for line in (text or "").splitlines():
            parts = line.split()
            for addr in parts[1:]:
                if re.fullmatch(r"\d+\.\d+\.\d+\.\d+|[0-9a-fA-F]*:[0-9a-fA-F:]+", addr):
                    ips[addr] = parts[0].lstrip("/")
        return ips

    def name_container_addresses(line, container_ips):
        """Replace each container address in `line` by `<container name>`: Docker's IPAM
        hands a container its address when it starts, so the same DNAT can point at another
        address after a reboot; what must not change is WHICH container it reaches. An
        address no running container holds stays as it is (and shows in the diff)."""
        for addr, name in sorted((container_ips or {}).items(), key=lambda kv: -len(kv[0])):
            guard = "0-9a-fA-F:" if ":" in addr else r"\d."
            line = re.sub(rf"(?<![{guard}]){re.escape(addr)}(?![{guard}])", f"<{name}>", line)
        return line

    def parse_nft_text_rules(text):
        """`nft list ruleset` -> {(family, table, chain): [rule text]} in listing order, each
        rule with its counter values dropped. Only used for rules whose JSON form is opaque:
        iptables-nft writes some matches/targets as xtables compat expressions, which
        `nft -j` shows as `{"xt": {"name": "DNAT"}}` while the text listing translates them
        (`dnat to 172.18.0.2:443`, `ct state related,established`)."""
        rules, stack, pending = {}, [], 0
        for raw in (text or "").splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if pending:
                pending += line.count("{") - line.count("}")
                continue
            m = re.match(r"table (\S+) (\S+) \{$", line)
            if m and not stack:
                stack.append(("table", m.group(1), m.group(2)))
                continue
            m = re.match(r"chain (\S+) \{$", line)
            if m and len(stack) == 1:
                stack.append(("chain", m.group(1)))
                rules.setdefault((stack[0][1], stack[0][2], m.group(1)), [])
                continue
            if line == "}":
                if stack:
                    stack.pop()
                continue
            if line.endswith("{"):
                stack.append(("other",))
                continue
            if (
                len(stack) == 2
                and stack[1][0] == "chain"
                and not line.endswith(";")
                and not line.startswith("comment ")
            ):
                rules[(stack[0][1], stack[0][2], stack[1][1])].append(
                    re.sub(r"counter packets \d+ bytes \d+", "counter", line)
                )
                continue
            pending = max(0, line.count("{") - line.count("}"))
        return rules

    def _has_xt(exprs):
        return any(isinstance(e, dict) and "xt" in e for e in exprs or [])

    def normalise_nft_json(text, container_ips=None, ruleset_text=None):
        """`nft -j list ruleset` -> ordered, stable lines:
          table <family> <name>
          chain <family> <table> <name> [{type T hook H prio P policy X}]
          rule <family> <table> <chain>: <expressions, canonical>
          set|map|... <family> <table> <name> ...
        Dropped: metainfo, handles, counter values, expiry; a running container's address
        becomes `<name>` (container_ips, name_container_addresses). A rule holding an
        xtables compat expression (opaque in JSON) is taken from `ruleset_text` (the same
        ruleset as `nft list ruleset`) when that lists the chain with as many rules.
        Tables are sorted by family and name, chains and sets by name (creation order is
        not meaning: boma's `delete table` + re-create puts its table behind Docker's during
        an apply and before them at boot). Rules keep nft's order within a chain, except in
        iptables-nft tables (Docker's), where they are sorted: Docker re-creates its
        per-network rules at boot in another order (both seen on a real askari VM)."""
        data = json.loads(text)
        items = data.get("nftables", []) if isinstance(data, dict) else []
        text_rules = Reboot.parse_nft_text_rules(ruleset_text) if ruleset_text else {}
        json_counts = Reboot._nft_rule_counts(items)
        seen_rules = {}
        tables, objects, rules = {}, {}, {}
        for item in items:
            if not isinstance(item, dict) or len(item) != 1:
                continue
            ((kind, obj),) = item.items()
            if kind == "metainfo" or not isinstance(obj, dict):
                continue
            obj = Reboot._strip_nft_volatile(obj)
            fam = obj.get("family", "?")
            if kind == "table":
                tables[(fam, obj.get("name", "?"))] = Reboot._nft_object_line("table", obj)
                continue
            tkey = (fam, obj.get("table", "?"))
            tables.setdefault(tkey, f"table {fam} {tkey[1]}")
            if kind == "rule":
                ckey = (fam, tkey[1], obj.get("chain", "?"))
                pos = seen_rules[ckey] = seen_rules.get(ckey, -1) + 1
                line = Reboot._nft_rule_line(
                    ckey, obj, pos, text_rules.get(ckey), json_counts[ckey]
                )
                line = Reboot.name_container_addresses(line, container_ips)
                rules.setdefault((tkey, obj.get("chain", "?")), []).append(line)
            else:
                order = 0 if kind == "chain" else 1
                objects.setdefault(tkey, []).append(
                    (order, str(obj.get("name", "")), kind, Reboot._nft_object_line(kind, obj))
                )
        return Reboot._nft_ordered_lines(tables, objects, rules)

    def _nft_rule_counts(items):
        """{(family, table, chain): number of rules} in `nft -j` items."""
        json_counts = {}
        for item in items:
            r = item.get("rule") if isinstance(item, dict) else None
            if isinstance(r, dict):
                key = (r.get("family", "?"), r.get("table", "?"), r.get("chain", "?"))
                json_counts[key] = json_counts.get(key, 0) + 1
        return json_counts

    def _nft_rule_line(ckey, obj, pos, listed, json_count):
        """The line of the pos-th rule `obj` of chain ckey=(family, table, chain): from the
        text listing (`listed`) when the rule holds an xtables expression and the listing has
        as many rules as the JSON, else from its expressions."""
        fam, table, chain = ckey
        if Reboot._has_xt(obj.get("expr")) and listed and len(listed) == json_count:
            return f"rule {fam} {table} {chain}: {listed[pos]}"
        line = f"rule {fam} {table} {chain}: " + " ".join(
            t for t in (Reboot.nft_expr_text(e) for e in obj.get("expr", [])) if t
        )
        if obj.get("comment"):
            line += f" comment {json.dumps(obj['comment'])}"
        return line

    def _nft_ordered_lines(tables, objects, rules):
        """Tables sorted, each followed by its chains and sets by name, each chain by its rules
        (sorted in iptables-nft tables)."""
        lines = []
        for tkey in sorted(tables):
            lines.append(tables[tkey])
            xtables = tkey[0] in Reboot.XTABLES_FAMILIES and tkey[1] in Reboot.XTABLES_TABLES
            chains = sorted(objects.get(tkey, []))
            seen = {o[1] for o in chains if o[2] == "chain"}
            chains += [
                (0, c, "chain", f"chain {tkey[0]} {tkey[1]} {c}")
                for (t, c) in sorted(rules)
                if t == tkey and c not in seen
            ]
            for _order, name, kind, line in sorted(chains):
                lines.append(line)
                if kind == "chain":
                    chain_rules = rules.get((tkey, name), [])
                    lines += sorted(chain_rules) if xtables else chain_rules
        return lines

    def normalise_docker_ports(text):
        """`docker ps --format '{{.Names}} {{.Ports}}'` -> sorted `<container> <mapping>`
        lines (one per published or exposed port; `<container> -` without ports). The
        capture script's own `docker: absent` / `docker: not running` lines pass through."""
        lines = []
        for raw in (text or "").splitlines():
            raw = raw.strip()
            if not raw:
                continue
            if raw.startswith("docker: "):
                lines.append(raw)
                continue
            name, _, ports = raw.partition(" ")
            mappings = [p.strip() for p in ports.split(",") if p.strip()]
            lines += [f"{name} {m}" for m in mappings] or [f"{name} -"]
        return sorted(lines)

    def parse_port_range(text):
        nums = [int(n) for n in re.findall(r"\d+", text or "")]
        return (nums[0], nums[1]) if len(nums) >= 2 else (32768, 60999)

    _SS_PROCS = re.compile(r'\("((?:[^"\\]|\\.)*)",pid=\d+')

    def normalise_listeners(text, port_range=(32768, 60999), own_ips=()):
        """`ss -H -tulnp` (or -tlnp) -> sorted, de-duplicated `<proto> <addr>:<port>
        <processes>` lines. Dropped: queue sizes, pids, fds. A port inside the guest's
        ip_local_port_range was picked by the kernel (bound to port 0, e.g. containerd's
        stream server) and becomes `ephemeral`; the VM's own DHCP address becomes `VM_IP`."""
        lo, hi = port_range
        own = {ip for ip in own_ips if ip and not ip.startswith("127.") and ip != "::1"}
        out = set()
        for raw in (text or "").splitlines():
            f = raw.split()
            if len(f) < 5:
                continue
            proto = "tcp"
            if f[0] in (
                "tcp",
                "udp",
                "raw",
                "sctp",
                "u_str",
                "u_dgr",
                "u_seq",
                "p_raw",
                "p_dgr",
                "nl",
                "mptcp",
            ):
                proto, f = f[0], f[1:]
            if len(f) < 5:
                continue
            local = f[3]
            addr, _, port = local.rpartition(":")
            bare = addr.split("%", 1)[0].strip("[]")
            if bare and bare in own:
                addr = addr.replace(bare, "VM_IP", 1)
            if port.isdigit() and lo <= int(port) <= hi:
                port = "ephemeral"
            procs = sorted(set(Reboot._SS_PROCS.findall(" ".join(f[5:])))) or ["-"]
            out.add(f"{proto} {addr}:{port} {','.join(procs)}")
        return sorted(out)

    def parse_failed_units(text):
        """`systemctl --failed --plain --no-legend` -> sorted unit names."""
        return sorted(
            {
                ln.split()[0]
                for ln in (text or "").splitlines()
                if ln.split() and not ln.startswith(("0 loaded", "UNIT"))
            }
        )

    def pair_enabled_active(units_text, states_text):
        """`systemctl list-unit-files --state=enabled --type=service --no-legend` +
        `systemctl is-active <those units>` (one state per line, same order; template units
        `x@.service` are left out of both) -> sorted `<unit> <state>` lines."""
        units = [
            ln.split()[0]
            for ln in (units_text or "").splitlines()
            if ln.split() and not ln.split()[0].endswith("@.service")
        ]
        states = [ln.strip() for ln in (states_text or "").splitlines() if ln.strip()]
        if len(units) != len(states):
            return [f"! services: {len(units)} enabled units but {len(states)} states"]
        return sorted(f"{u} {s}" for u, s in zip(units, states, strict=True))

    def normalise_capture(sections, own_ips=()):
        """Parsed capture sections -> {"categories": {category: [lines]}, "boot_id",
        "nft_text", "port_range"}. A command that failed becomes one `! ...` line in its
        category (so it shows in the diff instead of silently comparing empty lists)."""

        def ok(name):
            s = sections.get(name)
            return s if s is not None and s["rc"] == 0 else None

        cats = {}
        cats["nft"] = Reboot._nft_lines(sections, ok("nft_json"))
        s = ok("docker")
        cats["ports"] = (
            Reboot.normalise_docker_ports(s["out"])
            if s is not None
            else [Reboot._capture_error("docker ps", sections.get("docker"))]
        )
        pr = Reboot.parse_port_range((sections.get("port_range") or {}).get("out"))
        s = ok("sockets")
        cats["sockets"] = (
            Reboot.normalise_listeners(s["out"], pr, own_ips)
            if s is not None
            else [Reboot._capture_error("ss -tulnp", sections.get("sockets"))]
        )
        s = ok("failed_units")
        cats["failed_units"] = (
            Reboot.parse_failed_units(s["out"])
            if s is not None
            else [Reboot._capture_error("systemctl --failed", sections.get("failed_units"))]
        )
        cats["services"] = Reboot._services_lines(sections, ok("enabled_units"))
        nft_text = sections.get("nft_text") or {}
        return {
            "categories": cats,
            "boot": Reboot.boot_analysis(sections) if "boot_time" in sections else None,
            "boot_id": ((sections.get("boot_id") or {}).get("out") or "").strip() or None,
            "nft_text": nft_text.get("out", "")
            if nft_text.get("rc") == 0
            else Reboot._capture_error("nft list ruleset", sections.get("nft_text")),
            "port_range": list(pr),
        }

    def _nft_lines(sections, s):
        """normalise_capture's nft category from the nft_json section `s` (None: it failed)."""
        if s is None:
            return [Reboot._capture_error("nft -j list ruleset", sections.get("nft_json"))]
        try:
            text = sections.get("nft_text") or {}
            return Reboot.normalise_nft_json(
                s["out"] or '{"nftables": []}',
                Reboot.parse_container_ips((sections.get("containers") or {}).get("out")),
                text.get("out") if text.get("rc") == 0 else None,
            )
        except (ValueError, AttributeError, TypeError) as e:
            return [f"! nft -j list ruleset: unparsable output ({e})"]

    def _services_lines(sections, s):
        """normalise_capture's services category from the enabled_units section `s` (None: it
        failed) and the enabled_active one."""
        if s is None:
            return [
                Reboot._capture_error("systemctl list-unit-files", sections.get("enabled_units"))
            ]
        # is-active exits nonzero when any unit is inactive: its rc is not an error.
        act = sections.get("enabled_active")
        if act is not None and act["rc"] in (None, 124):
            return [Reboot._capture_error("systemctl is-active", act)]
        return Reboot.pair_enabled_active(s["out"], (act or {}).get("out", ""))

    # Where a boot's time went (issue 13): systemd-analyze's own figures, kept beside each
    # capture (boot-analysis.txt) and summarised in result.json. Informational: a guest
    # without systemd-analyze, or a boot not finished, gives None, never a failure.
    _TIMESPAN = re.compile(r"(\d+(?:\.\d+)?)(h|min|ms|us|s)\b")
    _TIMESPAN_UNITS = {"h": 3600.0, "min": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}

    def parse_timespan(text):
        """systemd's "1min 3.402s" / "987ms" -> seconds (float), or None."""
        parts = Reboot._TIMESPAN.findall(text or "")
        if not parts:
            return None
        return round(sum(float(n) * Reboot._TIMESPAN_UNITS[u] for n, u in parts), 3)

    def parse_analyze_time(text):
        """`systemd-analyze time` -> {"kernel": s, "initrd": s, "userspace": s, "total": s}
        (only the parts the boot had), or None."""
        m = re.search(r"Startup finished in (.+?) = (.+?)\s*$", text or "", re.MULTILINE)
        if not m:
            return None
        out = {}
        for span, part in re.findall(r"([^+()]+?)\s*\((\w+)\)", m.group(1)):
            secs = Reboot.parse_timespan(span)
            if secs is not None:
                out[part] = secs
        total = Reboot.parse_timespan(m.group(2))
        if total is None:
            return None
        out["total"] = total
        return out

    def parse_blame(text, top=5):
        """`systemd-analyze blame` -> [[seconds, unit], ...] slowest first, at most `top`."""
        rows = []
        for line in (text or "").splitlines():
            bits = line.split()
            if len(bits) >= 2:
                secs = Reboot.parse_timespan(" ".join(bits[:-1]))
                if secs is not None:
                    rows.append([secs, bits[-1]])
        return sorted(rows, key=lambda r: -r[0])[:top]

    def boot_analysis(sections):
        """The capture's systemd-analyze sections -> {"startup", "blame_top", "text"}."""

        def out(name):
            s = sections.get(name) or {}
            return s.get("out", "") if s.get("rc") == 0 else ""

        def shown(name):
            if name not in sections and name != "boot_time":
                return (
                    "(not captured: a reboot diff's second capture and a failed run's "
                    "diagnostics run it)"
                )
            return out(name) or "(not available)"

        text = "\n\n".join(
            f"$ systemd-analyze {cmd}\n{shown(name)}"
            for name, cmd in (
                ("boot_time", "time"),
                ("boot_blame", "blame"),
                ("boot_chain", "critical-chain"),
            )
        )
        return {
            "startup": Reboot.parse_analyze_time(out("boot_time")),
            "blame_top": Reboot.parse_blame(out("boot_blame")),
            "text": text + "\n",
        }

    def diff_lines(before, after):
        """(removed, added) between two line lists, order-aware (a moved line is one
        removal and one addition; for sorted lists this is the multiset difference)."""
        removed, added = [], []
        sm = difflib.SequenceMatcher(None, before, after, autojunk=False)
        for tag, i1, i2, j1, j2 in sm.get_opcodes():
            if tag in ("replace", "delete"):
                removed += before[i1:i2]
            if tag in ("replace", "insert"):
                added += after[j1:j2]
        return removed, added

    def diff_state(before_cats, after_cats):
        """{category: {"removed": [...], "added": [...]}} for every category."""
        out = {}
        for cat in Reboot.REBOOT_DIFF_CATEGORIES:
            removed, added = Reboot.diff_lines(before_cats.get(cat, []), after_cats.get(cat, []))
            out[cat] = {"removed": removed, "added": added}
        return out

    def tolerance_patterns(spec):
        """The profile's `reboot_diff_tolerate` -> {category: [compiled regex]}. A dict maps
        a category to regexes; a plain list applies to every category."""
        if isinstance(spec, list):
            pats = [re.compile(p) for p in spec]
            return {c: pats for c in Reboot.REBOOT_DIFF_CATEGORIES}
        return {
            c: [re.compile(p) for p in (spec or {}).get(c, [])]
            for c in Reboot.REBOOT_DIFF_CATEGORIES
        }

    def capture_errors(*category_sets):
        """{category: [`! ...` line]}: commands that failed in any of the captures."""
        out = {}
        for cats in category_sets:
            for cat in Reboot.REBOOT_DIFF_CATEGORIES:
                for line in cats.get(cat, []):
                    if line.startswith("! ") and line not in out.setdefault(cat, []):
                        out[cat].append(line)
        return {c: v for c, v in out.items() if v}

    def classify_diff(diff, spec, errors=None):
        """(tolerated, unexpected): `<category>: <-|+> <line>` strings. A changed line is
        tolerated when a pattern of its category matches it (re.search, on the line without
        its sign); everything else is unexpected. `errors` (capture_errors()) adds a
        `<category>: ! <why>` entry for a category that could not be captured, even the same
        way both times: that category was not compared, which a pass must not hide."""
        pats = Reboot.tolerance_patterns(spec)
        tolerated, unexpected = [], []
        for cat in Reboot.REBOOT_DIFF_CATEGORIES:
            d = diff.get(cat, {})
            entries = [
                (f"{cat}: {sign} {line}", line)
                for sign, key in (("-", "removed"), ("+", "added"))
                for line in d.get(key, [])
            ]
            entries += [
                (f"{cat}: {line}", line)
                for line in (errors or {}).get(cat, [])
                if line not in d.get("removed", []) and line not in d.get("added", [])
            ]
            for entry, line in entries:
                (tolerated if any(p.search(line) for p in pats[cat]) else unexpected).append(entry)
        return tolerated, unexpected

    def render_state_diff(before, after, diff, tolerated, unexpected, mode, index, note=""):
        """diff.txt: a header, the verdict lines, then a unified diff per category."""
        out = [
            f"reboot {index} ({mode}): boot_id {before.get('boot_id') or '?'} -> "
            f"{after.get('boot_id') or '?'}",
            f"before: {before.get('at', '?')}   after: {after.get('at', '?')}",
        ]
        if note:
            out.append(note)
        out.append("")
        if unexpected:
            out.append(
                f"UNEXPECTED ({len(unexpected)}; not in the profile's reboot_diff_tolerate):"
            )
            out += [f"  {u}" for u in unexpected]
        if tolerated:
            out.append(f"tolerated ({len(tolerated)}; reboot_diff_tolerate):")
            out += [f"  {t}" for t in tolerated]
        if not unexpected and not tolerated:
            out.append("no differences")
        for cat in Reboot.REBOOT_DIFF_CATEGORIES:
            d = diff.get(cat, {"removed": [], "added": []})
            out += ["", f"== {cat}: {len(d['removed'])} removed, {len(d['added'])} added =="]
            if d["removed"] or d["added"]:
                out += list(
                    difflib.unified_diff(
                        before["categories"].get(cat, []),
                        after["categories"].get(cat, []),
                        f"before/{cat}.json",
                        f"after/{cat}.json",
                        lineterm="",
                        n=3,
                    )
                )
        return "\n".join(out) + "\n"

    def reboot_diff_summary(mode, index, diff, tolerated, unexpected, directory):
        return {
            "index": index,
            "mode": mode,
            "changed": any(d["removed"] or d["added"] for d in diff.values()),
            "categories": {
                c: {"added": len(d["added"]), "removed": len(d["removed"])} for c, d in diff.items()
            },
            "tolerated": tolerated,
            "unexpected": unexpected,
            "dir": str(directory),
            "diff": str(pathlib.Path(directory) / "diff.txt"),
        }

    def capture_state(ctx, rs, boot_id=None, analyze=True):
        """Guest state worth comparing across a reboot, in ONE pinned SSH round trip: the
        capture script (render_capture_script) runs as root via `sudo -n sh -s`, each command
        bounded by `timeout` (diag-command), the call by ssh-command plus those. Returns
        normalise_capture()'s dict plus boot_id, at, failed_units and the raw output.
        No usable answer -> InfraError('reboot')."""
        nonce = secrets.token_hex(6)
        per = ctx.bounds["diag-command"]
        t0 = time.monotonic()
        r = rs.ssh(
            "sudo -n sh -s",
            timeout=ctx.bounds["ssh-command"] + per * Reboot.CAPTURE_COMMANDS,
            stage="reboot",
            input=Reboot.render_capture_script(nonce, per, analyze),
        )
        sections = Reboot.parse_capture_output(r.stdout, nonce)
        if r.returncode != 0 or "boot_id" not in sections:
            why = (
                "timed out"
                if r.timed_out
                else ((r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1])
            )
            raise InfraError("reboot", f"could not capture the guest's state over SSH ({why})")
        Guest.note_span(ctx, "capture", t0)
        state = Reboot.normalise_capture(sections, own_ips=[rs.ip] if rs.ip else [])
        state["boot_id"] = boot_id or state["boot_id"]
        state["at"] = Env.now_iso()
        state["failed_units"] = [
            u for u in state["categories"]["failed_units"] if not u.startswith("!")
        ]
        state["raw"] = r.stdout
        state["seconds"] = round(r.seconds, 1)
        return state

    def write_capture(d, state):
        """One capture as files: the ruleset as text (for humans), each category's
        normalised lines as JSON, and the raw script output (to debug normalisation)."""
        d.mkdir(parents=True, exist_ok=True)
        (d / "nft-ruleset.txt").write_text(state.get("nft_text", "").rstrip("\n") + "\n")
        for cat in Reboot.REBOOT_DIFF_CATEGORIES:
            (d / f"{cat}.json").write_text(
                json.dumps(state["categories"].get(cat, []), indent=1) + "\n"
            )
        (d / "capture-raw.txt").write_text(state.get("raw", ""))
        if state.get("boot"):
            (d / "boot-analysis.txt").write_text(state["boot"]["text"])

    def reboot_diff(ctx, rs, profile, mode, before, after, result=None, policy="fail"):
        """Compare the captures around one reboot. Files go to the run's diagnostics dir
        (reboot-<n>-<mode>/before/, after/, diff.txt) on every outcome; the summary to
        result.reboot_diffs and run.json. Differences the profile's reboot_diff_tolerate
        does not cover are UNEXPECTED: they are captured once more after reboot-settle
        seconds (the guest may still be starting something), and if still there,
        VerifyFailed('reboot-diff') (policy fail) or a warning (policy warn). Returns the
        summary."""
        index = len(rs.record.reboots or []) or 1
        spec = profile.get("reboot_diff_tolerate") or {}
        d = Guest.reboot_dir(rs, index, mode)
        diff = Reboot.diff_state(before["categories"], after["categories"])
        tolerated, unexpected = Reboot.classify_diff(
            diff, spec, Reboot.capture_errors(before["categories"], after["categories"])
        )
        note = ""
        settle = ctx.bounds["reboot-settle"]
        if unexpected and settle > 0:
            after, diff, tolerated, unexpected, note = Reboot._recapture(
                ctx, rs, mode, spec, d, before, after, unexpected
            )
        Reboot.write_capture(d / "before", before)
        Reboot.write_capture(d / "after", after)
        (d / "diff.txt").write_text(
            Reboot.render_state_diff(before, after, diff, tolerated, unexpected, mode, index, note)
        )
        summary = Reboot.reboot_diff_summary(mode, index, diff, tolerated, unexpected, d)
        summary["recaptured"] = bool(note)
        summary["capture_seconds"] = {
            "before": before.get("seconds"),
            "after": after.get("seconds"),
        }
        boot = after.get("boot") or {}
        summary["boot"] = {"startup": boot.get("startup"), "blame_top": boot.get("blame_top", [])}
        if result is not None:
            result.reboot_diffs.append(summary)
        if rs.record.reboots:
            rs.record.reboots[-1]["diff"] = {
                "changed": summary["changed"],
                "unexpected": len(unexpected),
                "dir": str(d),
            }
            rs.save()
        if not unexpected:
            Env.progress(
                ctx,
                f"reboot-diff:{mode}",
                (
                    "no differences"
                    if not summary["changed"]
                    else f"{len(tolerated)} tolerated difference(s)"
                )
                + f"; {d}",
            )
            return summary
        Reboot._unexpected_found(ctx, mode, d, unexpected, summary, policy)
        return summary

    def _recapture(ctx, rs, mode, spec, d, before, after, unexpected):
        """reboot_diff's second look: after reboot-settle seconds, capture again (the first
        after-capture kept in after-first/) and classify anew; -> (after, diff, tolerated,
        unexpected, note)."""
        settle = ctx.bounds["reboot-settle"]
        Env.progress(
            ctx,
            f"reboot-diff:{mode}",
            f"{len(unexpected)} unexpected difference(s); "
            f"capturing again in {settle:g}s in case the guest is still settling",
        )
        time.sleep(settle)
        Reboot.write_capture(d / "after-first", after)
        early = unexpected
        after = Reboot.capture_state(ctx, rs)
        diff = Reboot.diff_state(before["categories"], after["categories"])
        tolerated, unexpected = Reboot.classify_diff(
            diff, spec, Reboot.capture_errors(before["categories"], after["categories"])
        )
        gone = [u for u in early if u not in unexpected]
        note = (
            f"captured twice after the boot ({settle:g}s apart; the first is in "
            f"after-first/); gone by the second capture: {len(gone)}"
            + "".join(f"\n  {g}" for g in gone)
        )
        return after, diff, tolerated, unexpected, note

    def _unexpected_found(ctx, mode, d, unexpected, summary, policy):
        """Unexpected differences remain: VerifyFailed('reboot-diff') under policy fail, else
        a warning line and summary['warning']."""
        shown = unexpected[:20]
        msg = (
            f"{len(unexpected)} unexpected difference(s) across the {mode} reboot: "
            + "; ".join(shown)
            + (f"; ... {len(unexpected) - 20} more" if len(unexpected) > 20 else "")
            + f" (diff: {d / 'diff.txt'})"
        )
        if policy == "fail":
            raise VerifyFailed(
                "reboot-diff",
                msg,
                shown,
                detail="\n".join(unexpected) + f"\n\ndiff: {d / 'diff.txt'}",
            )
        Env.progress(ctx, f"reboot-diff:{mode}", f"warning (--reboot-diff=warn): {msg}")
        summary["warning"] = msg

    # The reboot's stages, as result.json's reboot_stages and the bench table show them.
    REBOOT_STAGE_ROWS = (
        ("powered-off", "seconds_to_off"),  # graceful only: the guest's own shutdown
        ("loader", "seconds_to_loader"),
        ("kernel", "seconds_to_kernel"),
        ("ssh", "seconds_to_ssh"),
        ("system-running", "seconds_to_running"),
        ("settled", "seconds_to_settled"),  # the profile's reboot_settled_when, if it has one
    )


# --------------------------------------------------------------------------------------
# Machine: the VM's verbs (create, start, waits, ssh, reboot and its proof, save, destroy)
# --------------------------------------------------------------------------------------
# One run's VM as an object, after the NixOS test driver's Machine (start, reboot, wait_for_*
# on one retry helper) and cockpit's ssh_connection (the boot id read at login; a reboot is
# "disconnect, wait until the id differs"). Its state stays the run's (RunState, run.json);
# every wait goes through wait_until (a bound, a poll, the console's kernel panic).


class Machine:
    """The VM of the run `rs`: create (keys, seed, disks, define), start (the first boot),
    the named waits, ssh, reboot(mode) proved by a new boot id, save and restore (a
    checkpoint's memory image), step_clock (after a restore), destroy."""

    def __init__(self, ctx, rs):
        self.ctx, self.rs = ctx, rs

    def create(self, profile, accel, image):
        """The run's keys and NoCloud seed, its disks, its domain defined."""
        self._write_keys_and_seed_data(self.rs.name)
        overlay, seed = self._create_disks(image)
        self.define(profile, accel, image, overlay, seed)

    def ssh(self, command, timeout, stage="ssh", input=None, shared=True):
        """`command` on the guest over pinned SSH (RunState.ssh)."""
        return self.rs.ssh(command, timeout, stage=stage, input=input, shared=shared)

    def _write_keys_and_seed_data(self, name):
        """The run's client key and the guest's host key (ssh-keygen), known_hosts pinning
        that host key, and the NoCloud user-data/meta-data that carry both."""
        ctx, rs = self.ctx, self.rs
        for key, role in (("id_ed25519", "client"), ("ssh_host_ed25519_key", "host")):
            run(
                Guest.ssh_keygen_argv(rs.dir / key, f"boma-it {role} {name}"),
                timeout=30,
                check=True,
                stage="keys",
                cmdlog=ctx.cmdlog,
            )
        host_pub = (rs.dir / "ssh_host_ed25519_key.pub").read_text()
        (rs.dir / "known_hosts").write_text(Guest.known_hosts_line(name, host_pub))
        (rs.dir / "user-data").write_text(
            Guest.render_user_data(
                (rs.dir / "id_ed25519.pub").read_text(),
                ANSIBLE_USER,
                host_key_private=(rs.dir / "ssh_host_ed25519_key").read_text(),
                host_key_public=host_pub,
            )
        )
        (rs.dir / "meta-data").write_text(Guest.render_meta_data(f"iid-{name}", name))

    def _create_disks(self, image):
        """The run's overlay on the golden image and its NoCloud seed, root-only (DISK_MODE);
        -> (overlay, seed)."""
        ctx, rs = self.ctx, self.rs
        overlay, seed = rs.overlay, rs.disk_dir / "seed.img"
        os.chmod(rs.disk_dir, 0o700)  # until the seed (a private key) is root-only
        Guest.make_overlay(ctx, image.disk, overlay, "boot")
        run(
            Guest.cloud_localds_argv(seed, rs.dir / "user-data", rs.dir / "meta-data"),
            timeout=60,
            check=True,
            stage="boot",
            cmdlog=ctx.cmdlog,
        )
        os.chmod(seed, DISK_MODE)
        os.chmod(rs.disk_dir, 0o755)  # QEMU (not root) opens the disks by path
        return overlay, seed

    def define(self, profile, accel, image, overlay, seed):
        """virt-install --print-xml for the run, checked and stamped with the ownership
        metadata, saved as domain.xml and defined."""
        ctx, rs = self.ctx, self.rs
        data, name, host = rs.record, rs.name, profile["name"]
        osinfo = Guest.osinfo_for(ctx)
        with Utilities.transient_pool(ctx, name, rs.disk_dir):
            xml = run(
                Guest.virt_install_argv(
                    ctx.uri,
                    name,
                    profile["mem_mib"],
                    profile["vcpus"],
                    overlay,
                    seed,
                    data.mac,
                    rs.console_log,
                    "kvm" if accel == "kvm" else "qemu",
                    osinfo,
                ),
                timeout=120,
                check=True,
                stage="boot",
                cmdlog=ctx.cmdlog,
            ).stdout
        if Guest.domain_name_from_xml(xml) != name:
            raise InfraError("boot", "virt-install --print-xml returned XML for another domain")
        xml = Guest.add_domain_metadata(
            xml,
            Utilities.render_metadata_xml(
                data.created_at + "/" + name, data.created_at, host, data.owner, host
            ),
        )
        (rs.dir / "domain.xml").write_text(xml)
        data.state = "defined"
        rs.save()
        virsh(ctx, "define", rs.dir / "domain.xml", check=True, stage="boot")

    # Under TCG the guest's kernel has been seen to oops in its own code patching before
    # systemd was up (`Oops: int3` in free_unref_page, two vCPUs emulated on host threads:
    # text_poke's breakpoint dance racing the emulator). That is the emulator's, not the
    # image's: a first boot that panics, before anything of the system under test has run in
    # the guest, is started once more on a fresh overlay (same image, same seed) and says so.
    # A second panic is the error it always was; on a later boot (the reboots after the
    # applies) only the emulator's own `Oops: int3` is retried (_wait_new_boot_past_emulator_oops).
    def start(self, image):
        """The run's first boot (_boot_once), once more after a kernel panic. -> the panic
        line of the first attempt, or None."""
        ctx, rs = self.ctx, self.rs
        try:
            self._boot_once()
            return None
        except GuestPanicked as e:
            Env.progress(
                ctx,
                "boot",
                f"{e.msg}; nothing has been applied: starting once more on a fresh overlay",
            )
            virsh(ctx, "destroy", rs.domain, check=True, stage="boot")
            rs.overlay.unlink()
            Guest.make_overlay(ctx, image.disk, rs.overlay, "boot")
            self._boot_once()
            return e.panic

    def _boot_once(self):
        ctx, rs = self.ctx, self.rs
        t0 = time.monotonic()
        stages = rs.record.boot_stages = {}  # seconds from `virsh start` to each stage

        def reached(stage, msg):
            stages[stage] = round(time.monotonic() - t0, 1)
            Env.progress(ctx, "boot", msg)

        rs.mark_console()
        with rs.watching_for_the_kernel():
            virsh(ctx, "start", rs.domain, check=True, stage="domain-running")
            rs.record.state = "booting"
            rs.save()
            self.wait_domain_running()
            reached("domain-running", f"domain-running {rs.name}")
            ip = self.wait_lease()
        reached("dhcp-lease", f"dhcp-lease {ip}")
        self.wait_tcp22()
        reached("tcp-22", "tcp-22 open")
        self.wait_ssh()
        reached("ssh-handshake", "ssh-handshake ok (pinned host key)")
        self.wait_cloud_init()
        stages["cloud-init"] = round(time.monotonic() - t0, 1)
        Guest.note_span(ctx, "boot", t0, who="guest")
        for name, _ in Guest.CONSOLE_MILESTONES:  # firmware, then the boot loader's loading
            if rs.seconds_to(name, t0) is not None:
                stages[name] = rs.seconds_to(name, t0)
        rs.record.boot_ids.append(self.read_boot_id())
        rs.record.state = "up"
        rs.save()
        Guest.write_current(ctx, rs)
        Env.progress(ctx, "boot", "cloud-init done")

    def wait_domain_running(self):
        ctx, rs = self.ctx, self.rs

        def probe(_):
            r = virsh(ctx, "domstate", rs.domain)
            return r.returncode == 0 and r.stdout.strip() == "running"

        Guest.wait_until(
            ctx,
            "domain-running",
            ctx.bounds["domain-running"],
            probe,
            f"domain {rs.domain} to run",
            rs,
            poll=Guest.local_poll(ctx),
        )

    def wait_lease(self, stage="dhcp-lease"):
        ctx, rs = self.ctx, self.rs

        def probe(_):
            r = virsh(ctx, "domifaddr", rs.domain, "--source", "lease")
            return Network.parse_lease_ip(r.stdout, rs.record.mac) if r.returncode == 0 else None

        ip = Guest.wait_until(
            ctx,
            stage,
            ctx.bounds["dhcp-lease"],
            probe,
            f"a DHCP lease for {rs.record.mac}",
            rs,
            poll=Guest.local_poll(ctx),
        )
        rs.record.ip = ip
        rs.save()
        return ip

    def wait_tcp22(self, stage="tcp-22"):
        ctx, rs = self.ctx, self.rs
        Guest.wait_until(
            ctx,
            stage,
            ctx.bounds["tcp-22"],
            lambda dl: Guest.tcp_open(rs.ip, ctx.ssh_port, min(5, dl - time.monotonic())),
            f"TCP {rs.ip}:{ctx.ssh_port}",
            rs,
            poll=Guest.local_poll(ctx),
        )

    def gated_by_tcp22(self, attempt):
        """A probe for a wait at local_poll(): attempt(deadline) only once TCP 22 answers, and
        at most every ctx.poll. A connect costs the guest nothing; an SSH handshake costs a
        TCG guest 1-2.6 s of emulated crypto, so attempts stay at the harness's poll while the
        port is looked at often (a 2 s poll found a new boot's sshd ~1 s late on average)."""
        ctx, rs = self.ctx, self.rs
        last = [None]

        def probe(deadline):
            if not Guest.tcp_open(rs.ip, ctx.ssh_port, min(1.0, deadline - time.monotonic())):
                return None
            if last[0] is not None and time.monotonic() - last[0] < ctx.poll:
                return None
            last[0] = time.monotonic()
            return attempt(deadline)

        return probe

    def wait_ssh(self, stage="ssh-handshake", command="true", accept=None):
        """Pinned-key SSH until `command` succeeds (and accept(stdout) holds)."""
        ctx, rs = self.ctx, self.rs
        last = {"err": ""}

        def probe(deadline):
            left = deadline - time.monotonic()
            r = rs.ssh(command, timeout=max(0.2, min(ctx.bounds["ssh-attempt"], left)))
            if r.returncode == 0 and (accept is None or accept(r.stdout)):
                return r.stdout or True
            last["err"] = (
                "attempt timed out"
                if r.timed_out
                else ((r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1])
            )
            return None

        try:
            return Guest.wait_until(
                ctx,
                stage,
                ctx.bounds[stage if stage in ctx.bounds else "ssh-handshake"],
                probe,
                f"SSH to {ANSIBLE_USER}@{rs.ip} ({command})",
                rs,
            )
        except GuestPanicked:
            raise  # the panic line says it all
        except InfraError as e:
            raise InfraError(e.stage, f"{e.msg}; last: {last['err']}") from None

    def wait_cloud_init(self):
        ctx, rs = self.ctx, self.rs
        bound = ctx.bounds["cloud-init"]
        r = rs.ssh(
            f"timeout {bound:.0f} sh -c '{Guest.CLOUD_INIT_WAIT}'",
            timeout=bound + 5,
            stage="cloud-init",
        )
        if r.timed_out or r.returncode == 124:
            raise InfraError(
                "cloud-init",
                f"cloud-init had not finished after {bound:.0f}s (no {Guest.CLOUD_INIT_RESULT}); "
                f"console log: {rs.console_log}",
            )
        if r.returncode != 0:
            raise InfraError(
                "cloud-init",
                f"could not read {Guest.CLOUD_INIT_RESULT} (exit {r.returncode}): "
                f"{r.stderr.strip()[-300:]}",
            )
        errors, recoverable = Guest.parse_cloud_init_result(r.stdout)
        if errors:
            raise InfraError("cloud-init", f"cloud-init failed: {'; '.join(errors)[-300:]}")
        if recoverable:
            Env.progress(
                ctx,
                "boot",
                f"cloud-init finished with recoverable errors: {'; '.join(recoverable)[:300]}",
            )

    def read_boot_id(self, timeout=None):
        ctx, rs = self.ctx, self.rs
        r = rs.ssh(
            "cat /proc/sys/kernel/random/boot_id",
            timeout=timeout or ctx.bounds["ssh-command"],
            stage="ssh",
        )
        if r.returncode != 0:
            raise InfraError(
                "ssh", f"could not read boot_id (exit {r.returncode}): {r.stderr.strip()[-200:]}"
            )
        return r.stdout.strip()

    def queued_jobs(self):
        """`; jobs still queued: <unit> (<type>), ...` from the guest's `systemctl list-jobs`,
        or "": what held a boot in `starting` (a timer's long job at hh:00 has). Never fails."""
        ctx, rs = self.ctx, self.rs
        r = rs.ssh("systemctl list-jobs --no-legend --no-pager", timeout=ctx.bounds["ssh-command"])
        if r.timed_out:
            return ""
        rows = [ln.split() for ln in r.stdout.splitlines()]
        jobs = [f"{row[1]} ({row[2]})" for row in rows if len(row) >= 3 and row[0].isdigit()]
        return f"; jobs still queued: {', '.join(jobs)}" if jobs else ""

    def wait_boot_finished(self):
        """-> (state, timer_jobs): the guest's `is-system-running` once its boot is over, or
        ("starting", [units]) when only timer-started jobs are left. InfraError('reboot') when
        the boot had not finished within the bound, naming the jobs that held it."""
        ctx, rs = self.ctx, self.rs
        bound = ctx.bounds["system-running"]
        r = rs.ssh(f"timeout {bound:.0f} sh -c '{Guest.boot_wait_script()}'", timeout=bound + 5)
        lines = r.stdout.split("\n")
        state = lines[0].strip() or ("timeout" if r.timed_out or r.returncode == 124 else "unknown")
        timer_jobs = []
        if state == "starting" and len(lines) > 1 and lines[1].startswith("timer-jobs:"):
            timer_jobs = lines[1].split()[1:]
        if state not in ("running", "degraded") and not timer_jobs:
            raise InfraError(
                "reboot",
                f"system state {state!r} after {bound:.0f}s "
                f"(`systemctl is-system-running --wait`{self.queued_jobs()}); "
                f"console log: {rs.console_log}",
            )
        return state, timer_jobs

    def reboot(self, mode="graceful", before=None, settled_when=None):
        """Reboot and PROVE it: boot_id must change. graceful = the guest's own clean
        shutdown on the ACPI power button, then power on; hard = power cut (virsh destroy).
        Either way the next boot is a fresh QEMU process (virsh start). `before`: a capture
        taken moments ago with nothing run since (the previous reboot's `after`), instead of
        capturing again. `settled_when`: the profile's reboot_settled_when (wait_settled),
        waited for before the capture after the boot."""
        ctx, rs = self.ctx, self.rs
        if mode not in REBOOT_MODES:
            raise UsageError(f"--reboot must be one of {', '.join(REBOOT_MODES)}")
        before = before or Reboot.capture_state(ctx, rs, analyze=False)
        rs.close_ssh()  # its connection dies with this boot
        rs.mark_console()
        with rs.watching_for_the_kernel():
            issued = time.monotonic()
            to_off, shutdown_console = None, None
            if mode == "graceful":
                to_off, shutdown_console = self.shut_down_cleanly(before)
            else:
                virsh(ctx, "destroy", rs.domain, check=True, stage="reboot")
                Env.progress(ctx, "reboot:hard", f"power cut; old boot_id {before['boot_id'][:8]}")
            virsh(ctx, "start", rs.domain, check=True, stage="reboot")
            new_id, oops_panic = self._wait_new_boot_past_emulator_oops(before, issued)
        to_ssh = round(time.monotonic() - issued, 1)
        to_loader, to_kernel = rs.seconds_to("loader", issued), rs.seconds_to("kernel", issued)
        sysstate, timer_jobs = self.wait_boot_finished()
        to_running = round(time.monotonic() - issued, 1)
        to_settled = None
        if settled_when and self.wait_settled(settled_when):
            to_settled = round(time.monotonic() - issued, 1)
        Guest.note_span(
            ctx, f"reboot:{mode}", issued, who="guest", seconds=to_settled or to_running
        )
        # systemd-analyze's blame and critical-chain (~3 s of a TCG guest each) only where a
        # reboot failed: the reboot diff's second capture and the diagnostics bundle
        after = Reboot.capture_state(ctx, rs, boot_id=new_id, analyze="time")
        rs.record.boot_ids.append(new_id)
        stages = {
            "seconds_to_off": to_off,
            "seconds_to_loader": to_loader,
            "seconds_to_kernel": to_kernel,
            "seconds_to_ssh": to_ssh,
            "seconds_to_running": to_running,
            "seconds_to_settled": to_settled,
        }
        record = {"mode": mode, "system_state": sysstate, "failed_units": after["failed_units"]}
        if timer_jobs:
            record["timer_jobs"] = timer_jobs
        if oops_panic:
            record["emulator_oops"] = oops_panic
        self._record_reboot(record, stages, shutdown_console)
        Env.progress(
            ctx,
            f"reboot:{mode}",
            f"new boot_id {new_id[:8]}: " + Guest._reboot_story(record, stages),
        )
        return before, after

    def _record_reboot(self, record, stages, shutdown_console):
        """The reboot into run.json's reboots; a graceful one's stop jobs, and its shutdown
        console kept in the reboot's diagnostics dir."""
        rs = self.rs
        if shutdown_console is not None:
            record["stop_jobs"] = Guest.shutdown_stop_jobs(shutdown_console)
            d = Guest.reboot_dir(rs, len(rs.record.reboots or []) + 1, record["mode"])
            d.mkdir(parents=True, exist_ok=True)
            Utilities.write_owned(Utilities.owned_path(d, "shutdown-console.txt"), shutdown_console)
        rs.record.reboots = [*(rs.record.reboots or []), {**record, **stages}]
        rs.save()

    def wait_settled(self, condition):
        """The profile's `reboot_settled_when`: a shell condition for what the host still
        starts after systemd reports the boot over (a control node's libvirtd brings its
        autostarted network up after it says it is ready). Polled once a second in the
        guest as root (as the capture reads it), in one SSH call, within reboot-settle; the
        after-capture then sees the settled host instead of capturing twice. True when it
        held; False (one line) when not: the reboot diff's own second look still applies."""
        ctx = self.ctx
        bound = ctx.bounds["reboot-settle"]
        if bound <= 0:
            return False
        script = f"until {condition}; do sleep 1; done"
        secs = max(1, math.ceil(bound))  # coreutils' `timeout 0` would never end it
        r = self.rs.ssh(
            f"sudo -n timeout {secs} sh -c {shlex.quote(script)}",
            timeout=bound + 15,
            stage="reboot",
        )
        if r.returncode == 0:
            return True
        Env.progress(
            ctx,
            "reboot",
            f"reboot_settled_when still false after {secs}s (exit {r.returncode}): "
            "capturing anyway",
        )
        return False

    def shut_down_cleanly(self, before):
        """A graceful reboot's first half: the ACPI power button, as `virsh reboot` sends a
        guest without an agent, and the guest's own clean shutdown, within the reboot bound.
        The caller then starts the domain in a fresh QEMU process rather than have libvirt
        reset the guest in place: under TCG a guest reset inside a QEMU that had run for
        minutes took 9-31 s from GRUB to the kernel banner, a fresh one 3.7 s (ADR-030).
        -> (seconds until the domain was off, what its console printed meanwhile)."""
        ctx, rs = self.ctx, self.rs
        t0 = time.monotonic()
        virsh(ctx, "shutdown", rs.domain, "--mode", "acpi", check=True, stage="reboot")
        Env.progress(
            ctx, "reboot:graceful", f"power button pressed; old boot_id {before['boot_id'][:8]}"
        )

        def off(_):
            r = virsh(ctx, "domstate", rs.domain)
            return r.returncode == 0 and r.stdout.strip() == "shut off"

        what = f"the guest to power off after the ACPI power button (domain {rs.domain})"
        # A local `virsh domstate` is cheap and the start waits on it (LOCAL_POLL).
        Guest.wait_until(
            ctx, "reboot", ctx.bounds["reboot"], off, what, rs, poll=Guest.local_poll(ctx)
        )
        # Read before `virsh start`: the new QEMU process starts the console log afresh.
        return round(time.monotonic() - t0, 1), Guest.ANSI_ESCAPE.sub(
            "", rs.console_since_mark() or ""
        )

    def _wait_new_boot(self, before, issued):
        """After a reboot issued at `issued`: the lease again, then a boot_id over SSH other
        than `before`'s, within the reboot bound; -> the new boot_id."""
        ctx, rs = self.ctx, self.rs
        deadline = issued + ctx.bounds["reboot"]

        def new_boot(_):
            left = deadline - time.monotonic()
            r = rs.ssh(
                "cat /proc/sys/kernel/random/boot_id",
                timeout=max(0.2, min(ctx.bounds["ssh-attempt"], left)),
                shared=False,  # it may reach the old boot's sshd on its way down
            )
            bid = r.stdout.strip() if r.returncode == 0 else None
            return bid if bid and bid != before["boot_id"] else None

        try:
            self.wait_lease(stage="reboot")
            new_id = Guest.wait_until(
                ctx,
                "reboot",
                max(0.0, deadline - time.monotonic()),
                self.gated_by_tcp22(new_boot),
                "a new boot_id over SSH",
                rs,
                poll=Guest.local_poll(ctx),
            )
        except InfraError as e:
            msg = (
                f"{e.msg} (boot_id before: {before['boot_id']}; the guest "
                "did not come back from a new boot)"
            )
            if isinstance(e, GuestPanicked):
                raise GuestPanicked("reboot", msg, e.panic) from None
            raise InfraError("reboot", msg) from None
        return new_id

    def _wait_new_boot_past_emulator_oops(self, before, issued):
        """_wait_new_boot, once more after the emulator's int3 oops under TCG.
        -> (new boot_id, the panic line of the boot that died, or None)."""
        ctx, rs = self.ctx, self.rs
        try:
            return self._wait_new_boot(before, issued), None
        except GuestPanicked as e:
            oops = Guest.TCG_INT3_OOPS.search(rs.console_since_mark() or "")
            if rs.record.accel != "tcg" or not oops:
                raise
            Env.progress(
                ctx,
                "reboot",
                f"{e.msg}; that is the emulator's code-patching race (Oops: int3 under TCG), "
                "not the host's: powering it on once more",
            )
            virsh(ctx, "destroy", rs.domain, stage="reboot")
            rs.mark_console()
            virsh(ctx, "start", rs.domain, check=True, stage="reboot")
            return self._wait_new_boot(before, time.monotonic()), e.panic

    def step_clock(self):
        """A restored guest's clock stands where it was saved; apt rejects Release files from
        its 'future'. Step it to the controller's (the sandbox has no NTP). First wait for SSH:
        the restored guest's network takes a moment (it took 3 s while the bridge ran STP,
        see NET_XML)."""
        ctx, rs = self.ctx, self.rs
        self.wait_ssh(stage="resume")
        r = rs.ssh(
            f"sudo -n date -u -s @{int(time.time())}",
            timeout=ctx.bounds["ssh-command"],
            stage="resume",
        )
        if r.returncode != 0:
            raise InfraError(
                "resume",
                f"could not set the restored guest's clock: "
                f"{(r.stderr.strip().splitlines() or ['?'])[-1]}",
            )

    def save(self, image):
        """Save the running guest (memory and device state) to `image` and stop it: the Proc
        of `virsh save` (libvirt aborts a failed save, and the guest runs on)."""
        self.rs.close_ssh()  # a saved guest's TCP peers see it stop
        return virsh(
            self.ctx,
            "save",
            self.rs.domain,
            image,
            "--running",
            timeout=self.ctx.bounds["checkpoint"],
            stage="checkpoint",
        )

    def restore(self, image, stage, xml=None):
        """Resume the guest saved in `image` (virsh restore), as the domain XML `xml` when
        given."""
        virsh(
            self.ctx,
            "restore",
            image,
            *(("--xml", xml) if xml else ()),
            timeout=self.ctx.bounds["checkpoint"],
            check=True,
            stage=stage,
        )

    def destroy(self):
        """Destroy the VM and its disks; keep run.json/logs/result (state=down)."""
        ctx, rs = self.ctx, self.rs
        run_id = rs.record.created_at + "/" + rs.name
        rs.close_ssh()
        Utilities.destroy_domain(ctx, rs.domain, run_id)
        shutil.rmtree(rs.disk_dir, ignore_errors=True)
        if rs.dir.is_dir():
            rs.record.state = "down"
            rs.record.down_at = Env.now_iso()
            rs.save()


def create_run(ctx, profile, certs, accel, image, session):
    """Everything a run needs on disk, then define (with ownership metadata). The run
    state is attached to `session` as soon as it exists, so a failure anywhere
    after that is cleaned up by Machine.destroy."""
    host = profile["name"]
    name = Guest.vm_name(host)
    data = {
        "name": name,
        "host": host,
        "profile": profile["path"],
        "certs": certs,
        "accel": accel,
        "mac": Network.make_mac(secrets.token_bytes(3)),
        "ip": None,
        "created_at": Env.now_iso(),
        "owner": Env.owner_name(),
        "image": str(image.disk),
        "image_key": image.key,
        "state": "creating",
        "boot_ids": [],
        "uri": ctx.uri,
        "mem_mib": profile["mem_mib"],
        "vcpus": profile["vcpus"],
    }
    rs = Guest.open_run(ctx, data, session)
    Machine(ctx, rs).create(profile, accel, image)
    return rs


# --------------------------------------------------------------------------------------
# Ansible: transport, the transient inventory, argv, output parsing, apply and verify
# --------------------------------------------------------------------------------------
# The single-host transient inventory and its guard, the strategy (Mitogen or linear),
# ansible-playbook's argv and environment, its output parsed into task results, apply,
# verify, the idempotence pass, and the bench's per-call transport comparison.


class Ansible:
    """The Ansible section as a namespace (its functions called on the class, never an
    instance): transport, transient inventory, argv, output, apply, verify."""

    # Under TCG every module call costs ~2.7 s of emulated Python (the guest unpacks and
    # compiles AnsiballZ's module_utils per task); Mitogen keeps one interpreter in the guest
    # for the whole play and ships each module once. The harness uses it unless told not to
    # (--strategy default / BOMA_IT_ANSIBLE_STRATEGY=default), or it cannot load, in which case
    # the run says why and falls back to ansible-core's own linear strategy.
    MITOGEN_STRATEGY = "mitogen_linear"
    MITOGEN_PROBE = (
        "import os, ansible_mitogen.plugins.strategy.mitogen_linear as s; "
        "print(os.path.dirname(s.__file__))"
    )

    def script_interpreter(first_line):
        """The interpreter of a `#!` line (`#!/usr/bin/env python3` -> python3), or None."""
        if not first_line.startswith("#!"):
            return None
        words = first_line[2:].split()
        if words and pathlib.PurePath(words[0]).name == "env":
            words = [w for w in words[1:] if not w.startswith("-")]
        return words[0] if words else None

    def strategy_choice(requested, probe_rc=None, probe_out="", probe_err=""):
        """What ansible-playbook runs with: {requested, used, plugin_dir, fallback}.
        `probe_*` is the result of importing Mitogen's strategy with ansible-playbook's own
        interpreter (rc None: no interpreter found)."""
        choice = {"requested": requested, "used": "linear", "plugin_dir": None, "fallback": None}
        if requested != "mitogen":
            return choice
        lines = (probe_out or "").strip().splitlines()
        if probe_rc == 0 and lines and pathlib.PurePath(lines[-1]).is_absolute():
            choice.update(used=Ansible.MITOGEN_STRATEGY, plugin_dir=lines[-1])
        elif probe_rc is None:
            choice["fallback"] = "cannot tell ansible-playbook's interpreter (no #! line)"
        else:
            err = (probe_err or "").strip().splitlines()
            choice["fallback"] = "Mitogen does not load: " + (err[-1] if err else f"rc {probe_rc}")
        return choice

    def strategy_env(choice):
        """The environment that selects the strategy: explicit either way, so an operator's
        ANSIBLE_STRATEGY never decides what a harness run measures."""
        if choice and choice["used"] == Ansible.MITOGEN_STRATEGY:
            return {
                "ANSIBLE_STRATEGY_PLUGINS": choice["plugin_dir"],
                "ANSIBLE_STRATEGY": Ansible.MITOGEN_STRATEGY,
            }
        return {"ANSIBLE_STRATEGY": "linear"}

    def resolve_strategy(ctx, ansible_playbook):
        """strategy_choice() for the active run (ctx.session), probed once (a fraction of a second
        on the controller) and announced once, fallback included."""
        active = ctx.session
        if active.strategy is not None:
            return active.strategy
        rc = out = err = None
        if ctx.strategy_request == "mitogen":
            try:
                with open(
                    shutil.which(ansible_playbook, path=ctx.environ.get("PATH"))
                    or ansible_playbook,
                    "rb",
                ) as f:
                    interp = Ansible.script_interpreter(f.readline(256).decode("utf-8", "replace"))
            except OSError:
                interp = None
            if interp:
                try:
                    r = run([interp, "-c", Ansible.MITOGEN_PROBE], timeout=60, cmdlog=ctx.cmdlog)
                    rc, out, err = r.returncode, r.stdout, r.stderr
                except InfraError as e:  # the #! names an interpreter that is not there
                    rc, err = "missing", str(e)
        active.strategy = Ansible.strategy_choice(ctx.strategy_request, rc, out or "", err or "")
        msg = f"strategy {active.strategy['used']}"
        if active.strategy["fallback"]:
            msg += f" (fallback from mitogen: {active.strategy['fallback']})"
        Env.progress(ctx, "ansible", msg)
        return active.strategy

    def ansible_unsafe(value):
        """`value` as Ansible reads a string it must never template (JSON's form of YAML's
        `!unsafe`, which its inventory and vars loaders decode)."""
        return {"__ansible_unsafe": str(value)}

    def render_run_hosts(name, ip, ansible_user, groups, host_vars=None):
        """Transient single-host inventory, as JSON (which Ansible's YAML inventory plugin reads:
        JSON is YAML). `host_vars` is an optional {var: value}; each value is written as a
        string. Every value is marked unsafe: an address or a path read back from a state
        file is data, never a Jinja template. Single test host ONLY (safety invariant: no
        real host is ever in scope)."""
        host = {"ansible_host": ip, "ansible_user": ansible_user, **(host_vars or {})}
        host = {k: Ansible.ansible_unsafe(v) for k, v in host.items()}
        children = {g: {"hosts": {name: dict(host)}} for g in groups}
        return json.dumps({"all": {"children": children}}, indent=2) + "\n"

    def inventory_host_names(inventory_text):
        """Every host name an inventory (JSON, as rendered by render_run_hosts) declares: the
        keys (or items) of every `hosts` value at any depth. Over-counting only makes the
        single-host guard refuse; text that is not JSON is an InfraError."""
        try:
            data = json.loads(inventory_text)
        except ValueError as e:
            raise InfraError("inventory", f"transient inventory is not JSON: {e}") from None
        names, todo = set(), [data]
        while todo:
            node = todo.pop()
            if isinstance(node, list):
                todo += node
            elif isinstance(node, dict):
                hosts = node.get("hosts")
                if isinstance(hosts, (dict, list)):
                    names.update(str(h) for h in hosts if not isinstance(h, (dict, list)))
                elif hosts is not None:
                    names.add(str(hosts))
                todo += node.values()
        return names

    def assert_single_host_inventory(inventory_text, name):
        """Safety invariant: the transient inventory holds the test VM and nothing else."""
        found = Ansible.inventory_host_names(inventory_text)
        if found != {name}:
            raise InfraError(
                "inventory",
                f"transient inventory must hold only {name}, "
                f"found {sorted(found)} — refusing to run ansible-playbook",
            )

    def write_run_inventory(ctx, rs, groups, with_vault=False):
        """<run>/inventory/hosts.json (only the VM; JSON, read by Ansible's yaml inventory
        plugin, whose yaml_extensions include .json) + group_vars symlinks (minus vault.yml,
        unless the cert tier needs the real secrets)."""
        inv = rs.dir / "inventory"
        if inv.exists():
            shutil.rmtree(inv)
        gv = inv / "group_vars"
        gv.mkdir(parents=True)
        host_vars = {}
        if ctx.ssh_port != 22:
            host_vars["ansible_port"] = ctx.ssh_port
        host_vars["ansible_ssh_common_args"] = Ansible.ansible_ssh_args(rs.dir, rs.domain)
        text = Ansible.render_run_hosts(rs.domain, rs.ip, ANSIBLE_USER, groups, host_vars=host_vars)
        (inv / "hosts.json").write_text(text)
        src = ctx.repo / "inventories" / "production" / "group_vars"
        if src.is_dir():
            for entry in sorted(src.iterdir()):
                if entry.name == "vault.yml" and not with_vault:
                    continue
                if entry.is_dir():
                    (gv / entry.name).mkdir()
                    for f in sorted(entry.rglob("*")):
                        if f.is_file() and (f.name != "vault.yml" or with_vault):
                            dst = gv / entry.name / f.relative_to(entry)
                            dst.parent.mkdir(parents=True, exist_ok=True)
                            dst.symlink_to(f)
                elif entry.is_file():
                    (gv / entry.name).symlink_to(entry)
        return inv / "hosts.json"

    def ansible_ssh_args(run_dir, alias):
        """ANSIBLE_SSH_ARGS: ansible.cfg's multiplexing plus the pinned options (no -p:
        the port goes to the inventory)."""
        opts = Guest.ssh_options(run_dir, alias)[:-2]
        return " ".join(
            ["-o ControlMaster=auto", "-o ControlPersist=60s"] + [shlex.quote(o) for o in opts]
        )

    def ansible_playbook_argv(
        ansible_playbook, inventory, playbook, limit, tags=(), extra_files=()
    ):
        if not limit:
            raise InfraError("inventory", "refusing to run ansible-playbook without --limit")
        argv = [str(ansible_playbook), "-i", str(inventory), str(playbook), "--limit", limit]
        if tags:
            argv += ["--tags", ",".join(tags)]
        for f in extra_files:
            argv += ["-e", f"@{f}"]
        return argv

    def ansible_env(base_env, repo_root, run_dir, alias, strategy=None):
        env = dict(base_env)
        env.pop("ANSIBLE_STRATEGY_PLUGINS", None)
        env.update(Ansible.strategy_env(strategy))
        env.update(
            {
                "ANSIBLE_CONFIG": str(pathlib.Path(repo_root) / "ansible.cfg"),
                "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(pathlib.Path(run_dir) / "facts"),
                "ANSIBLE_SSH_ARGS": Ansible.ansible_ssh_args(run_dir, alias),
                "ANSIBLE_HOST_KEY_CHECKING": "True",
                # The connection's own timeout (default 10 s) is for real hardware: an emulated
                # guest busy starting Docker right after a boot can take longer to answer the
                # first connection of a play (Mitogen's bootstrap ships its core on it).
                "ANSIBLE_TIMEOUT": "30",
                "ANSIBLE_RETRY_FILES_ENABLED": "False",
                "ANSIBLE_NOCOLOR": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def find_ansible_playbook(ctx):
        explicit = ctx.settings["BOMA_IT_ANSIBLE_PLAYBOOK"]
        if explicit:
            return explicit
        found = shutil.which("ansible-playbook", path=ctx.environ.get("PATH"))
        if found:
            return found
        venv = ctx.repo / ".venv" / "bin" / "ansible-playbook"
        return str(venv) if venv.exists() else "ansible-playbook"

    _RECAP = re.compile(
        r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
        r"(?:\s+skipped=(\d+))?(?:\s+rescued=(\d+))?(?:\s+ignored=(\d+))?",
        re.MULTILINE,
    )

    def parse_recap(output):
        """PLAY RECAP lines -> {host: {ok, changed, unreachable, failed, ...}} (summed over
        several plays' recaps)."""
        out = {}
        for m in Ansible._RECAP.finditer(output or ""):
            keys = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
            counts = out.setdefault(m.group(1), dict.fromkeys(keys, 0))
            for k, v in zip(keys, m.groups()[1:], strict=True):
                counts[k] += int(v or 0)
        return out

    # A handler's results follow its own header: without it, a handler that changes would be
    # counted against the task printed before it.
    _TASK = re.compile(r"^(?:TASK|RUNNING (HANDLER)) \[(.+?)\]")
    _RESULT = re.compile(
        r"^(ok|changed|fatal|failed|skipping|included): \[([^\]]+)\]:?"
        r"(?: =>)?(?: \(item=(.*?)\)(?: =>|$))?"
    )
    _MSG_JSON = re.compile(r'"msg":\s*"((?:[^"\\]|\\.)*)"')
    _MSG_YAML = re.compile(r"^\s*msg:\s*(.+?)\s*$")
    _RANK = {"skipped": 0, "ok": 1, "changed": 2, "failed": 3}

    def _status(word):
        return {"fatal": "failed", "skipping": "skipped", "included": "ok"}.get(word, word)

    def _failure_message(lines, i):
        """The msg of a failure printed at lines[i] (JSON on the line, or YAML below it)."""
        block = [lines[i]]
        for nxt in lines[i + 1 : i + 40]:
            if not nxt.startswith((" ", "\t")):
                break
            block.append(nxt)
        for ln in block:
            m = Ansible._MSG_JSON.search(ln)
            if m:
                return m.group(1).replace('\\"', '"')[:600]
            m = Ansible._MSG_YAML.match(ln)
            if m and ln is not block[0]:
                return m.group(1).strip("'\"")[:600]
        return " ".join(x.strip() for x in block)[:600]

    def parse_task_results(output, host=None):
        """[(task name, status, message, items)] in order, for `host` (or any). status is
        the worst seen: failed > changed > ok > skipped; an `...ignoring` failure counts as
        ok. items: [(label, status, message)] of a looped task, in order."""
        tasks, current, lines = [], None, (output or "").splitlines()
        for i, line in enumerate(lines):
            m = Ansible._TASK.match(line)
            if m:
                name = f"handler: {m.group(2)}" if m.group(1) else m.group(2)
                current = {"name": name, "status": None, "message": "", "items": []}
                tasks.append(current)
                continue
            if current is None:
                continue
            if line.startswith("...ignoring") and current["status"] == "failed":
                current["status"], current["message"] = "ok", ""
                current["items"] = [
                    (lb, "ok" if st == "failed" else st, "") for lb, st, _ in current["items"]
                ]
                continue
            r = Ansible._RESULT.match(line)
            if not r or (host and r.group(2).split(" ")[0] != host):
                continue
            status = Ansible._status(r.group(1))
            msg = Ansible._failure_message(lines, i) if status == "failed" else ""
            if r.group(3) is not None:
                current["items"].append((r.group(3), status, msg))
            elif status == "failed":
                current["message"] = msg
            if (
                current["status"] is None
                or Ansible._RANK[status] > Ansible._RANK[current["status"]]
            ):
                current["status"] = status
        return [(t["name"], t["status"] or "skipped", t["message"], t["items"]) for t in tasks]

    def failed_task_names(output, host=None):
        return [t[0] for t in Ansible.parse_task_results(output, host) if t[1] == "failed"]

    def verify_checks(output, host=None):
        """The verify playbook's checks as [(name, status, message)]: a looped task (such as
        one assert over a list of outcomes) contributes one check per item label, any other
        task one check under its own name."""
        checks = []
        for name, status, msg, items in Ansible.parse_task_results(output, host):
            if items:
                checks += [(label, st, m) for label, st, m in items]
                if status == "failed" and not any(st == "failed" for _, st, _ in items):
                    checks.append((name, status, msg))
            else:
                checks.append((name, status, msg))
        return checks

    def run_playbook(
        ctx, rs, profile, playbook, tags, certs, phase, timeout, strategy=None, step=None
    ):
        """One ansible-playbook call against the VM only; returns (rc, output). `strategy`
        (a strategy_choice()) overrides the run's (the bench compares both); `step`: the
        profile's apply entry, whose own extra_vars_files this call also gets."""
        real_secrets = certs in REAL_SECRET_TIERS
        inv = Ansible.write_run_inventory(ctx, rs, profile["groups"], with_vault=real_secrets)
        Ansible.assert_single_host_inventory(inv.read_text(), rs.domain)
        ansible_playbook = Ansible.find_ansible_playbook(ctx)
        strategy = strategy or Ansible.resolve_strategy(ctx, ansible_playbook)
        argv = Ansible.ansible_playbook_argv(
            ansible_playbook,
            inv,
            playbook,
            rs.domain,
            tags,
            Profiles.extra_vars_files(
                profile,
                certs,
                ctx.repo / "tests" / "integration",
                ctx.repo / "tests" / "vault" / "test-values.yml",
                step,
            ),
        )
        if real_secrets:
            argv[1:1] = ["--vault-id", VAULT_ID]
        if argv[argv.index("--limit") + 1] != rs.domain:
            raise InfraError("inventory", "ansible-playbook --limit is not the test VM")
        log = rs.dir / "logs" / f"{phase.replace(':', '-').replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"# {shlex.join(argv)}\n")
        r = run(
            argv,
            timeout=timeout,
            cwd=ctx.repo,
            stream_log=log,
            cmdlog=ctx.cmdlog,
            env=Ansible.ansible_env(ctx.environ, ctx.repo, rs.dir, rs.domain, strategy),
        )
        if r.timed_out:
            raise InfraError(
                phase,
                f"ansible-playbook {pathlib.Path(playbook).name} timed out "
                f"after {timeout:.0f}s (log: {log})",
            )
        return r.returncode, r.stdout

    def apply(
        ctx,
        rs,
        profile,
        certs,
        phase_prefix="apply",
        result=None,
        start=0,
        after_step=None,
        start_why=None,
    ):
        """Run every profile apply; returns total changed tasks. Nonzero rc -> InfraError
        (a broken converge is not a verify verdict). The first `start` applies are already in
        the guest (start_why: it was resumed from checkpoint applied-<start>, by default);
        after_step(i) runs after apply i succeeds (to record and checkpoint it)."""
        start_why = start_why or f"resumed from checkpoint applied-{start}"
        changed, changed_tasks = 0, []
        for i, step in enumerate(profile["applies"], 1):
            phase = f"{phase_prefix}:{step['playbook']}"
            if i <= start:
                Ansible._skipped_apply(ctx, result, phase, start_why)
                continue
            with Utilities.timed_phase(ctx, result, phase):
                Env.progress(
                    ctx,
                    phase,
                    f"ansible-playbook {step['playbook']}"
                    + (f" --tags {','.join(step['tags'])}" if step.get("tags") else ""),
                )
                rc, out = Ansible.run_playbook(
                    ctx,
                    rs,
                    profile,
                    ctx.repo / "playbooks" / step["playbook"],
                    step.get("tags", []),
                    certs,
                    phase,
                    ctx.bounds["apply"],
                    step=step,
                )
                recap = Ansible.parse_recap(out).get(rs.domain, {})
                if rc != 0:
                    failed = Ansible.failed_task_names(out, rs.domain)
                    what = (
                        f"ansible-playbook {step['playbook']} failed (exit {rc})"
                        + (f" at task {failed[-1]!r}" if failed else "")
                        + f"; log: {rs.dir / 'logs'}"
                    )
                    if recap.get("unreachable") or not recap:
                        raise InfraError(phase, what + " — the VM was unreachable")
                    # The code under test broke: a verdict, not an infrastructure failure.
                    raise VerifyFailed(phase, what, failed)
                changed += recap.get("changed", 0)
                changed_tasks += [
                    t[0] for t in Ansible.parse_task_results(out, rs.domain) if t[1] == "changed"
                ]
            if after_step is not None:
                after_step(i)
        return changed, changed_tasks

    def _skipped_apply(ctx, result, phase, why):
        if result is not None:
            result.phase_details.append(
                {
                    "name": phase,
                    "seconds": 0.0,
                    "status": "skipped",
                    "message": f"in the guest already: {why}",
                }
            )
        Env.progress(ctx, phase, f"already applied ({why})")

    # The profile's verify runs twice in a cycle: live, right after the applies (before any
    # reboot), then after the reboots. Which one fails tells the story of a red run.
    LIVE_VERIFY = "verify:live"
    VERIFY_TASK_KEYS = {"verify": "verify_tasks", LIVE_VERIFY: "verify_live_tasks"}
    STORIES = {LIVE_VERIFY: "dead live", "verify": "dies on reboot", "upgrade": "upgrade fails"}

    def story_of(result):
        """A failed run's story: "dead live" (broken right after the apply), "dies on reboot"
        (the live verify passed, the one after the reboots failed), "upgrade fails" (the
        working tree's apply on top of --from REF broke); else None."""
        stage = result.failed_stage or ""
        if stage == "verify" and not any(
            p["name"] == Ansible.LIVE_VERIFY for p in result.phase_details
        ):
            return None  # no live verify ran (assert, --no-reboot): the story is unknown
        return Ansible.STORIES.get(stage.split(":")[0] if stage.startswith("upgrade:") else stage)

    def run_assert(ctx, rs, profile, certs, result=None, stage="verify"):
        """The verify playbook, as `stage` (verify, or verify:live before the reboots).
        Its checks go to the result's VERIFY_TASK_KEYS[stage] field."""
        with Utilities.timed_phase(ctx, result, stage):
            Env.progress(ctx, stage, f"ansible-playbook {profile['verify']}")
            rc, out = Ansible.run_playbook(
                ctx,
                rs,
                profile,
                ctx.repo / profile["verify"],
                (),
                certs,
                stage,
                ctx.bounds["verify"],
            )
            tasks = Ansible.verify_checks(out, rs.domain)
            if result is not None:
                checks = [{"name": n, "status": s, "message": m} for n, s, m in tasks]
                setattr(result, Ansible.VERIFY_TASK_KEYS[stage], checks)
            recap = Ansible.parse_recap(out).get(rs.domain, {})
            if recap.get("unreachable"):
                raise InfraError(stage, f"{rs.domain} unreachable during {stage}")
            if rc != 0 or recap.get("failed"):
                failed = [n for n, s, _ in tasks if s == "failed"]
                raise VerifyFailed(
                    stage,
                    ("live " if stage == Ansible.LIVE_VERIFY else "")
                    + "verify playbook failed"
                    + (f" at: {', '.join(failed)}" if failed else f" (exit {rc})"),
                    failed,
                )

    def idempotence(ctx, rs, profile, certs, result=None):
        Env.progress(ctx, "idempotence", "re-applying the profile; expecting zero changes")
        changed, tasks = Ansible.apply(ctx, rs, profile, certs, "idempotence", result)
        if result is not None:
            result.idempotence = {"changed": changed, "changed_tasks": tasks}
        if changed:
            raise VerifyFailed(
                "idempotence",
                f"{changed} task(s) changed on the re-apply after "
                f"the reboot: {', '.join(tasks) or '?'}",
                tasks,
            )

    # The bench's per-task figure: one playbook of TRANSPORT_PROBE_CALLS cheap module calls
    # (ping, command, stat, systemd_service: work the guest does in milliseconds), timed once
    # with each strategy on the same VM, so the difference is the transport's per-call cost.
    TRANSPORT_PROBE = "tests/integration/bench-transport.yml"
    TRANSPORT_PROBE_CALLS = 40

    def transport_figures(seconds, calls=TRANSPORT_PROBE_CALLS):
        """{strategy: seconds} -> the bench's transport summary (per-call cost, speed-up)."""
        out = {
            k: {"seconds": round(v, 1), "per_call": round(v / calls, 2)} for k, v in seconds.items()
        }
        lin, mit = seconds.get("linear"), seconds.get(Ansible.MITOGEN_STRATEGY)
        out["calls"] = calls
        out["speedup"] = round(lin / mit, 1) if lin and mit else None
        return out

    def compare_transports(ctx, rs, profile, certs, result):
        """bench: the probe playbook with ansible-core's linear strategy, then with Mitogen,
        on this VM. Needs Mitogen to load (else the figure would compare linear with itself)."""
        mito = ctx.session.strategy
        if (
            not mito or mito["used"] != Ansible.MITOGEN_STRATEGY
        ):  # the run used linear: probe Mitogen
            probe_run = dataclasses.replace(ctx.session, strategy=None)  # the same bounds, log
            probe = dataclasses.replace(ctx, strategy_request="mitogen", session=probe_run)
            mito = Ansible.resolve_strategy(probe, Ansible.find_ansible_playbook(ctx))
        if mito["used"] != Ansible.MITOGEN_STRATEGY:
            result.transport = {"error": mito["fallback"]}
            return
        seconds = {}
        for choice in (Ansible.strategy_choice("default"), mito):
            name = choice["used"]
            with Utilities.timed_phase(ctx, result, f"transport:{name}"):
                t0 = time.monotonic()
                rc, _ = Ansible.run_playbook(
                    ctx,
                    rs,
                    profile,
                    ctx.repo / Ansible.TRANSPORT_PROBE,
                    (),
                    certs,
                    f"transport-{name}",
                    ctx.bounds["verify"],
                    strategy=choice,
                )
                if rc != 0:
                    raise InfraError(
                        f"transport:{name}", f"{Ansible.TRANSPORT_PROBE} failed (exit {rc})"
                    )
                seconds[name] = time.monotonic() - t0
        result.transport = Ansible.transport_figures(seconds)
        t = result.transport
        Env.progress(
            ctx,
            "transport",
            f"{t['calls']} module calls: linear {t['linear']['per_call']}s "
            f"per call, mitogen {t[Ansible.MITOGEN_STRATEGY]['per_call']}s ({t['speedup']}x)",
        )


# --------------------------------------------------------------------------------------
# Checkpoints: keys, the role scan, take, stage and resume (issue 5, ADR-026)
# --------------------------------------------------------------------------------------
# The checkpoint chain (booted -> applied-N), its keys (the role scan that decides what an
# edit invalidates), and taking, staging and resuming from a checkpoint: try_resume
# decides which checkpoint, claims it and restores it (or says why the run boots cold).


class Checkpoints:
    """The Checkpoints section as a namespace (its functions called on the class, never an
    instance): keys, role scan, take/stage/resume, the session's resume (try_resume)."""

    # A checkpoint is a paused guest written to disk: its memory (`virsh save`) plus the
    # qcow2 layer its disk had grown, frozen read-only. The chain for a profile is
    #   booted -> applied-1 -> ... -> applied-N
    # and each key hashes its parent's key plus what the stage was built from, so editing a
    # role invalidates the first apply that uses it and everything after, nothing before.
    CHECKPOINT_FORMAT = 1
    FRESH_LINEAGE = "fresh"  # checkpoints of plain runs; a day-2 run's are "from:<ref>"
    RUN_KEY_FILES = ("id_ed25519", "id_ed25519.pub", "ssh_host_ed25519_key.pub")
    CHECKPOINT_FILES = (
        "manifest.json",
        "memory.save",
        "disk.qcow2",
        "domain.xml",
        "seed.img",
    ) + RUN_KEY_FILES

    # Files under a role that never reach a host: Molecule scenarios and docs.
    ROLE_IGNORED_PARTS = ("molecule",)
    ROLE_IGNORED_SUFFIXES = (".md",)
    APPLY_SHARED_INPUTS = ("ansible.cfg", "requirements.txt")
    _ROLES_BLOCK = re.compile(r"^(\s*)(?:-\s+)?roles:\s*$")
    _ROLE_ITEM = re.compile(
        r"^(\s*)-\s+(?:role:\s*|name:\s*)?['\"]?([^'\"\s#{}]+)['\"]?\s*(?:#.*)?$"
    )
    _ROLE_ITEM_TEMPLATED = re.compile(r"^\s*-\s+(?:role:|name:)?.*\{\{")
    _ROLE_FLOW_ITEM = re.compile(r"^\s*-\s*\{.*?\b(?:role|name):\s*['\"]?([\w.\-]+)")
    _TAGS_LINE = re.compile(r"^(\s*)tags:\s*(.*?)\s*(?:#.*)?$")
    _INCLUDE_ROLE = re.compile(r"^\s*(?:-\s+)?(?:ansible\.builtin\.)?(?:include|import)_role:\s*$")
    _INCLUDE_ROLE_NAME = re.compile(r"^\s*name:\s*['\"]?([^'\"\s#]+)['\"]?\s*$")
    _UNFOLLOWED = re.compile(
        r"^\s*(?:-\s+)?(?:ansible\.builtin\.)?"
        r"(?:import_playbook|include_tasks|import_tasks|include_vars"
        r"|include_role|import_role)\s*:\s*\S"
    )
    _ALWAYS_TAG = re.compile(r"tags:\s*\[[^\]]*\balways\b|tags:\s*['\"]?always\b")

    def parse_tags_value(value):
        """`[a, b]` or `a` (the two inline forms) -> list; anything else -> None (unknown)."""
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            return [t.strip().strip("'\"") for t in value[1:-1].split(",") if t.strip()]
        if re.fullmatch(r"['\"]?[\w.\-]+['\"]?", value):
            return [value.strip("'\"")]
        return None

    def playbook_role_refs(text):
        """The roles a playbook (or a role's meta/tasks file) names: ([(role, tags|None)],
        complete). tags is the role entry's own inline tags, None when it has none or they are
        not in a form this scanner reads. complete=False means the scan met something it does
        not follow (a templated role name, import_playbook, include_tasks ...), and the caller
        must then count every role as an input."""
        refs, complete = [], True
        lines = text.splitlines()
        roles_indent = None
        play_tags = False
        i = 0
        while i < len(lines):
            line = lines[i]
            if not line.strip() or line.lstrip().startswith("#"):
                i += 1
                continue
            indent = len(line) - len(line.lstrip())
            m = Checkpoints._ROLES_BLOCK.match(line)
            if m:
                roles_indent = len(m.group(1))
                i += 1
                continue
            if (
                roles_indent is not None
                and indent <= roles_indent
                and not line.lstrip().startswith("- ")
            ):
                roles_indent = None
            if roles_indent is not None and indent < roles_indent:
                roles_indent = None
            if roles_indent is not None:
                if Checkpoints._ROLE_ITEM_TEMPLATED.match(line):
                    complete = False
                flow = Checkpoints._ROLE_FLOW_ITEM.match(line)
                if flow:  # - { role: x, tags: [...] }: tags not read, so never filtered out
                    refs.append((flow.group(1), None))
                    i += 1
                    continue
                m = Checkpoints._ROLE_ITEM.match(line)
                if not m and line.lstrip().startswith("- "):
                    complete = False  # an item form this scanner does not read
                if m:
                    tags, i = Checkpoints._role_item_tags(lines, i + 1, len(m.group(1)))
                    refs.append((m.group(2), tags))
                    continue
            if Checkpoints._INCLUDE_ROLE.match(line):
                role = Checkpoints._include_role_name(lines, i)
                if role:
                    refs.append((role, None))
                else:
                    complete = False
            elif Checkpoints._UNFOLLOWED.match(line):
                complete = False
            t = Checkpoints._TAGS_LINE.match(line)
            if t and len(t.group(1)) == 2:  # a play's own tags (plays are `- ` items at column 0)
                play_tags = True
            i += 1
        if play_tags:  # play-level tags reach every role of the play: do not filter by tags
            refs = [(r, None) for r, _ in refs]
        return refs, complete

    def _role_item_tags(lines, j, item_indent):
        """The inline tags of a `- role: x` item whose body starts at lines[j] (None when it
        has none), and the index of the first line after the item."""
        tags = None
        while j < len(lines) and (
            not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > item_indent
        ):
            t = Checkpoints._TAGS_LINE.match(lines[j])
            if t:
                tags = Checkpoints.parse_tags_value(t.group(2))
            j += 1
        return tags, j

    def _include_role_name(lines, i):
        """The role an include_role/import_role at lines[i] names (its `name:` within the next
        5 lines), or None when there is none or it is templated."""
        j = i + 1
        while j < len(lines) and not Checkpoints._INCLUDE_ROLE_NAME.match(lines[j]) and j < i + 6:
            j += 1
        n = Checkpoints._INCLUDE_ROLE_NAME.match(lines[j]) if j < len(lines) else None
        return n.group(1) if n and "{{" not in n.group(1) else None

    def role_selected(tags, apply_tags, role_has_always):
        """Whether `--tags apply_tags` can run any of a role's tasks."""
        if not apply_tags or tags is None or role_has_always:
            return True
        return bool(set(tags) & (set(apply_tags) | {"always"}))

    def role_files(repo, role):
        """A role's files that can reach a host (not Molecule scenarios, not docs)."""
        root = pathlib.Path(repo) / "roles" / role
        if not root.is_dir():
            return []
        return sorted(
            p
            for p in root.rglob("*")
            if p.is_file()
            and not any(
                part in Checkpoints.ROLE_IGNORED_PARTS for part in p.relative_to(root).parts
            )
            and not p.name.endswith(Checkpoints.ROLE_IGNORED_SUFFIXES)
        )

    def roles_used(repo, playbook_text, apply_tags):
        """(roles, complete): the roles one apply can run, following role dependencies and
        include_role/import_role in their tasks."""
        repo = pathlib.Path(repo)
        refs, complete = Checkpoints.playbook_role_refs(playbook_text)
        chosen, queue = set(), []
        for role, tags in refs:
            always = any(
                Checkpoints._ALWAYS_TAG.search(p.read_text(errors="replace"))
                for p in Checkpoints.role_files(repo, role)
                if p.suffix in (".yml", ".yaml")
            )
            if Checkpoints.role_selected(tags, apply_tags, always):
                queue.append(role)
        while queue:
            role = queue.pop()
            if role in chosen:
                continue
            chosen.add(role)
            if not (repo / "roles" / role).is_dir():
                complete = False  # a collection role or a typo: not ours to hash
                continue
            for p in Checkpoints.role_files(repo, role):
                if p.suffix not in (".yml", ".yaml"):
                    continue
                rel = p.relative_to(repo / "roles" / role).parts
                if rel[0] == "meta" and p.stem == "main":
                    text = p.read_text(errors="replace")
                    deps = text.split("dependencies:", 1)[1] if "dependencies:" in text else ""
                    if deps.strip() and not deps.strip().startswith("[]"):
                        sub, ok = Checkpoints.playbook_role_refs("roles:\n" + deps)
                        complete = complete and ok
                        queue += [r for r, _ in sub]
                elif rel[0] in ("tasks", "handlers"):
                    text = p.read_text(errors="replace")
                    if "include_role" in text or "import_role" in text:
                        sub, ok = Checkpoints.playbook_role_refs(text)
                        complete = complete and ok
                        queue += [r for r, _ in sub]
        return sorted(chosen), complete

    def files_digest(repo, paths):
        """sha256 over (path relative to repo, content digest) of each file, in order."""
        repo = pathlib.Path(repo)
        h = hashlib.sha256()
        for p in sorted(set(pathlib.Path(p) for p in paths)):
            rel = p.relative_to(repo) if p.is_absolute() else p
            full = repo / rel
            digest = hashlib.sha256(full.read_bytes()).hexdigest() if full.is_file() else "absent"
            h.update(f"{rel.as_posix()}\0{digest}\n".encode())
        return h.hexdigest()

    def apply_input_paths(repo, step, extra_files, group_vars_files):
        """Every file one apply step reads: its playbook, the roles it can run, the group_vars
        of the transient inventory, the -e files, ansible.cfg and the pinned requirements."""
        repo = pathlib.Path(repo)
        pb = repo / "playbooks" / step["playbook"]
        text = pb.read_text(errors="replace") if pb.is_file() else ""
        roles, complete = Checkpoints.roles_used(repo, text, step.get("tags") or [])
        if not complete:  # could not tell exactly: every role and playbook is an input
            roles = (
                sorted(p.name for p in (repo / "roles").iterdir() if p.is_dir())
                if (repo / "roles").is_dir()
                else []
            )
        paths = [pb] + [f for r in roles for f in Checkpoints.role_files(repo, r)]
        if not complete:
            paths += sorted((repo / "playbooks").glob("*.yml"))
        paths += list(group_vars_files) + [pathlib.Path(f) for f in extra_files]
        paths += [repo / f for f in Checkpoints.APPLY_SHARED_INPUTS]
        return paths, roles, complete

    def checkpoint_key(parent, stage, inputs):
        blob = json.dumps(
            {
                "format": Checkpoints.CHECKPOINT_FORMAT,
                "parent": parent,
                "stage": stage,
                "inputs": inputs,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def booted_checkpoint_inputs(
        image_key, host, mem_mib, vcpus, accel, network_xml=Network.NET_XML
    ):
        """What a booted guest is made of: the golden image, the VM's shape (a saved memory
        image only restores into the same ABI) and the cloud-init documents' templates (the
        per-run keys are stored with the checkpoint, not hashed)."""
        templates = (
            Guest.render_user_data("PUB", "USER", "HOSTPRIV", "HOSTPUB")
            + Guest.render_meta_data("IID", "HOST")
            + network_xml
        )
        return {
            "image": image_key,
            "host": host,
            "mem_mib": mem_mib,
            "vcpus": vcpus,
            "accel": accel,
            "templates": hashlib.sha256(templates.encode()).hexdigest(),
        }

    def newest_valid_checkpoint(chain, is_valid):
        """chain: [(stage, key)] from booted on. The deepest checkpoint whose whole ancestry
        is valid (a later one built on a missing parent is unusable), or None."""
        best = None
        for stage, key in chain:
            if not is_valid(key):
                break
            best = (stage, key)
        return best

    _DISK_SOURCE = re.compile(r"(<source file=')([^']*)(')")
    _LOG_FILE = re.compile(r"(<log file=')([^']*console[^']*)(')")
    _BOMA_RUN = re.compile(r"<boma:run\b[^>]*/>")

    def rewrite_restore_xml(xml, overlay, seed, console_log, metadata_xml):
        """A checkpoint's saved domain XML, pointed at a new run's writable overlay, the
        checkpoint's seed copy and the run's console log, with the run's ownership metadata.
        Name, UUID, MAC and devices stay: libvirt refuses a restore that changes the ABI."""

        def disk(m):
            path = m.group(2)
            if path.endswith("overlay.qcow2"):
                return m.group(1) + str(overlay) + m.group(3)
            if path.endswith("seed.img"):
                return m.group(1) + str(seed) + m.group(3)
            return m.group(0)

        out = Checkpoints._DISK_SOURCE.sub(disk, xml)
        out = Checkpoints._LOG_FILE.sub(lambda m: m.group(1) + str(console_log) + m.group(3), out)
        # A stale <backingStore> would describe the previous chain; libvirt probes the new one.
        out = re.sub(
            r"\s*<backingStore\b.*?</backingStore>|\s*<backingStore/>", "", out, flags=re.S
        )
        if Checkpoints._BOMA_RUN.search(out):
            inner = Checkpoints._BOMA_RUN.search(metadata_xml)
            out = Checkpoints._BOMA_RUN.sub(
                lambda m: inner.group(0) if inner else metadata_xml, out, count=1
            )
        return out

    def checkpoints_enabled(ctx, args):
        return not args.no_checkpoints and ctx.settings["BOMA_IT_CHECKPOINTS"]

    def checkpoint_dir(ctx, key):
        return Utilities.owned_path(ctx.cache, "checkpoints", key)

    def load_checkpoint(ctx, key):
        """The manifest of a complete checkpoint (every file present, manifest written last),
        else None."""
        d = Checkpoints.checkpoint_dir(ctx, key)
        try:
            manifest = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError, RecursionError):
            return None
        if (
            not isinstance(manifest, dict)
            or manifest.get("key") != key
            or Guest.state_fields_problem(manifest) is not None
            or not all((d / f).is_file() for f in Checkpoints.CHECKPOINT_FILES)
        ):
            return None
        return manifest

    def group_vars_inputs(ctx, with_vault):
        """The production group_vars files the transient inventory links (write_run_inventory)."""
        src = ctx.repo / "inventories" / "production" / "group_vars"
        if not src.is_dir():
            return []
        return sorted(
            p for p in src.rglob("*") if p.is_file() and (p.name != "vault.yml" or with_vault)
        )

    def checkpoint_chain(ctx, profile, certs, image_key, accel):
        """[(stage, key, detail)] for this run's inputs: booted, then one per apply."""
        parent = Checkpoints.checkpoint_key(
            None,
            "booted",
            Checkpoints.booted_checkpoint_inputs(
                image_key,
                profile.get("root", profile["name"]),
                profile["mem_mib"],
                profile["vcpus"],
                accel,
                Network.ctx_net_xml(ctx),
            ),
        )
        chain = [("booted", parent, {})]
        gv = Checkpoints.group_vars_inputs(ctx, certs in REAL_SECRET_TIERS)
        for i, step in enumerate(profile["applies"], 1):
            extra = Profiles.extra_vars_files(
                profile,
                certs,
                ctx.repo / "tests" / "integration",
                ctx.repo / "tests" / "vault" / "test-values.yml",
                step,
            )
            paths, roles, complete = Checkpoints.apply_input_paths(ctx.repo, step, extra, gv)
            inputs = {
                "playbook": step["playbook"],
                "tags": step.get("tags", []),
                "groups": profile["groups"],
                "certs": certs,
                "files": Checkpoints.files_digest(ctx.repo, paths),
            }
            parent = Checkpoints.checkpoint_key(parent, f"applied-{i}", inputs)
            chain.append((f"applied-{i}", parent, {"roles": roles, "exact": complete}))
        return chain

    def chain_record(chain):
        """result.json's `checkpoints`: a run's chain, one {stage, key, roles, exact} per step."""
        return {"chain": [{"stage": st, "key": k, **det} for st, k, det in chain]}

    def checkpoints_in_use(ctx):
        """Checkpoint keys a live run's disk chain still reads."""
        used = set()
        for rs in Guest.list_runs(ctx):
            if rs.record.state != "down":
                used.update(rs.record.checkpoints_read or [])
        return used

    def gc_checkpoints(ctx, host, keep, lineage=None, wait=None):
        """Drop this profile's checkpoints that the current inputs can no longer resume
        (and half-written ones), except those a live run reads or a starting run has
        claimed (claim_dir). With a `lineage`, only that
        lineage's: a plain cycle does not drop what `--from main` runs resume, nor the
        reverse (a checkpoint both chains share is in `keep`)."""
        root = ctx.cache / "checkpoints"
        if root.is_symlink() or not root.is_dir():
            return []
        removed = []
        # take_checkpoint writes under this lock: holding it, a dir without a manifest (or a
        # .tmp-* staging dir) is what an interrupted writer left, never one being written.
        with Utilities.file_lock(ctx, ctx.cache / "checkpoints.lock", "checkpoint gc", wait):
            used = Checkpoints.checkpoints_in_use(ctx) | set(keep)
            for d in root.iterdir():
                if d.is_symlink() or not d.is_dir() or d.name in used:
                    continue
                try:
                    m = json.loads((d / "manifest.json").read_text())
                except (OSError, ValueError, RecursionError):
                    m = None
                if not isinstance(m, dict) or (
                    m.get("host") == host
                    and (lineage is None or m.get("lineage", Checkpoints.FRESH_LINEAGE) == lineage)
                ):
                    claim = Utilities.claim_dir(d)
                    if claim is None:  # a run has chosen it to resume (try_resume's claim)
                        continue
                    with claim:
                        shutil.rmtree(d, ignore_errors=True)
                    removed.append(d.name)
        return removed

    def copy_run_keys(src, dst):
        """A run's client key pair and guest host public key (the private one stays 0600)."""
        for f in Checkpoints.RUN_KEY_FILES:
            shutil.copyfile(src / f, dst / f)
        os.chmod(dst / "id_ed25519", 0o600)

    def take_checkpoint(ctx, rs, stage, key, parent, result=None):
        """Save the running guest (memory + device state), freeze its overlay as the
        checkpoint's disk, give the run a fresh overlay on top and restore it. The guest sees
        a pause of a few seconds; its boot_id is unchanged. Staged in checkpoints/.tmp-<key>-
        <pid>, renamed into place, the manifest written last: any failure or interrupt before
        that removes both, so no half-written checkpoint (with the run's keys) stays behind."""
        if Checkpoints.load_checkpoint(ctx, key):
            return None
        need = rs.record.mem_mib + 512
        free = shutil.disk_usage(ctx.cache).free // (1024 * 1024)
        if free < need:
            Env.progress(
                ctx,
                "checkpoint",
                f"skipping {stage}: {free} MiB free, a checkpoint needs about {need} MiB",
            )
            return None
        d = Checkpoints.checkpoint_dir(ctx, key)
        tmp = Utilities.owned_path(ctx.cache, "checkpoints", f".tmp-{key}-{os.getpid()}")
        with (
            Utilities.timed_phase(ctx, result, f"checkpoint:{stage}"),
            Utilities.file_lock(ctx, ctx.cache / "checkpoints.lock", "checkpoint"),
        ):
            manifest = None
            try:
                for leftover in (d, tmp):
                    if leftover.exists():
                        shutil.rmtree(leftover)
                if not Checkpoints.stage_checkpoint(ctx, rs, stage, key, tmp, d):
                    return None
                manifest = Checkpoints._checkpoint_manifest(rs, stage, key, parent)
                # last: only now is the checkpoint valid
                Utilities.write_owned(
                    d / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n"
                )
            except BaseException:
                manifest = None
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                if manifest is None:
                    shutil.rmtree(d, ignore_errors=True)
            rs.record.checkpoints_taken = [*(rs.record.checkpoints_taken or []), stage]
            rs.save()
            Machine(ctx, rs).step_clock()
        size = sum(p.stat().st_size for p in d.iterdir()) // (1 << 20)
        Env.progress(ctx, "checkpoint", f"{stage} saved ({key}, {size} MiB)")
        return manifest

    def _checkpoint_manifest(rs, stage, key, parent):
        """The manifest of the checkpoint `key` of the running guest of `rs`."""
        return {
            "key": key,
            "parent": parent,
            "stage": stage,
            "host": rs.record.host,
            "domain": rs.domain,
            "mac": rs.record.mac,
            "ip": rs.ip,
            "boot_id": rs.record.boot_ids[-1],
            "accel": rs.record.accel,
            "image_key": rs.record.image_key,
            "mem_mib": rs.record.mem_mib,
            "vcpus": rs.record.vcpus,
            "created_at": Env.now_iso(),
            "created_by": rs.name,
            "format": Checkpoints.CHECKPOINT_FORMAT,
            "lineage": rs.record.lineage or Checkpoints.FRESH_LINEAGE,
        }

    def stage_checkpoint(ctx, rs, stage, key, tmp, d):
        """take_checkpoint's files: saved in `tmp`, renamed to `d` once the run's disk is in
        it (the run's fresh overlay must name the final path), guest restored. False: skipped,
        the guest runs on as it was."""
        tmp.mkdir(parents=True)
        os.chmod(tmp, 0o700)  # until the seed copy and the memory image are root-only
        machine = Machine(ctx, rs)
        r = machine.save(tmp / "memory.save")
        if r.returncode != 0:  # libvirt aborts a failed save and the guest runs on
            Env.progress(
                ctx,
                "checkpoint",
                f"skipping {stage}: virsh save failed: "
                f"{(r.stderr.strip().splitlines() or ['?'])[-1]}",
            )
            return False
        try:
            os.chmod(tmp / "memory.save", DISK_MODE)
            xml = virsh(
                ctx, "save-image-dumpxml", tmp / "memory.save", check=True, stage="checkpoint"
            ).stdout
            (tmp / "domain.xml").write_text(xml)
            seed = re.search(r"<source file='([^']*seed\.img)'", xml)
            shutil.copyfile(seed.group(1) if seed else rs.disk_dir / "seed.img", tmp / "seed.img")
            Checkpoints.copy_run_keys(rs.dir, tmp)
            os.chmod(tmp / "seed.img", FROZEN_DISK_MODE)
        except (HarnessError, OSError) as e:
            # Nothing of the run moved: give the guest back and go on without one.
            machine.restore(tmp / "memory.save", "checkpoint")
            Env.progress(ctx, "checkpoint", f"skipping {stage}: {e}")
            return False
        Checkpoints._freeze_overlay(ctx, rs, stage, key, tmp, d)
        machine.restore(d / "memory.save", "checkpoint")
        return True

    def _freeze_overlay(ctx, rs, stage, key, tmp, d):
        """Move the run's overlay into the staged checkpoint as its frozen disk.qcow2, rename
        `tmp` to `d`, and give the run a fresh overlay on top of it."""
        overlay = rs.overlay
        try:
            os.replace(overlay, tmp / "disk.qcow2")
            os.chmod(tmp / "disk.qcow2", FROZEN_DISK_MODE)
            os.chmod(tmp, 0o755)  # QEMU opens disk.qcow2 as the run's backing file
            tmp.rename(d)
            # From here the run's disk reads this checkpoint: gc must leave it alone.
            rs.record.checkpoints_read = [*(rs.record.checkpoints_read or []), key]
            rs.save()
            Guest.make_overlay(ctx, d / "disk.qcow2", overlay, "checkpoint")
        except OSError as e:
            raise InfraError("checkpoint", f"{stage}: {e}") from None

    def resume_run(ctx, profile, certs, manifest, chain_keys, session):
        """A new run whose VM is a checkpoint's guest, restored mid-flight: same domain
        name, UUID, MAC, keys and boot_id; its own run dir, overlay, console log and
        ownership metadata."""
        host = profile["name"]
        name = Guest.vm_name(host)
        ck = Checkpoints.checkpoint_dir(ctx, manifest["key"])
        data = Checkpoints._resume_data(ctx, profile, certs, manifest, chain_keys, name, ck)
        rs = Guest.open_run(ctx, data, session)
        Checkpoints.copy_run_keys(ck, rs.dir)
        (rs.dir / "known_hosts").write_text(
            Guest.known_hosts_line(rs.domain, (ck / "ssh_host_ed25519_key.pub").read_text())
        )
        Checkpoints._write_restore_files(ctx, rs, ck)
        t0 = time.monotonic()
        machine = Machine(ctx, rs)
        machine.restore(ck / "memory.save", "resume", xml=rs.dir / "domain.xml")
        rs.record.state = "restored"
        rs.save()
        # Persistent, so a hard reboot (destroy + start) finds it again.
        virsh(ctx, "define", rs.dir / "domain.xml", check=True, stage="resume")
        machine.step_clock()
        boot_id = machine.read_boot_id()
        if boot_id != manifest["boot_id"]:
            raise InfraError(
                "resume",
                f"the restored guest has boot_id {boot_id}, the "
                f"checkpoint recorded {manifest['boot_id']}: it rebooted instead of "
                "resuming",
            )
        rs.record.boot_stages = {"restored-ssh": round(time.monotonic() - t0, 1)}
        rs.record.state = "up"
        rs.save()
        Guest.write_current(ctx, rs)
        Env.progress(
            ctx,
            "resume",
            f"{rs.domain} resumed from checkpoint {manifest['stage']} "
            f"({manifest['key']}, saved {Utilities._age(manifest['created_at'])} ago) as run "
            f"{name}",
        )
        return rs

    def _resume_data(ctx, profile, certs, manifest, chain_keys, name, ck):
        """The run.json data of a run `name` resumed from the checkpoint (manifest, dir ck):
        the checkpoint's domain, MAC, IP, accelerator, sizes and boot_id; its own name."""
        host = profile["name"]
        return {
            "name": name,
            "domain": manifest["domain"],
            "host": host,
            "profile": profile["path"],
            "certs": certs,
            "accel": manifest["accel"],
            "mac": manifest["mac"],
            "ip": manifest["ip"],
            "created_at": Env.now_iso(),
            "owner": Env.owner_name(),
            "image": str(ck / "disk.qcow2"),
            "image_key": manifest["image_key"],
            "state": "creating",
            "boot_ids": [manifest["boot_id"]],
            "uri": ctx.uri,
            "mem_mib": manifest["mem_mib"],
            "vcpus": manifest["vcpus"],
            "resumed_from": {
                "stage": manifest["stage"],
                "key": manifest["key"],
                "created_at": manifest["created_at"],
            },
            "checkpoints_read": list(chain_keys),
        }

    def _write_restore_files(ctx, rs, ck):
        """The resumed run's overlay on the checkpoint's disk and its domain.xml: the
        checkpoint's, pointed at that overlay and the run's console log, with the run's
        ownership metadata."""
        data, name, host = rs.record, rs.name, rs.record.host
        overlay = rs.overlay
        Guest.make_overlay(ctx, ck / "disk.qcow2", overlay, "resume")
        xml = Checkpoints.rewrite_restore_xml(
            (ck / "domain.xml").read_text(),
            overlay,
            ck / "seed.img",
            rs.console_log,
            Utilities.render_metadata_xml(
                data.created_at + "/" + name, data.created_at, host, data.owner, host
            ),
        )
        (rs.dir / "domain.xml").write_text(xml)

    def record_applied(rs, chain, steps):
        """run.json: the VM has applied the profile's first `steps` playbooks, from the inputs
        `chain`'s keys hash (None: no chain, or a day-2 run, whose working tree went on top of
        REF's chain). The next quick loop re-applies from the first key that differs."""
        rs.record.applied_steps = steps
        rs.record.applied_keys = [k for _, k, _ in chain[: steps + 1]] if chain else None
        rs.save()

    def checkpoint_after_apply(ctx, session):
        """after_step for apply(): record what the VM has applied, then checkpoint applied-i
        when this run keeps checkpoints. Never on a reused loop VM: its state is this edit
        applied on top of the last loop's, not these inputs applied to a fresh VM."""

        def after(i):
            Checkpoints.record_applied(session.rs, session.applied_chain, i)
            if session.checkpoint_chain and not session.reused:
                _, parent, _ = session.checkpoint_chain[i - 1]
                stage, key, _ = session.checkpoint_chain[i]
                Checkpoints.take_checkpoint(ctx, session.rs, stage, key, parent, session.result)

        return after

    def run_lineage(session):
        """The lineage of the checkpoints this session takes (see gc_checkpoints)."""
        return session.day2.frm.lineage if session.day2 else Checkpoints.FRESH_LINEAGE

    def try_resume(ctx, session):
        """Resume the newest valid checkpoint of session.checkpoint_chain; None -> boot cold.
        The chain it reads is claimed first (claim_dir: no gc removes it) until the session
        ends. A checkpoint that fails to come back (an InfraError, or an OSError: a file gone
        mid-resume) is a warning and the run boots cold instead."""
        chain, result = session.checkpoint_chain, session.result
        keys = [k for _, k, _ in chain]
        # Claimed before they are judged: from here no other run's gc removes them (one the
        # gc holds is being removed, so not valid here). Held until the session ends.
        claims = {
            k: Utilities.claim_dir(Checkpoints.checkpoint_dir(ctx, k), shared=True) for k in keys
        }
        manifests = {k: Checkpoints.load_checkpoint(ctx, k) if claims[k] else None for k in keys}
        best = Checkpoints.newest_valid_checkpoint(
            [(st, k) for st, k, _ in chain], lambda k: manifests[k] is not None
        )
        used = keys[: keys.index(best[1]) + 1] if best else []  # the disk chain this run reads
        for k, claim in claims.items():
            if claim is not None and k in used:
                session.claims.append(claim)
            elif claim is not None:
                claim.close()
        if best is None:
            Env.progress(ctx, "resume", "no valid checkpoint for these inputs: cold boot")
            return None
        stage, key = best
        manifest, keys = manifests[key], used
        with Utilities.timed_phase(ctx, result, "resume") as entry:
            why = None
            try:
                with Utilities.file_lock(ctx, ctx.cache / "lock", "up"):
                    Utilities.check_guards(ctx, session.profile, need_image=False)
                    if virsh(ctx, "domstate", manifest["domain"]).returncode == 0:
                        why = f"checkpoint {stage} is in use (domain {manifest['domain']} exists)"
                    else:
                        rs = Checkpoints.resume_run(
                            ctx, session.profile, session.certs, manifest, keys, session
                        )
            except (InfraError, OSError) as e:  # an OSError too: a file gone mid-resume
                if isinstance(e, InfraError) and e.stage == "guard":
                    raise
                why = f"checkpoint {stage} did not resume ({e})"
                if session.rs is not None:
                    Machine(ctx, session.rs).destroy()
                    session.rs = None  # its command log stays the log until the cold boot's
                result.resume_error = str(e)
            if why:
                # Not an error of this run: it boots cold. JUnit shows the phase as skipped.
                entry.update(status="skipped", message=f"{why}: cold boot")
                if result.resume_error is not None:  # it failed: a warning, not only progress
                    print(f"integration-vm: warning: {why}: cold boot", file=sys.stderr)
                else:
                    Env.progress(ctx, "resume", f"{why}: cold boot")
                return None
        rs.record.lineage = Checkpoints.run_lineage(session)
        steps = 0 if stage == "booted" else int(stage.split("-")[1])
        Checkpoints.record_applied(rs, session.applied_chain, steps)
        result.resumed_from = rs.record.resumed_from
        result.boot_stages = rs.record.boot_stages or {}
        return rs


# --------------------------------------------------------------------------------------
# Day 2: --from REF, the host as production runs it, then the change on top
# --------------------------------------------------------------------------------------
# A day-2 run converges the VM with the repository at REF (a clean, detached git worktree
# of REF: its own profile, overlays and roles, never the working tree), checkpoints that
# state (the chain's keys hash REF's files, so the next run with the same REF resumes it),
# then applies the working tree on top ("upgrade"), verifies live, reboots, verifies. The
# worktree lives under the cache's worktrees/ only while REF's applies run.


class Day2:
    """The Day 2 section's functions as a namespace (its functions called on the class, never
    an instance): --from REF's worktree and applies, then the upgrade."""

    FROM_PROFILE_DIR = "tests/integration/profiles"

    def git_argv(repo, *args):
        return ["git", "-C", str(repo), *args]

    def _git(ctx, *args, timeout=60, repo=None):
        """git in the repository under test (or `repo`: where a bench's worktrees come from)."""
        return run(
            Day2.git_argv(repo or ctx.repo, *args),
            timeout=timeout,
            stage="from-ref",
            cmdlog=ctx.cmdlog,
        )

    def resolve_from_ref(ctx, ref, host):
        """--from REF -> FromRef, before anything is created. A REF that is not a commit of
        this repository, or whose tree has no profile for `host`, is a UsageError (exit 2)."""
        if not ref or ref.startswith("-") or any(c in ref for c in "\0\n\r"):
            raise UsageError(f"--from {ref!r}: not a git revision")
        if shutil.which("git", path=ctx.environ.get("PATH")) is None:
            raise UsageError("--from needs git on PATH")
        r = Day2._git(
            ctx, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"
        )
        commit = r.stdout.strip()
        if r.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40,64}", commit):
            raise UsageError(f"--from {ref}: not a commit of the repository at {ctx.repo}")
        tree = Day2._git(ctx, "rev-parse", "--verify", f"{commit}^{{tree}}").stdout.strip()
        profile = f"{Day2.FROM_PROFILE_DIR}/{host}.json"
        if Day2._git(ctx, "cat-file", "-e", f"{commit}:{profile}").returncode != 0:
            raise UsageError(f"--from {ref} ({commit[:12]}): its tree has no profile {profile}")
        return FromRef(ref, commit, tree)

    def working_tree_commit(ctx):
        """What the upgrade applies: HEAD's commit and whether the working tree differs from
        it ({"commit": None} outside a git checkout)."""
        head = Day2._git(ctx, "rev-parse", "--verify", "--quiet", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = Day2._git(ctx, "status", "--porcelain", "--untracked-files=no").stdout.strip()
        return {"commit": head.stdout.strip(), "dirty": bool(dirty)}

    def worktrees_root(ctx):
        return Utilities.owned_path(ctx.cache, "worktrees")

    def add_from_worktree(ctx, frm, name, git_repo=None):
        """A clean detached worktree of frm.commit at <cache>/worktrees/<name>, added from
        `git_repo` (default: the repository under test)."""
        root = Day2.worktrees_root(ctx)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = Utilities.owned_path(root, name)
        if path.exists():
            Day2.remove_from_worktree(ctx, path, git_repo)
        argv = ("worktree", "add", "--detach", "--quiet", str(path), frm.commit)
        added = False
        try:  # an interrupt while git checks out (a hook may run long) leaves nothing either
            r = Day2._git(ctx, *argv, timeout=300, repo=git_repo)
            if r.returncode != 0:
                why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
                raise InfraError("from-ref", f"git worktree add of {frm.ref} failed: {why}")
            added = True
        finally:
            if not added:
                Day2.remove_from_worktree(ctx, path, git_repo)
        return path

    def remove_from_worktree(ctx, path, git_repo=None):
        """Remove a --from worktree and git's record of it; never raises (teardown path).
        Only a path directly under the cache's worktrees/ is ever removed. True when its
        directory is gone (git's record may stay, with a warning, when git cannot run)."""
        path = pathlib.Path(path)
        try:
            if path.parent != Day2.worktrees_root(ctx) or path.is_symlink():
                return False
            with contextlib.suppress(HarnessError):  # no git: the directory still goes
                Day2._git(ctx, "worktree", "remove", "--force", str(path), repo=git_repo)
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
            Day2._git(ctx, "worktree", "prune", repo=git_repo)
        except Exception as e:  # a cleanup must not mask the verdict
            print(f"integration-vm: warning: removing worktree {path}: {e}", file=sys.stderr)
        return not os.path.lexists(path)

    def prune_worktrees(ctx):
        """`prune`: the --from worktrees a killed run left (a run removes its own)."""
        root = Day2.worktrees_root(ctx)
        if root.is_dir() and not root.is_symlink():
            for wt in sorted(root.iterdir()):
                if Day2.remove_from_worktree(ctx, wt):
                    print(f"integration-vm: removed worktree {wt.name}")
                else:
                    print(f"integration-vm: could not remove worktree {wt}", file=sys.stderr)

    def apply_from_ref(ctx, rs, day2, certs, result, after_step):
        """REF's applies (resuming where the checkpoint left off), then the worktree goes."""
        ref_ctx = day2.ref_ctx(ctx)
        Env.progress(
            ctx, "from", f"applying {day2.frm.ref} ({day2.frm.commit[:12]}) from {day2.worktree}"
        )
        try:
            Ansible.apply(
                ref_ctx,
                rs,
                day2.profile,
                certs,
                phase_prefix="from",
                result=result,
                start=rs.record.applied_steps or 0,
                after_step=after_step,
            )
        finally:
            day2.close(ctx)

    def upgrade(ctx, rs, profile, certs, result, day2):
        """The working tree applied on top of REF: what the change does to a running host."""
        result.upgrade = {"from": day2.frm.as_json(), "to": Day2.working_tree_commit(ctx)}
        changed, tasks = Ansible.apply(ctx, rs, profile, certs, "upgrade", result)
        result.upgrade.update(changed=changed, changed_tasks=tasks)
        Utilities.write_owned(
            rs.dir / "logs" / "upgrade.json", json.dumps(result.upgrade, indent=2) + "\n"
        )
        Env.progress(ctx, "upgrade", f"{changed} task(s) changed on top of {day2.frm.ref}")


@dataclasses.dataclass(frozen=True)
class FromRef:
    """--from REF resolved: the name given, its commit and tree (git object ids)."""

    ref: str
    commit: str
    tree: str

    @property
    def lineage(self):
        """The checkpoint lineage of runs from this ref (gc_checkpoints keeps lineages apart)."""
        return f"from:{self.ref}"

    def as_json(self):
        return {"ref": self.ref, "commit": self.commit, "tree": self.tree}


@dataclasses.dataclass
class DayTwo:
    """A day-2 run's REF side: the resolved ref, its worktree while it exists (REF's
    applies only), and REF's own profile for the host."""

    frm: FromRef
    host: str
    git_repo: pathlib.Path = None  # where the worktree comes from (default: ctx.repo)
    worktree: pathlib.Path = None
    profile: dict = None

    def open(self, ctx, name):
        """Check out REF and load its profile (REF's own, as it was at REF)."""
        self.worktree = Day2.add_from_worktree(ctx, self.frm, name, self.git_repo)
        self.profile = Profiles.load_profile(
            self.host, self.worktree / Day2.FROM_PROFILE_DIR, self.worktree
        )

    def ref_ctx(self, ctx):
        """The context REF's chain is keyed and its applies run in: the worktree as repo."""
        return dataclasses.replace(ctx, repo=pathlib.Path(self.worktree))

    def close(self, ctx):
        """Remove the worktree (idempotent, never raises)."""
        if self.worktree is not None:
            Day2.remove_from_worktree(ctx, self.worktree, self.git_repo)
            self.worktree = None


# --------------------------------------------------------------------------------------
# Diagnostics and teardown: what a failed run leaves behind, and how a run goes away
# --------------------------------------------------------------------------------------
# Diagnostics are collected before anything is destroyed; teardown removes the domain,
# its transient storage pools and its disks, and only what the harness owns.


class Diagnostics:
    """The Diagnostics section as a namespace (its functions called on the class, never an
    instance): what a failed run leaves, teardown, storage pools."""

    # The guest's share of a diagnostics bundle, in bytes (each command's output is also
    # capped on its own: GUEST_OUTPUT_MAX).
    DIAG_GUEST_MAX = 32 << 20
    GUEST_DIAG_COMMANDS = (
        ("nft-ruleset.txt", "nft list ruleset"),
        ("nft-ruleset.json", "nft -j list ruleset"),
        ("docker-ps.txt", "docker ps -a"),
        # libvirt's dnsmasq logs through syslog (the control node's harness network, ADR-031).
        ("dnsmasq.log", "journalctl -b --no-pager -t dnsmasq -t dnsmasq-dhcp"),
        ("ss-tlnp.txt", "ss -tlnp"),
        ("journal-this-boot.txt", "journalctl -b --no-pager"),
        ("journal-previous-boot.txt", "journalctl -b -1 --no-pager"),
        ("critical-chain.txt", "systemd-analyze critical-chain"),
        ("blame.txt", "systemd-analyze blame --no-pager"),
        ("failed-units.txt", "systemctl --failed --no-pager"),
        ("cloud-init.log", "cat /var/log/cloud-init.log"),
        ("cloud-init-output.log", "cat /var/log/cloud-init-output.log"),
    )

    def collect_diagnostics(ctx, rs, reason):
        """Host + guest bundle under the run's diagnostics dir. Never raises."""
        d = rs.diag_dir
        notes = []
        try:
            d.mkdir(parents=True, exist_ok=True)
            Diagnostics._collect_host_files(ctx, rs, d, notes)
            guest_ok = False
            if rs.ip:
                r = rs.ssh("true", timeout=min(15, ctx.bounds["diag-command"]))
                guest_ok = r.returncode == 0
                why = (
                    "attempt timed out"
                    if r.timed_out
                    else (r.stderr.strip() or f"exit {r.returncode}")
                )
            else:
                why = "the VM never got an IP address"
            if guest_ok:
                Diagnostics._collect_guest_files(ctx, rs, d, notes)
            else:
                (d / "NOTE").write_text(
                    f"Guest-side diagnostics could not be collected: SSH to "
                    f"{ANSIBLE_USER}@{rs.ip or '?'} failed ({why}).\n"
                    "Only host-side files are here; read console.log.\n"
                )
            logs = rs.dir / "logs"
            if logs.is_dir():
                shutil.copytree(logs, d / "logs", dirs_exist_ok=True)
            Diagnostics._write_diag_summary(rs, d, reason, notes)
            Env.progress(ctx, "diagnostics", f"written to {d}")
        except Exception as e:  # diagnostics must never mask the real failure
            print(f"integration-vm: warning: diagnostics incomplete: {e}", file=sys.stderr)
        return d

    def copy_tail(src, dst, cap):
        """Copy at most the last `cap` bytes of `src` to `dst` (a note first when cut)."""
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            size = os.fstat(fi.fileno()).st_size
            if size > cap:
                fi.seek(size - cap)
                fo.write(f"[... first {size - cap} bytes cut]\n".encode())
            fo.write(fi.read(cap))  # never more, though the guest writes on meanwhile

    def _collect_guest_files(ctx, rs, d, notes):
        """collect_diagnostics' guest side: GUEST_DIAG_COMMANDS' output, each command's tail
        (rs.ssh's cap), all of them together at most DIAG_GUEST_MAX bytes."""
        room = Diagnostics.DIAG_GUEST_MAX
        for fname, cmd in Diagnostics.GUEST_DIAG_COMMANDS:
            if room <= 0:
                notes.append(
                    f"{fname}: not collected "
                    f"(the bundle's {Diagnostics.DIAG_GUEST_MAX} bytes are full)"
                )
                continue
            r = rs.ssh(f"sudo -n {cmd}", timeout=ctx.bounds["diag-command"])
            text = (
                r.stdout
                + (f"\n# stderr:\n{r.stderr}" if r.stderr.strip() else "")
                + ("\n# TIMED OUT\n" if r.timed_out else "")
            ).encode("utf-8", "replace")
            if len(text) > room:
                note = b"[... its head cut: the bundle is full]\n"
                text = note + text[len(text) - room + len(note) :]
            (d / fname).write_bytes(text)
            room -= len(text)

    def _collect_host_files(ctx, rs, d, notes):
        """collect_diagnostics' host side: the console and QEMU logs, and virsh's view of the
        domain and the network. What fails is one line in `notes`."""
        for src, dst in (
            (rs.console_log, "console.log"),
            (ctx.path_env("BOMA_IT_LIBVIRT_LOG_DIR") / f"{rs.domain}.log", "libvirt-qemu.log"),
        ):
            try:
                Diagnostics.copy_tail(
                    src, d / dst, Guest.GUEST_OUTPUT_MAX
                )  # the guest writes the console
            except OSError as e:
                notes.append(f"{dst}: not collected ({e.strerror or e})")
        for fname, args in (
            ("domifaddr.txt", ("domifaddr", rs.domain, "--source", "lease")),
            ("net-dhcp-leases.txt", ("net-dhcp-leases", Network.NET_NAME)),
            ("domain.xml", ("dumpxml", rs.domain)),
            ("domstate.txt", ("domstate", rs.domain, "--reason")),
        ):
            try:
                r = virsh(ctx, *args, timeout=ctx.bounds["diag-command"])
                (d / fname).write_text(r.stdout + r.stderr)
            except HarnessError as e:
                notes.append(f"{fname}: {e}")

    def _write_diag_summary(rs, d, reason, notes):
        """SUMMARY.txt of a diagnostics dir: why, when, the files and what was not collected."""
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != "SUMMARY.txt")
        lines = [
            f"integration-vm diagnostics for {rs.name} ({rs.record.host})",
            f"reason: {reason}",
            f"collected: {Env.now_iso()}",
            f"ip: {rs.ip or '-'}",
            f"console log: {rs.console_log}",
            "",
            "files:",
        ]
        lines += [f"  {p.relative_to(d)}  ({p.stat().st_size} bytes)" for p in files]
        if notes:
            lines += ["", "not collected:"] + [f"  {n}" for n in notes]
        (d / "SUMMARY.txt").write_text("\n".join(lines) + "\n")

    def parse_pool_target(pool_xml):
        """A storage pool's target directory from `virsh pool-dumpxml`, or None."""
        m = re.search(r"<target>\s*<path>([^<]+)</path>", pool_xml or "")
        return m.group(1).strip() if m else None

    def path_under(path, root):
        """path is root or below it, compared as normalised strings (path may not exist)."""
        path, root = os.path.normpath(str(path)), os.path.normpath(str(root))
        return path == root or path.startswith(root.rstrip("/") + "/")

    def is_harness_pool(name, target, cache_roots, target_exists):
        """A pool the harness (or virt-install on its behalf) made: its directory is under the
        cache, or it carries the run-name prefix and points at a directory that is gone (what
        earlier versions left, one per run). A foreign pool with live content is never ours."""
        if target and any(Diagnostics.path_under(target, r) for r in cache_roots):
            return True
        return name.startswith(NAME_PREFIX) and (not target or not target_exists)

    def harness_pools(ctx):
        """[(name, target)] of every storage pool the harness made (is_harness_pool)."""
        r = virsh(ctx, "pool-list", "--all", "--name")
        if r.returncode != 0:
            return []
        roots = {str(ctx.cache), str(ctx.cache.resolve())}
        found = []
        for name in Utilities.parse_name_list(r.stdout):
            x = virsh(ctx, "pool-dumpxml", name)
            target = Diagnostics.parse_pool_target(x.stdout) if x.returncode == 0 else None
            if Diagnostics.is_harness_pool(
                name, target, roots, bool(target) and os.path.isdir(target)
            ):
                found.append((name, target))
        return found

    def remove_pool(ctx, name):
        """Stop and forget a pool (and its autostart link). Never deletes its files."""
        virsh(ctx, "pool-destroy", name)
        virsh(ctx, "pool-undefine", name)


# --------------------------------------------------------------------------------------
# Report: report.html, one self-contained page per run (issue 28), and the bench's tables
# --------------------------------------------------------------------------------------
# Built only from the run's own records (result.json, the reboot captures, the logs, the
# console), so `report RUN_DIR` rebuilds it from a run dir or a diagnostics bundle. Every
# text that comes from the guest or the playbooks is stripped of control characters,
# bounded (its tail kept) and escaped; the page has no script and loads nothing. The
# bench's tables (one run's phases, its legs side by side) come last.


class Report:
    """The Report section as a namespace (its functions called on the class, never an
    instance): report.html, the harness's own time, the bench's tables."""

    REPORT_NAME = "report.html"
    REPORT_TEXT_MAX = 2000  # characters of one message, line or cell kept (its tail)
    REPORT_LIST_MAX = 40  # rows of one list (diff lines, files per dir: 400)
    REPORT_CONSOLE_LINES = 60
    REPORT_CONSOLE_BYTES = 64 * 1024
    # Phases the guest never needs, counted whole as the harness's own time; in the others,
    # the harness's spans of result.json's `timeline` (captures, VM creation, poll waits).
    HARNESS_PHASES = ("checkpoint", "reboot-diff", "teardown")
    HARNESS_PARTS = {
        "capture": "state captures",
        "create-vm": "VM creation (keys, seed, overlay, virt-install, define)",
        "poll-wait": "waits between polls (at most)",
        "checkpoint": "checkpoints",
        "reboot-diff": "reboot diffs",
        "teardown": "teardown",
    }
    # Control characters but tab and newline, and the bidi overrides that reorder text.
    _REPORT_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
    _PRIVATE_FILES = ("id_ed25519", "ssh_host_ed25519_key", REPORT_NAME)
    STORY_TEXT = {
        "dead live": "broken right after the applies, before any reboot: the change breaks "
        "the running host",
        "dies on reboot": "fine right after the applies, broken once rebooted: the host does "
        "not survive a reboot",
        "upgrade fails": "applied on top of what production runs (--from), the running host broke",
    }
    DIFF_CATEGORY_TEXT = {
        "nft": "firewall rules",
        "ports": "published ports",
        "sockets": "listeners",
        "failed_units": "failed units",
        "services": "enabled services",
    }
    REBOOT_STAGE_LABELS = (
        ("power-off", "seconds_to_off"),
        ("loader", "seconds_to_loader"),
        ("kernel", "seconds_to_kernel"),
        ("SSH", "seconds_to_ssh"),
        ("running", "seconds_to_running"),
        ("settled", "seconds_to_settled"),
    )

    def clean_text(text, limit=REPORT_TEXT_MAX):
        """Guest or playbook text made safe to show: ANSI escapes, control characters (but
        tab and newline) and bidi overrides removed, the tail kept past `limit`, escaped."""
        text = Report._REPORT_CONTROL.sub(
            "", Guest.ANSI_ESCAPE.sub("", str(text if text is not None else ""))
        )
        if len(text) > limit:
            text = f"[... {len(text) - limit} characters cut] " + text[-limit:]
        return html.escape(text, quote=True)

    def harness_seconds(result):
        """{phase name: {part: seconds}}: what the harness spent in each phase that the guest
        did not need. A checkpoint, reboot-diff or teardown phase is the harness's whole;
        in another phase, its `timeline` spans who=harness (captures, create-vm, poll waits)."""
        out = {}
        for p in result.get("phase_details") or []:
            fam = p["name"].split(":", 1)[0]
            if fam in Report.HARNESS_PHASES:
                parts = out.setdefault(p["name"], {})
                parts[fam] = round(parts.get(fam, 0.0) + p["seconds"], 2)
        for s in result.get("timeline") or []:
            phase = s.get("phase") or "(between phases)"
            if s.get("who") != "harness" or phase.split(":", 1)[0] in Report.HARNESS_PHASES:
                continue
            parts = out.setdefault(phase, {})
            parts[s["what"]] = round(parts.get(s["what"], 0.0) + s["seconds"], 2)
        return out

    def harness_share(result):
        """(harness seconds, cycle seconds, percent) of a run (cycle_seconds: without the
        bench's transport comparison)."""
        spent = sum(sum(parts.values()) for parts in Report.harness_seconds(result).values())
        total = Report.cycle_seconds(result)
        return round(spent, 1), round(total, 1), (round(100 * spent / total) if total else 0)

    def report_dirs(run_dir, result):
        """Where a run's files are: RUN_DIR first, then the run dir and the diagnostics
        bundle result.json names, when they exist here (a copied bundle has only itself)."""
        dirs = [pathlib.Path(run_dir)]
        named = [result.get("run_dir"), result.get("diagnostics")]
        named += [os.path.dirname(d.get("dir") or "") for d in result.get("reboot_diffs") or []]
        for p in named:
            if p and os.path.isdir(p) and all(not os.path.samefile(p, d) for d in dirs):
                dirs.append(pathlib.Path(p))
        return dirs

    def report_file(dirs, rel):
        """The first of dirs that holds `rel` (a relative path), or None."""
        for d in dirs:
            f = d / rel
            if f.is_file():
                return f
        return None

    def read_tail(path, max_bytes=REPORT_CONSOLE_BYTES):
        """The last max_bytes of a file as text (a huge console is never read whole)."""
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", "replace")

    def _h(tag, body, cls=None):
        return f"<{tag}{f' class={cls!r}' if cls else ''}>{body}</{tag}>"

    def _table(head, rows, cls="grid"):
        """An HTML table; head and cells are already escaped."""
        out = [f'<table class="{cls}">']
        if head:
            out += ["<thead><tr>", *[f"<th>{h}</th>" for h in head], "</tr></thead>"]
        out.append("<tbody>")
        for row in rows:
            out.append("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
        return "".join(out + ["</tbody></table>"])

    def _report_verdict(result):
        """The head of the page: verdict, story, failed stage and the run's one message."""
        verdict = result.get("verdict") or "error"
        head = f"{verdict.upper()}"
        if result.get("expect_fail"):
            head += f" (expected fail at {Report.clean_text(result['expect_fail'], 80)})"
        lines = [
            f'<div class="verdict v-{Report.clean_text(verdict, 20)}">',
            f'<span class="badge" id="verdict">{Report.clean_text(head, 200)}</span>',
            f'<span class="who">{Report.clean_text(result.get("host") or "-", 80)} &middot; '
            f"{Report.clean_text(result.get('command') or '-', 20)} &middot; "
            f"{Report.clean_text(result.get('vm') or '-', 120)}</span>",
        ]
        if result.get("story"):
            story = result["story"]
            lines.append(
                f'<p class="story" id="story"><b>{Report.clean_text(story, 80)}</b>: '
                f"{Report.clean_text(Report.STORY_TEXT.get(story, ''), 300)}</p>"
            )
        if verdict != "pass" and result.get("failed_stage"):
            lines.append(
                "<p>failed stage: <code "
                f'id="failed-stage">{Report.clean_text(result["failed_stage"], 200)}'
                "</code></p>"
            )
        if verdict != "pass" and result.get("message"):
            lines.append(f'<pre class="msg">{Report.clean_text(result["message"])}</pre>')
        seconds, total, pct = Report.harness_share(result)
        lines.append(
            f'<p class="sub">{total:.1f} s in all; the harness\'s own time {seconds:.1f} s '
            f"({pct} %); exit code {Report.clean_text(result.get('exit_code'), 10)}</p></div>"
        )
        return "".join(lines)

    def _failed_checks(result):
        """[(where, name, message)] of everything that failed, the checks first."""
        out = []
        for stage, key in Ansible.VERIFY_TASK_KEYS.items():
            for t in result.get(key) or []:
                if t.get("status") == "failed":
                    out.append((stage, t.get("name"), t.get("message")))
        named = {n for _, n, _ in out}
        out += [("verify", n, "") for n in result.get("failures") or [] if n not in named]
        for p in result.get("phase_details") or []:
            if p.get("status") in ("fail", "error", "interrupted") and not p["name"].startswith(
                "verify"
            ):
                out.append((p["name"], p["status"], p.get("detail") or p.get("message") or ""))
        idem = result.get("idempotence") or {}
        if result.get("failed_stage") == "idempotence":
            out += [("idempotence", "changed", t) for t in idem.get("changed_tasks") or []]
        return out

    def _report_failures(result):
        rows = Report._failed_checks(result)
        if not rows:
            return ""
        body = "".join(
            f'<li class="fail-item"><span class="where">{Report.clean_text(w, 80)}</span> '
            f'<b class="check">{Report.clean_text(n, 300)}</b>'
            + (f"<pre>{Report.clean_text(m)}</pre>" if m else "")
            + "</li>"
            for w, n, m in rows[: Report.REPORT_LIST_MAX]
        )
        more = (
            f"<p>... {len(rows) - Report.REPORT_LIST_MAX} more</p>"
            if len(rows) > Report.REPORT_LIST_MAX
            else ""
        )
        return (
            '<section id="failures"><h2>What failed</h2>'
            f'<ul class="fails">{body}</ul>{more}</section>'
        )

    def _report_verify(result):
        """Each check live (right after the applies) and after the reboots, side by side."""
        live = {t.get("name"): t for t in result.get("verify_live_tasks") or []}
        after = {t.get("name"): t for t in result.get("verify_tasks") or []}
        names = list(dict.fromkeys([*live, *after]))
        if not names:
            return ""

        def cell(t):
            if t is None:
                return '<span class="st-none">not run</span>'
            st = t.get("status") or "?"
            msg = (
                f'<div class="cellmsg">{Report.clean_text(t["message"], 400)}</div>'
                if t.get("message")
                else ""
            )
            st = Report.clean_text(st, 20)
            return f'<span class="st st-{st}">{st}</span>{msg}'

        rows = [(Report.clean_text(n, 300), cell(live.get(n)), cell(after.get(n))) for n in names]
        return (
            '<section id="verify"><h2>Checks: live vs after the reboots</h2>'
            + Report._table(("check", "live (after the applies)", "after the reboots"), rows)
            + "</section>"
        )

    def _timeline_phases(result):
        """[(name, at, seconds, status)]: each phase where it ran (a result.json without
        `at` places them one after another)."""
        out, t = [], 0.0
        for p in result.get("phase_details") or []:
            at = p.get("at")
            at = t if not isinstance(at, (int, float)) else at
            out.append((p["name"], float(at), float(p.get("seconds") or 0.0), p.get("status")))
            t = at + float(p.get("seconds") or 0.0)
        return out

    def _guest_stages(result, phases):
        """[(phase name, anchor seconds, [(label, start, end)])]: the first boot's and each
        reboot's stages, placed from the guest span's start (else the phase's)."""
        spans = [s for s in result.get("timeline") or [] if s.get("who") == "guest"]
        starts = {n: at for n, at, _, _ in phases}
        out = []
        boots = [s for s in spans if s.get("what") == "boot"]
        stages = result.get("boot_stages") or {}
        if "boot" in starts and stages:
            anchor = boots[-1]["at"] if boots else starts["boot"]
            marks = sorted((v, k) for k, v in stages.items() if isinstance(v, (int, float)))
            out.append(("boot", anchor, Report._segments([(k, v) for v, k in marks])))
        reboots = [s for s in spans if str(s.get("what", "")).startswith("reboot:")]
        for i, r in enumerate(result.get("reboot_stages") or []):
            name = f"reboot:{r.get('mode')}"
            anchor = reboots[i]["at"] if i < len(reboots) else starts.get(name)
            marks = [(label, r.get(key)) for label, key in Report.REBOOT_STAGE_LABELS]
            marks = [(lbl, v) for lbl, v in marks if isinstance(v, (int, float))]
            if anchor is not None:
                out.append((name, anchor, Report._segments(marks)))
        return out

    def _segments(marks):
        """[(label, seconds)] in order -> [(label, start, end)]: each segment ends at its stage."""
        out, prev = [], 0.0
        for label, secs in marks:
            if secs >= prev:
                out.append((label, prev, secs))
                prev = secs
        return out

    def _tl_rect(x, y, w, h, cls, title, label=None):
        text = ""
        if label and w > 7 * len(label) + 6:
            text = (
                f'<text class="seg" x="{x + w / 2:.1f}" y="{y + h / 2 + 4:.1f}" '
                f'text-anchor="middle">{Report.clean_text(label, 40)}</text>'
            )
        return (
            f'<g><rect class="{cls}" x="{x:.1f}" y="{y:.1f}" width="{max(w, 1.5):.1f}" '
            f'height="{h}" rx="2"><title>{Report.clean_text(title, 300)}</title></rect>{text}</g>'
        )

    def _tl_axis(total, scale, height):
        steps = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600)
        step = next((s for s in steps if total / s <= 12), 1200)
        out = []
        for i in range(int(total / step + 1e-9) + 1):
            x = TL_LABEL + i * step * scale
            out.append(
                f'<line class="tick" x1="{x:.1f}" y1="{TL_TOP - 8}" x2="{x:.1f}" y2="{height}"/>'
                f'<text class="axis" x="{x:.1f}" y="{TL_TOP - 12}" text-anchor="middle">'
                f"{round(i * step, 1):g}s</text>"
            )
        return "".join(out)

    def report_timeline_svg(result):
        """The run's timeline as an inline SVG (see above), or "" without phases."""
        phases = Report._timeline_phases(result)
        if not phases:
            return ""
        total = max([result.get("total_seconds") or 0.0] + [at + s for _, at, s, _ in phases]) or 1
        scale = (TL_WIDTH - TL_LABEL - 12) / total
        guest = {
            name: (anchor, segs) for name, anchor, segs in Report._guest_stages(result, phases)
        }
        rows = []
        for i, (name, at, secs, status) in enumerate(phases):
            rows.append(
                Report._tl_row(result, TL_TOP + i * TL_ROW, name, at, secs, status, scale, guest)
            )
        height = TL_TOP + len(phases) * TL_ROW + 6
        return (
            f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{TL_WIDTH}" '
            f'height="{height}" viewBox="0 0 {TL_WIDTH} {height}" role="img" '
            'aria-label="timeline of the '
            f'run">{Report._tl_axis(total, scale, height)}{"".join(rows)}</svg>'
        )

    def _tl_row(result, y, name, at, secs, status, scale, guest):
        """One phase's row: label, seconds, its bar, its guest stages and harness spans."""
        fam = name.split(":", 1)[0]
        kind = (
            "harness"
            if fam in Report.HARNESS_PHASES
            else "ansible"
            if fam in ("apply", "verify", "idempotence", "upgrade", "transport", "from")
            else "guest"
            if fam in ("boot", "reboot", "resume")
            else "other"
        )
        x = TL_LABEL + at * scale
        cls = f"bar k-{kind}" + (" failed" if status in ("fail", "error", "interrupted") else "")
        failed = status in ("fail", "error", "interrupted")
        out = [
            f'<text class="label{" bad" if failed else ""}" x="8" y="{y + 15}">'
            f"{Report.clean_text(name, 60)}{' ✗' if failed else ''}</text>",
            f'<text class="secs" x="{TL_LABEL - 8}" y="{y + 15}" '
            f'text-anchor="end">{secs:.1f}s</text>',
            Report._tl_rect(x, y + 2, secs * scale, 18, cls, f"{name}: {secs:.1f}s ({status})"),
        ]
        if name in guest:
            anchor, segs = guest[name]
            for j, (label, a, b) in enumerate(segs):
                out.append(
                    Report._tl_rect(
                        TL_LABEL + (anchor + a) * scale,
                        y + 2,
                        (b - a) * scale,
                        18,
                        f"stage s{j % 5}",
                        f"{name}: {label} after {b:.1f}s (+{b - a:.1f}s)",
                        label,
                    )
                )
        for s in result.get("timeline") or []:
            if s.get("phase") == name and s.get("who") == "harness":
                out.append(
                    Report._tl_rect(
                        TL_LABEL + s["at"] * scale,
                        y + 21,
                        s["seconds"] * scale,
                        6,
                        "hspan",
                        f"harness: {Report.HARNESS_PARTS.get(s['what'], s['what'])} "
                        f"{s['seconds']:.1f}s",
                    )
                )
        return "".join(out)

    def _load_capture(d):
        """A capture dir's categories {category: [lines]} (write_capture's JSON), or None."""
        cats = {}
        for cat in Reboot.REBOOT_DIFF_CATEGORIES:
            try:
                cats[cat] = json.loads((d / f"{cat}.json").read_text())
            except (OSError, ValueError):
                return None
        return cats

    def _lines_cell(lines):
        if not lines:
            return '<span class="st-none">-</span>'
        shown = "".join(
            f"<div>{Report.clean_text(ln, 400)}</div>" for ln in lines[: Report.REPORT_LIST_MAX]
        )
        more = len(lines) - Report.REPORT_LIST_MAX
        return shown + (f"<div><i>... {more} more</i></div>" if more > 0 else "")

    def _report_reboot_diff(summary, stages, dirs):
        """One reboot: how its boot went, what was unexpected, and per category what is gone
        and what was added (from the before/after captures when the bundle is here)."""
        mode, index = summary.get("mode"), summary.get("index")
        rel = f"reboot-{index}-{mode}"
        head = f"reboot {Report.clean_text(index, 10)} ({Report.clean_text(mode, 20)})"
        reached = ", ".join(
            f"{label} {stages[key]:.1f}s"
            for label, key in Report.REBOOT_STAGE_LABELS
            if stages and isinstance(stages.get(key), (int, float))
        )
        out = [f"<h3>{head}</h3>"]
        if reached:
            out.append(
                f'<p class="sub">after the reboot was issued: {Report.clean_text(reached, 400)}</p>'
            )
        for what in ("unexpected", "tolerated"):
            if summary.get(what):
                out.append(
                    f'<p class="{what}">{len(summary[what])} {what}:</p>'
                    + Report._lines_cell([str(u) for u in summary[what]])
                )
        before = after = None
        for d in dirs:
            if (d / rel / "before").is_dir():
                before, after = (
                    Report._load_capture(d / rel / "before"),
                    Report._load_capture(d / rel / "after"),
                )
                break
        if not summary.get("changed"):
            out.append('<p class="ok">nothing changed across this reboot</p>')
        elif before is not None and after is not None:
            diff = Reboot.diff_state(before, after)
            rows = [
                (
                    Report.clean_text(Report.DIFF_CATEGORY_TEXT.get(c, c)),
                    Report._lines_cell(v["removed"]),
                    Report._lines_cell(v["added"]),
                )
                for c, v in diff.items()
            ]
            out.append(Report._table(("", "gone after the reboot", "added by the reboot"), rows))
        elif summary.get("categories"):
            rows = [
                (
                    Report.clean_text(Report.DIFF_CATEGORY_TEXT.get(c, c)),
                    Report.clean_text(v.get("removed")),
                    Report.clean_text(v.get("added")),
                )
                for c, v in summary["categories"].items()
            ]
            out.append(Report._table(("", "gone (count)", "added (count)"), rows))
        return "".join(out)

    def _report_reboot_diffs(result, dirs):
        diffs = result.get("reboot_diffs") or []
        if not diffs:
            return ""
        stages = result.get("reboot_stages") or []
        body = "".join(
            Report._report_reboot_diff(s, stages[i] if i < len(stages) else {}, dirs)
            for i, s in enumerate(diffs)
        )
        return f'<section id="reboot-diffs"><h2>What each reboot changed</h2>{body}</section>'

    def _report_idempotence(result):
        idem = result.get("idempotence")
        if not idem:
            return ""
        tasks = idem.get("changed_tasks") or []
        body = (
            f"<p>{Report.clean_text(idem.get('changed'), 10)} task(s) changed on the re-apply "
            "after "
            "the reboots (must be 0)</p>" + Report._lines_cell(tasks)
            if idem.get("changed") or tasks
            else '<p class="ok">the re-apply after the reboots changed nothing</p>'
        )
        return f'<section id="idempotence"><h2>Idempotence</h2>{body}</section>'

    _TASK_RECAP_LINE = re.compile(r"^(.+?) -{3,} (\d+(?:\.\d+)?)s\s*$")

    def slowest_tasks(dirs, top=12):
        """[(seconds, task, log)]: profile_tasks' TASKS RECAP of each Ansible log, slowest
        first (the logs of RUN_DIR's logs/, else of the other dirs)."""
        logs = next((sorted((d / "logs").glob("*.log")) for d in dirs if (d / "logs").is_dir()), [])
        rows = []
        for log in logs:
            text = Report.read_tail(log, 256 * 1024)
            recap = text.rpartition("TASKS RECAP")[2] if "TASKS RECAP" in text else ""
            for line in recap.splitlines():
                m = Report._TASK_RECAP_LINE.match(line.strip())
                if m:
                    rows.append((float(m.group(2)), m.group(1), log.name))
        return sorted(rows, key=lambda r: -r[0])[:top]

    def _report_tasks(dirs):
        rows = Report.slowest_tasks(dirs)
        if not rows:
            return ""
        cells = [
            (f"{s:.2f}s", Report.clean_text(t, 300), Report.clean_text(log, 100))
            for s, t, log in rows
        ]
        return (
            '<section id="tasks"><h2>Slowest Ansible tasks</h2>'
            + Report._table(("seconds", "task", "log"), cells)
            + "</section>"
        )

    def _report_warnings(result):
        lines = list(result.get("warnings") or [])
        lines += [
            f"{p['name']}: {p['message']}"
            for p in result.get("phase_details") or []
            if p.get("status") in ("pass", "skipped") and p.get("message")
        ]
        for key in ("teardown_error", "resume_error", "first_boot_panic"):
            if result.get(key):
                lines.append(f"{key.replace('_', ' ')}: {result[key]}")
        if result.get("reuse_refused"):
            lines.append(f"the last loop's VM was not reused: {result['reuse_refused'].get('why')}")
        lines = list(dict.fromkeys(str(x) for x in lines))
        if not lines:
            return ""
        body = "".join(f"<li>{Report.clean_text(w)}</li>" for w in lines[: Report.REPORT_LIST_MAX])
        return f'<section id="warnings"><h2>Warnings</h2><ul class="warns">{body}</ul></section>'

    BOOT_FAIL_STAGES = ("boot", "reboot", "resume", "domain-running", "dhcp-lease", "tcp-22")
    BOOT_FAIL_STAGES += ("ssh-handshake", "cloud-init")

    def _report_console(result, dirs):
        """The console's tail when a boot or reboot failed (the guest's last words)."""
        stage = (result.get("failed_stage") or "").split(":", 1)[0]
        if result.get("verdict") == "pass" or stage not in Report.BOOT_FAIL_STAGES:
            return ""
        f = Report.report_file(dirs, "console.log")
        if f is None:
            return ""
        lines = Report.read_tail(f).splitlines()[-Report.REPORT_CONSOLE_LINES :]
        text = "\n".join(Report.clean_text(ln, 300) for ln in lines)
        return (
            f'<section id="console"><h2>Console: the last {len(lines)} lines</h2>'
            f'<pre class="console">{text}</pre></section>'
        )

    def _report_facts(result):
        """The run's facts: what ran, on what, from which commit."""
        commit = result.get("commit") or (result.get("upgrade") or {}).get("to") or {}
        strategy = result.get("ansible_strategy") or {}
        frm = result.get("from_ref") or {}
        resumed = result.get("resumed_from") or {}
        facts = [
            ("profile", result.get("host")),
            ("certs", result.get("certs")),
            ("command", result.get("command")),
            (
                "commit",
                commit.get("commit")
                and commit["commit"] + (" (working tree changed)" if commit.get("dirty") else ""),
            ),
            ("from", f"{frm.get('ref')} ({frm.get('commit')})" if frm else None),
            ("accelerator", result.get("accel")),
            ("Ansible strategy", strategy.get("used")),
            ("reboots", ", ".join(result.get("reboot_modes") or []) or None),
            ("resumed from", resumed.get("stage")),
            ("onto the last loop's VM", (result.get("reused_vm") or {}).get("run")),
            ("run", result.get("vm")),
            ("domain", result.get("domain")),
            ("ip", result.get("ip")),
            ("started", result.get("started_at")),
            ("finished", result.get("finished_at")),
            ("kept", "yes" if result.get("kept") else "no"),
            ("run dir", result.get("run_dir")),
            ("diagnostics", result.get("diagnostics")),
        ]
        rows = [
            (Report.clean_text(k), Report.clean_text(v, 400))
            for k, v in facts
            if v not in (None, "")
        ]
        return (
            '<section id="facts"><h2>The run</h2>'
            + Report._table(None, rows, "facts")
            + "</section>"
        )

    def _report_harness(result):
        """The harness's own time per phase (the bench prints the same)."""
        per = Report.harness_seconds(result)
        if not per:
            return ""
        rows = [
            (
                Report.clean_text(phase, 80),
                f"{sum(parts.values()):.1f}s",
                Report.clean_text(
                    ", ".join(
                        f"{Report.HARNESS_PARTS.get(k, k)} {v:.1f}s" for k, v in parts.items()
                    )
                ),
            )
            for phase, parts in per.items()
        ]
        seconds, total, pct = Report.harness_share(result)
        return (
            '<section id="harness"><h2>The harness\'s own time</h2>'
            f"<p>{seconds:.1f}s of {total:.1f}s ({pct} %) the guest did not need.</p>"
            + Report._table(("phase", "seconds", "spent on"), rows)
            + "</section>"
        )

    def _report_files(dirs, out_dir):
        """Relative links to every file of the run dir and the bundle (not the private keys)."""
        out = []
        for d in dirs:
            files = sorted(
                f for f in d.rglob("*") if f.is_file() and f.name not in Report._PRIVATE_FILES
            )
            links = "".join(
                f'<li><a href="{html.escape(urllib.parse.quote(os.path.relpath(f, out_dir)))}">'
                f'{Report.clean_text(f.relative_to(d), 300)}</a> <span class="size">'
                f"{f.stat().st_size} B</span></li>"
                for f in files[: Report.REPORT_LIST_MAX * 10]
            )
            out.append(f'<h3>{Report.clean_text(d, 400)}</h3><ul class="files">{links}</ul>')
        return '<section id="files"><h2>Files</h2>' + "".join(out) + "</section>"

    REPORT_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2933;
background:#f7f8fa;margin:0}
main{max-width:1200px;margin:0 auto;padding:20px 24px 60px}
h1{font-size:20px;margin:0 0 12px;font-weight:600}h2{font-size:17px;margin:28px 0 8px;
border-bottom:1px solid #d9dee4;padding-bottom:4px}h3{font-size:15px;margin:16px 0 4px}
.verdict{border-radius:8px;padding:14px 18px;background:#fff;border-left:8px solid #8a949e}
.v-pass{border-color:#3c8d5a}.v-fail{border-color:#c0392b}.v-error{border-color:#c77c11}
.badge{font-size:22px;font-weight:700;margin-right:14px}.v-pass .badge{color:#2f7a4a}
.v-fail .badge{color:#b03a2e}.v-error .badge{color:#a4660c}.who{color:#52606d}
.story{font-size:16px;margin:8px 0}.sub{color:#52606d;font-size:13px;margin:6px 0}
pre{white-space:pre-wrap;word-break:break-word;background:#fff;border:1px solid #e1e5ea;
border-radius:4px;padding:8px;font-size:12.5px;margin:4px 0;max-height:320px;overflow:auto}
pre.console{background:#1f2933;color:#e4e7eb;max-height:520px}
.fails{list-style:none;padding:0}.fail-item{background:#fff;border:1px solid #f0c4bf;
border-left:5px solid #c0392b;border-radius:4px;padding:8px 12px;margin:6px 0}
.where{font:12px ui-monospace,monospace;color:#7b8794;margin-right:6px}
table{border-collapse:collapse;background:#fff;margin:6px 0;font-size:13.5px}
td,th{border:1px solid #e1e5ea;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#eef1f4;font-weight:600}table.facts td:first-child{color:#52606d}
.st{font-weight:600}.st-ok,.ok{color:#2f7a4a}.st-failed{color:#b03a2e}.st-skipped,
.st-none{color:#9aa5b1}.cellmsg{font-size:12px;color:#52606d}.unexpected{color:#b03a2e;
font-weight:600}.tolerated{color:#7b8794}.warns li{margin:3px 0}.size{color:#9aa5b1;
font-size:12px}.files{columns:2;font-size:13px}code{font-size:13px}
svg{background:#fff;border:1px solid #e1e5ea;border-radius:6px;max-width:100%;height:auto}
svg text{font:12px system-ui,sans-serif;fill:#1f2933}svg .secs,svg .axis{fill:#7b8794}
svg .seg{font-size:10.5px;fill:#fff}svg .bad{fill:#b03a2e;font-weight:600}.tick{stroke:#eef1f4}
.bar{fill:#cfd6dd}.k-ansible{fill:#8fc1b5}.k-guest{fill:#c9dcf0}.k-harness{fill:#f2b880}
.k-other{fill:#cfd6dd}.failed{stroke:#c0392b;stroke-width:2.5}
.s0{fill:#9cc3e6}.s1{fill:#6fa8dc}.s2{fill:#4a8bc9}.s3{fill:#2f6fae}.s4{fill:#1d5690}
.hspan{fill:#e8892f}.legend span{display:inline-block;width:12px;height:12px;
border-radius:2px;margin:0 4px 0 14px;vertical-align:-1px}
"""

    def _report_legend():
        keys = (
            ("#8fc1b5", "Ansible"),
            ("#4a8bc9", "the guest's boot stages (each ends when its stage is reached)"),
            ("#e8892f", "the harness's own time"),
            ("#fff;border:2px solid #c0392b", "failed phase"),
        )
        return (
            '<p class="legend sub">'
            + "".join(f'<span style="background:{c}"></span>{t}' for c, t in keys)
            + "</p>"
        )

    def render_report(result, dirs, out_dir):
        """The page: failures first, then the timeline, the checks, the reboots, the rest."""
        verdict = (result.get("verdict") or "error").upper()
        title = f"{verdict} {result.get('host') or '-'} {result.get('vm') or ''}"
        timeline = Report.report_timeline_svg(result)
        body = [
            Report._report_verdict(result),
            Report._report_failures(result),
            Report._report_console(result, dirs),
            '<section id="timeline-section"><h2>Timeline</h2>'
            + timeline
            + Report._report_legend()
            + "</section>"
            if timeline
            else "",
            Report._report_verify(result),
            Report._report_reboot_diffs(result, dirs),
            Report._report_idempotence(result),
            Report._report_warnings(result),
            Report._report_tasks(dirs),
            Report._report_harness(result),
            Report._report_facts(result),
            Report._report_files(dirs, out_dir),
        ]
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "style-src 'unsafe-inline'\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{Report.clean_text(title, 200)}</title>"
            f"<style>{Report.REPORT_CSS}</style></head>"
            f"<body><main><h1>boma integration run</h1>{''.join(body)}</main></body></html>\n"
        )

    def write_report(run_dir):
        """RUN_DIR/report.html from RUN_DIR/result.json and the files the run left (here
        and where result.json says); -> its path. OSError/ValueError when it cannot."""
        run_dir = pathlib.Path(run_dir)
        result = json.loads((run_dir / "result.json").read_text())
        if not isinstance(result, dict):
            raise ValueError(f"{run_dir / 'result.json'}: not a result")
        dirs = Report.report_dirs(run_dir, result)
        out = run_dir / Report.REPORT_NAME
        Utilities.write_owned(out, Report.render_report(result, dirs, run_dir))
        return out

    def write_run_reports(rs):
        """A finished run's report.html in its run dir and its diagnostics dir -> the run
        dir's path, or None. Never raises: a report must not change the verdict."""
        first = None
        for d in (rs.dir, rs.diag_dir):
            try:
                if (d / "result.json").is_file():
                    path = Report.write_report(d)
                    first = first or path
            except (OSError, ValueError, HarnessError) as e:
                print(
                    f"integration-vm: warning: could not write {Report.REPORT_NAME}: {e}",
                    file=sys.stderr,
                )
        return first

    def cmd_report(ctx, args):
        """report RUN_DIR: rebuild report.html from a run dir or a diagnostics bundle."""
        d = pathlib.Path(args.run_dir)
        if not (d / "result.json").is_file():
            raise UsageError(f"report: {d} has no result.json (a run dir or a diagnostics bundle)")
        try:
            path = Report.write_report(d)
        except (OSError, ValueError) as e:
            raise UsageError(f"report: {d}: {e}") from None
        print(f"report: {path}")
        return EXIT_PASS

    # issue 13's targets on TCG: the ratios are of the same bench run's cold cycle.
    BENCH_TARGETS = {"loop": 0.25, "warm": 0.5, "transport": 4}
    BENCH_FAMILIES = (
        "image",
        "boot",
        "resume",
        "checkpoint",
        "from",
        "apply",
        "upgrade",
        "reboot",
        "reboot-diff",
        "verify",
        "idempotence",
        "transport",
        "teardown",
    )

    def format_bench_table(result):
        """Each phase's seconds and status, the boot and reboot stages under them, and the
        harness's own seconds in it (what the guest did not need: harness_seconds(), the
        split the report's timeline draws), with the parts; the total's share of the cycle."""
        per = Report.harness_seconds(result)
        rows = [("phase", "seconds", "status", "harness", "")]
        for p in result.get("phase_details", []):
            parts = per.get(p["name"], {})
            rows.append(
                (
                    p["name"],
                    f"{p['seconds']:.1f}",
                    p["status"],
                    f"{sum(parts.values()):.1f}" if parts else "",
                    ", ".join(
                        f"{k} {v:.1f}" for k, v in parts.items() if k not in Report.HARNESS_PHASES
                    ),
                )
            )
            rows += [
                (f"  {what}", f"{sec:.1f}", "", "", "")
                for what, sec in Report._bench_stages(result, p)
            ]
        spent, _, pct = Report.harness_share(result)
        rows.append(
            (
                "total",
                f"{result.get('total_seconds') or 0:.1f}",
                result.get("verdict") or "",
                f"{spent:.1f}",
                f"({pct}% of the cycle)",
            )
        )
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        return (
            "\n".join(
                f"{a:<{w[0]}}  {b:>{w[1]}}  {c:<{w[2]}}  {d:>{w[3]}}  {e}".rstrip()
                for a, b, c, d, e in rows
            )
            + "\n"
        )

    def _bench_stages(result, p):
        """[(what, seconds)] under a phase row: a boot's readiness stages (after `virsh
        start`), a reboot's (after it was issued)."""
        if p["name"] == "boot":
            stages = result.get("boot_stages", {})
            return [
                (f"boot to {st}", sec) for st, sec in sorted(stages.items(), key=lambda kv: kv[1])
            ]
        out = []
        if p["name"].startswith("reboot:"):
            for r in result.get("reboot_stages", []):
                if p["name"] == f"reboot:{r['mode']}":
                    out += [
                        (f"reboot to {what}", r[key])
                        for what, key in Reboot.REBOOT_STAGE_ROWS
                        if r.get(key) is not None
                    ]
        return out

    def bench_start_of(result):
        """Where a bench leg started: the last loop's VM, a checkpoint, or nothing."""
        reused = result.get("reused_vm")
        if reused:
            again = ", ".join(reused["reapplied"]) or "nothing"
            return f"onto the last loop's VM (re-applied {again})"
        return f"resumed from {(result.get('resumed_from') or {}).get('stage', 'nothing')}"

    def format_bench_comparison(cold, warm, edited, loop=None, upgrade=None, first_loop=None):
        """The cold cycle, the first quick loop (nothing edited), the quick loop after the
        edit, the warm full cycle (and with --from the day-2 cycle) side by side, by phase
        family, against the targets (issue 13), then the transport's per-call figure."""
        runs = [
            ("cold", cold),
            ("loop-first", first_loop),
            ("loop", loop),
            ("warm", warm),
            ("upgrade", upgrade),
        ]
        runs = [(n, r) for n, r in runs if r is not None]
        totals = [Utilities.phase_totals(r.get("phase_details", [])) for _, r in runs]
        rows = [("phase", *[n for n, _ in runs])]
        for fam in Report.BENCH_FAMILIES:
            if any(fam in t for t in totals):
                rows.append((fam, *[f"{t.get(fam, 0.0):.1f}" for t in totals]))
        secs = [Report.cycle_seconds(r) for _, r in runs]
        rows.append(("total", *[f"{x:.1f}" for x in secs]))
        shares = [Report.harness_share(r) for _, r in runs]  # the seconds the guest did not need
        rows.append(("harness", *[f"{h:.1f} ({pct}%)" for h, _, pct in shares]))
        width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out = [
            f"bench: after editing {edited} (in a copy; loop-first: before it): "
            + "; ".join(f"{n} {Report.bench_start_of(r)}" for n, r in runs if n != "cold")
        ]
        out += [
            "  ".join(
                f"{c:<{width[0]}}" if i == 0 else f"{c:>{width[i]}}" for i, c in enumerate(row)
            )
            for row in rows
        ]
        c = secs[0]
        for (n, _), x in zip(runs[1:], secs[1:], strict=True):
            target = Report.BENCH_TARGETS.get(n)
            ratio = x / c if c else float("nan")
            verdict = "" if target is None else (" (met)" if ratio <= target else " (NOT met)")
            out.append(
                f"{n}/cold = {ratio:.2f}" + (f" (target <= {target}){verdict}" if target else "")
            )
        t = cold.get("transport") or {}
        if t.get("speedup"):
            out.append(
                f"transport: {t['calls']} module calls, linear {t['linear']['per_call']}s "
                f"vs mitogen {t[Ansible.MITOGEN_STRATEGY]['per_call']}s per call = "
                f"{t['speedup']}x (target >= {Report.BENCH_TARGETS['transport']})"
                + (" (met)" if t["speedup"] >= Report.BENCH_TARGETS["transport"] else " (NOT met)")
            )
        elif t.get("error"):
            out.append(f"transport: not compared ({t['error']})")
        return "\n".join(out) + "\n"

    def cycle_seconds(result):
        """A run's wall time without the bench's own transport comparison."""
        extra = sum(
            p["seconds"]
            for p in result.get("phase_details", [])
            if p["name"].startswith("transport:")
        )
        return (result.get("total_seconds") or 0.0) - extra


# The timeline: one row per phase at its place in the run (seconds since the run
# started); inside a boot or reboot, the guest's stages from `virsh start` (or the
# reboot's issue) to each stage, in blues; the harness's own spans as an orange strip
# under the bar (a harness-only phase is orange whole); a failed phase outlined in red.
TL_WIDTH, TL_LABEL, TL_ROW, TL_TOP = 1160, 250, 30, 34


# --------------------------------------------------------------------------------------
# Loop: the quick loop's VM, kept for the next loop, reused or retired by it
# --------------------------------------------------------------------------------------
# A quick loop (`loop`) leaves its VM up, green or red (kept_by "loop" in run.json); the
# next loop of the profile applies its edit onto that VM, re-applying only the playbooks
# whose inputs changed since, or tears it down (--fresh, a VM that cannot take the edit or
# does not answer) and resumes a checkpoint. The gate (cycle) retires every loop VM first.


class Loop:
    """The Loop section as a namespace (its functions called on the class, never an instance):
    the quick loop's VM kept, reused or retired."""

    def keep_for_next_loop(rs):
        """The one place a VM becomes the next loop's (loop_vms finds it): a loop's VM, green
        or red, is where the next loop's edit goes."""
        rs.record.kept_by = "loop"
        rs.save()

    def loop_vms(ctx, host):
        """The VMs quick loops of `host` left up, oldest first."""
        kept = [
            rs
            for rs in Guest.list_runs(ctx)
            if rs.record.host == host and rs.record.kept_by == "loop" and rs.record.state != "down"
        ]
        return sorted(kept, key=lambda rs: rs.record.created_at or "")

    def claimed_loop_vms(ctx, host):
        """loop_vms that no other session is using, as [(rs, Claim)], oldest first: each
        claimed (its run dir, claim_dir) before it is looked at, then read again, so two
        sessions started together never take, nor tear down, the same VM (issue 27). A VM
        another session holds (a loop applying onto it) is left alone, with one line."""
        claims = {}
        for rs in Loop.loop_vms(ctx, host):
            claim = Utilities.claim_dir(rs.dir)
            if claim is None:
                Env.progress(ctx, "loop", f"leaving {rs.name} alone: another session is using it")
            else:
                claims[rs.name] = claim
        mine = [(rs, claims.pop(rs.name)) for rs in Loop.loop_vms(ctx, host) if rs.name in claims]
        for claim in claims.values():  # taken or torn down between the two looks
            claim.close()
        return mine

    def reuse_refusal(ctx, session, rs, chain):
        """Why the last loop's VM cannot take this loop's edit, or None. It can when it
        started where this run would (same golden image, profile shape, cert tier, a fresh
        lineage: the same booted key) and records what it applied."""
        keys = rs.record.applied_keys
        if session.day2 is not None:
            return "a --from loop starts from REF's checkpoint"
        if (rs.record.lineage or Checkpoints.FRESH_LINEAGE) != Checkpoints.FRESH_LINEAGE:
            return f"it converged a {rs.record.lineage} run"
        if rs.record.certs != session.certs:
            return f"it runs --certs {rs.record.certs}, this loop --certs {session.certs}"
        if not keys or chain is None:
            return "what it applied is not recorded (--no-checkpoints, or a real-secret tier)"
        if rs.record.image_key != Images.current_image_key(ctx):
            return "the golden image's inputs changed since it booted"
        if keys[0] != chain[0][1]:
            return "the profile's VM (memory, vCPUs) or the accelerator changed since it booted"
        return None

    def loop_vm_silence(ctx, rs):
        """Why the last loop's VM does not answer over SSH within the reuse-ssh bound, or
        None. Retried, not one attempt: a refusal costs a restore and every re-apply, and
        one attempt was once not enough (a 2026-11-30 CI run refused a VM that had just
        passed; its reason was not kept, hence result.json's reuse_refused)."""
        try:
            Machine(ctx, rs).wait_ssh(stage="reuse-ssh")
        except InfraError as e:
            return f"it does not answer over SSH ({e.msg})"
        return None

    def reuse_loop_vm(ctx, args, session):
        """A quick loop applies its edit to the VM the last loop left, re-applying only the
        playbooks from the first one whose inputs changed since that VM applied them (the
        checkpoint chain's keys, compared with run.json's applied_keys), as one iterates on
        a dev box: no restore, no apt install already done. What it applies onto is the last
        loop's state, not a fresh one: the gate (cycle) still starts fresh. --fresh, a VM
        that cannot take the edit (reuse_refusal) or does not answer: torn down, and this
        run resumes a checkpoint. Sets session.reused."""
        host = session.profile["name"]
        kept = Loop.claimed_loop_vms(ctx, host)
        last = kept.pop() if kept and not args.fresh else None
        for rs, claim in kept:  # every other one (all of them with --fresh)
            with claim:
                Loop.retire_loop_vm(ctx, rs)
        if last is None:
            return
        last, claim = last
        session.claims.append(claim)  # this session's until it ends, kept or torn down
        chain = None
        if session.certs not in REAL_SECRET_TIERS and Checkpoints.checkpoints_enabled(ctx, args):
            chain = Checkpoints.checkpoint_chain(
                ctx, session.profile, session.certs, last.record.image_key, last.record.accel
            )
        why = Loop.reuse_refusal(ctx, session, last, chain)
        if why is None:
            session.bounds = Env.stage_bounds(last.record.accel, ctx.settings)
            why = Loop.loop_vm_silence(ctx, last)
        if why is not None:
            Env.progress(
                ctx, "loop", f"not reusing the previous quick loop's VM {last.name}: {why}"
            )
            session.result.reuse_refused = {"run": last.name, "why": why}
            Loop.retire_loop_vm(ctx, last)
            return
        keys = last.record.applied_keys
        same = 0
        while (
            same + 1 < len(keys) and same + 1 < len(chain) and keys[same + 1] == chain[same + 1][1]
        ):
            same += 1
        session.acquire_slot(ctx)
        session.attach(last)
        session.reused = True
        session.checkpoint_chain = chain
        last.record.kept_by = None  # this session's now; keep_vm keeps it again
        Checkpoints.record_applied(last, chain, same)
        steps = [s["playbook"] for s in session.profile["applies"]]
        result = session.result
        result.host, result.accel = host, last.record.accel
        result.reused_vm = {"run": last.name, "kept": steps[:same], "reapplied": steps[same:]}
        result.checkpoints = Checkpoints.chain_record(chain)
        Env.progress(
            ctx,
            "loop",
            f"applying the edit onto the previous quick loop's VM {last.name}: "
            + (f"re-applying {', '.join(steps[same:])}" if steps[same:] else "nothing to re-apply")
            + (f" ({', '.join(steps[:same])} unchanged)" if same else ""),
        )

    def retire_loop_vms(ctx, host):
        """A quick loop leaves its VM up for inspection until the next run of the profile:
        that run tears it down first (it holds the checkpoint's domain name and the VM slot).
        Only runs a loop kept; a --keep/KEEP=1 VM is the operator's and stays, and so does
        one another session is using (claimed_loop_vms)."""
        for rs, claim in Loop.claimed_loop_vms(ctx, host):
            with claim:
                Loop.retire_loop_vm(ctx, rs)

    def retire_loop_vm(ctx, rs):
        Env.progress(ctx, "loop", f"tearing down the previous quick loop's VM {rs.name}")
        Machine(ctx, rs).destroy()


# --------------------------------------------------------------------------------------
# Reporting: result.json (ResultRecord), the summary line, JUnit, the closing lines
# --------------------------------------------------------------------------------------
# What a run says when it ends: the live result and its file, the one-line summary, the
# JUnit report, and the closing lines (the verdict in words, what was kept and why).


@dataclasses.dataclass
class ResultRecord(JsonRecord):
    """result.json (schema 1), what .ci/run, the bench tables and the runbook read.
    `phases` maps a phase family (image, boot, apply, reboot, verify, idempotence,
    teardown) to seconds; `phase_details` keeps each step (apply:site.yml, reboot:hard
    ...) with its status; `failures` are the failing verify (or idempotence) task names;
    `failed_stage` names where a non-pass stopped."""

    command: str
    schema: int = 1
    verdict: str = None  # pass | fail | error | interrupted
    exit_code: int = None
    failed_stage: str = None
    message: str = ""
    host: str = None
    vm: str = None  # the run's name
    ip: str = None
    accel: str = None
    certs: str = None
    reboot_modes: list = dataclasses.field(default_factory=list)
    reboot_diffs: list = dataclasses.field(default_factory=list)
    phases: dict = dataclasses.field(default_factory=dict)
    phase_details: list = dataclasses.field(default_factory=list)
    failures: list = dataclasses.field(default_factory=list)
    verify_tasks: list = dataclasses.field(default_factory=list)  # after the reboots
    verify_live_tasks: list = dataclasses.field(default_factory=list)  # before them
    story: str = None  # a red run's: "dead live" | "dies on reboot" | "upgrade fails"
    from_ref: dict = None  # --from: {ref, commit, tree}
    upgrade: dict = None  # --from: {from, to, changed, changed_tasks}
    idempotence: dict = None
    diagnostics: str = None
    run_dir: str = None
    started_at: str = None
    finished_at: str = None
    total_seconds: float = None
    kept: bool = False
    expect_fail: object = False  # False, or the stage --expect-fail names
    domain: str = None  # the libvirt domain (a resumed run's is its checkpoint's)
    ansible_strategy: dict = None  # the strategy_choice() its applies used
    boot_stages: dict = None
    reboot_stages: list = None  # each reboot's seconds to ssh and to running
    warnings: list = None  # slow-boot warnings
    checkpoints: dict = None  # {"chain": [{stage, key, ...}]}
    resumed_from: dict = None
    reused_vm: dict = None  # loop: {run, kept, reapplied} when it reused the last loop's VM
    reuse_refused: dict = None  # loop: {run, why} when the last loop's VM could not take it
    first_boot_panic: str = None  # the panic line of a first boot that was started again
    resume_error: str = None
    transport: dict = None  # bench: linear vs Mitogen figures
    teardown_error: str = None
    commit: dict = None  # the working tree's {commit, dirty} (None: not a git checkout)
    timeline: list = None  # spans [{phase, what, who: harness|guest, at, seconds}]
    extra: dict = dataclasses.field(default_factory=dict, repr=False)

    ABSENT_WHEN_NONE = frozenset(
        {
            "domain",
            "ansible_strategy",
            "boot_stages",
            "reboot_stages",
            "warnings",
            "checkpoints",
            "resumed_from",
            "reused_vm",
            "reuse_refused",
            "first_boot_panic",
            "resume_error",
            "transport",
            "teardown_error",
            "commit",
            "timeline",
            "from_ref",
            "upgrade",
        }
    )

    def add_warning(self, line):
        """One warning line into `warnings` (absent from result.json until the first)."""
        if self.warnings is None:
            self.warnings = []
        self.warnings.append(line)


class Reporting:
    """The Reporting section as a namespace (its functions called on the class, never an
    instance): result.json, the summary line, JUnit, the closing lines, --expect-fail."""

    def new_result(command, host=None):
        """A fresh result.json as the ResultRecord a session's phases fill in (its fields
        set as attributes); finish_result writes it out (ResultRecord.to_json, the one place
        it becomes result.json's dict)."""
        return ResultRecord(command=command, host=host)

    def format_summary(result):
        verdict = (result.get("verdict") or "error").upper()
        if result.get("expect_fail"):
            verdict += (
                " (expected fail)"
                if result.get("verdict") == "fail" and result.get("exit_code") == EXIT_PASS
                else f" (expected FAIL at {result['expect_fail']})"
            )
        head = f"integration-vm: {verdict}"
        if result.get("verdict") in ("error", "fail", "interrupted") and result.get("failed_stage"):
            head += f"[{result['failed_stage']}]"
        parts = [
            head,
            result.get("host") or "-",
            result.get("vm") or "-",
            f"accel={result.get('accel') or '-'}",
            f"total={round(result.get('total_seconds') or 0)}s",
        ]
        totals = Utilities.phase_totals(result.get("phase_details", []))
        if totals:
            parts.append("(" + ", ".join(f"{k} {round(v)}s" for k, v in totals.items()) + ")")
        if result.get("story"):  # last: the fields before it keep their positions
            parts.append(f"— {result['story']}")
        return " ".join(parts)

    # What XML 1.0 cannot carry at all, escaped or not (C0 controls but tab/LF/CR, lone
    # surrogates, U+FFFE/U+FFFF): one such character from a guest's console and CI cannot
    # parse the whole report.
    _XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
    JUNIT_TEXT_MAX = 64 * 1024  # characters of one message or body (guest output is unbounded)

    def xml_text(value, limit=JUNIT_TEXT_MAX):
        """`value` as text XML can carry: forbidden characters dropped, at most `limit`
        characters (the head, then a note of what was cut). Escaping is the caller's."""
        text = Reporting._XML_FORBIDDEN.sub("", str(value if value is not None else ""))
        if len(text) > limit:
            text = text[:limit] + f"\n[... {len(text) - limit} more characters cut]"
        return text

    def render_junit(result):
        """JUnit XML: one testcase per phase and per verify task. Every text is xml_text()."""
        suite = Reporting.xml_text(f"integration-vm.{result.get('host') or 'unknown'}", 200)
        cases = [
            (
                Reporting.xml_text(name, 500),
                secs,
                status,
                Reporting.xml_text(msg, 300),
                Reporting.xml_text(body),
            )
            for name, secs, status, msg, body in Reporting._junit_cases(result)
        ]
        failures = sum(1 for c in cases if c[2] == "fail")
        errors = sum(1 for c in cases if c[2] in ("error", "interrupted"))
        skipped = sum(1 for c in cases if c[2] == "skipped")
        out = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            f'<testsuites name="integration-vm" tests="{len(cases)}" failures="{failures}" '
            f'errors="{errors}" time="{result.get("total_seconds") or 0:.3f}">',
            f'  <testsuite name={_xml_quoteattr(suite)} tests="{len(cases)}" '
            f'failures="{failures}" errors="{errors}" skipped="{skipped}" '
            f'time="{result.get("total_seconds") or 0:.3f}">',
        ]
        for name, secs, status, msg, body in cases:
            head = (
                f"    <testcase classname={_xml_quoteattr(suite)} name={_xml_quoteattr(name)} "
                f'time="{secs:.3f}"'
            )
            if status == "pass" and not msg:
                out.append(head + "/>")
                continue
            out.append(head + ">")
            if status == "pass":  # a passing case with a note (e.g. --reboot-diff=warn)
                out.append(f"      <system-out>{_xml_escape(body)}</system-out>")
            else:
                tag = {"fail": "failure", "skipped": "skipped"}.get(status, "error")
                out.append(
                    f"      <{tag} message={_xml_quoteattr(msg[:300] or status)}>"
                    f"{_xml_escape(body)}</{tag}>"
                )
            out.append("    </testcase>")
        out += ["  </testsuite>", "</testsuites>"]
        return "\n".join(out) + "\n"

    def _junit_cases(result):
        """render_junit's cases [(name, seconds, status, message, body)]: the phases, the
        verify tasks, and one error case when the run ended in error with none recorded."""
        cases = []
        for p in result.get("phase_details", []):
            cases.append(
                (
                    p["name"],
                    p["seconds"],
                    p["status"],
                    p.get("message", ""),
                    p.get("detail") or p.get("message", ""),
                )
            )
        for stage, key in Ansible.VERIFY_TASK_KEYS.items():
            for t in result.get(key, []):
                st = (
                    "fail"
                    if t["status"] == "failed"
                    else ("skipped" if t["status"] == "skipped" else "pass")
                )
                msg = t.get("message", "")
                cases.append((f"{stage}: {t['name']}", 0.0, st, msg, msg))
        if result.get("verdict") in ("error", "interrupted") and not any(
            c[2] in ("error", "fail") for c in cases
        ):
            cases.append(
                (
                    result.get("failed_stage") or "harness",
                    0.0,
                    "error",
                    result.get("message", ""),
                    result.get("message", ""),
                )
            )
        return cases

    def _current_phase(result):
        running = [p["name"] for p in result.phase_details if p["status"] == "interrupted"]
        return running[-1] if running else "interrupted"

    # ---- the closing lines: the words a run ends with -----------------------------------------
    # Decided here only (issue 30), from result.json's fields: the command, the verdict, the
    # stage that failed and why the VM stays up. docs/runbooks/integration-testing.md ("The
    # closing lines") quotes each; tests/driver/test_reporting.py ends a session every way.
    # fmt: off
    FAILED_STAGE_WORDS = {
        # the failed stage's family  its line ({story}: " (dead live)" ...; {msg}: the error's)
        "apply":             "apply failed{story}: {msg}",
        "from":              "apply of {ref} (--from) failed: {msg}",
        "upgrade":           "apply failed{story}: {msg}",  # the working tree on top of REF
        "reboot-diff":       "reboot diff found differences: {msg}",
        "verify":            "verify failed{story}: {msg}",  # verify:live too
        "idempotence":       "idempotence changed {changed} on the re-apply after the reboot: "
                             "{tasks}",
        "idempotence-apply": "idempotence re-apply failed: {msg}",
    }
    KEPT_WORDS = {
        # why the VM stays up  the head of its inspection help
        "failure":   "kept for inspection",
        "loop-red":  "kept for inspection; the next loop applies your fix onto it",
        "next-loop": "kept for the next loop",
        "keep":      "kept (--keep)",
        "not-ours":  "left up (this command did not create it)",
    }
    LOOP_VM_WORDS = {
        # the loop's VM          how the loop's last line ends
        "kept":                " The VM stays up at this state until the next loop, cycle or "
                               "`make test-integration-clean`.",
        "torn down":           " Its VM was torn down.",
        "teardown incomplete": " Its VM's teardown was incomplete: `make test-integration-clean`.",
        None:                  "",  # no VM (a guard refused the loop), or one left as it was
    }
    # fmt: on
    LOOP_NOT_THE_GATE = (
        "a quick loop has one graceful reboot, no power cut and no idempotence pass. This is "
        "NOT the gate: `make test-integration HOST={host}` (cycle) must pass before the change "
        "is done.{vm}"
    )

    def stage_family(stage):
        """A failed stage's FAILED_STAGE_WORDS key: apply:site.yml -> apply, verify:live ->
        verify; idempotence:site.yml (the idempotence pass's apply itself failed) ->
        idempotence-apply."""
        family, _, step = (stage or "").partition(":")
        return "idempotence-apply" if family == "idempotence" and step else family

    def kept_reason(command, verdict, keep):
        """Why a run's VM stays up: its KEPT_WORDS key."""
        if verdict == "pass":  # only a loop, or --keep, keeps a passing run's VM
            return "next-loop" if command == "loop" else "keep"
        if verdict == "interrupted":  # a creating command tears down unless --keep
            return "keep" if keep and command in CREATING_COMMANDS else "not-ours"
        return "loop-red" if command == "loop" else "failure"

    def verdict_words(result):
        """The line a run that did not pass says first: the stage that failed, in words."""
        verdict, stage, msg = (
            result.get("verdict"),
            result.get("failed_stage"),
            result.get("message"),
        )
        if verdict == "interrupted":
            return (
                f"interrupted during {stage}"
                if stage not in (None, "interrupted")
                else "interrupted"
            )
        if verdict == "error":  # an error's stage leads its message, as the InfraError reads
            return f"error: {msg}" if stage in (None, "usage") else f"error: {stage}: {msg}"
        if verdict != "fail":
            return None
        idem = result.get("idempotence") or {}
        changed = idem.get("changed", 0)
        return Reporting.FAILED_STAGE_WORDS.get(
            Reporting.stage_family(stage), "{stage} failed: {msg}"
        ).format(
            stage=stage,
            msg=msg,
            story=f" ({result['story']})" if result.get("story") else "",
            ref=(result.get("from_ref") or {}).get("ref") or "REF",
            changed=f"{changed} task{'' if changed == 1 else 's'}",
            tasks=", ".join(idem.get("changed_tasks") or result.get("failures") or ["?"]),
        )

    def expect_words(result):
        """--expect-fail's line, when the run did not fail where it names."""
        want, stage = result.get("expect_fail"), result.get("failed_stage")
        if want and result.get("verdict") == "pass":
            return f"{want} PASSED but --expect-fail={want} was given"
        if (
            want
            and result.get("verdict") == "fail"
            and not Reporting.expected_failure(result, stage)
        ):
            return f"failed at {stage}, not at the expected stage {want} (--expect-fail)"
        return None

    def loop_vm_fate(result):
        """What became of a loop's VM: a LOOP_VM_WORDS key."""
        if result.get("kept"):
            return "kept"
        teardown = [p for p in result.get("phase_details", []) if p["name"] == "teardown"]
        if teardown:
            return "torn down" if teardown[-1]["status"] == "pass" else "teardown incomplete"
        return None

    def closing_lines(result, keep=False):
        """The words of a run's closing lines, each after "integration-vm: ", from its
        result.json fields and --keep (None: the run has no such line), in the order they
        come: `verdict` (a run that did not pass), `kept` (the head of the kept VM's
        inspection help), `expect` (--expect-fail's), `loop` (the quick loop's last line,
        after the summary line format_summary writes)."""
        command, verdict = result.get("command"), result.get("verdict")
        loop = None
        if command == "loop":
            vm = Reporting.LOOP_VM_WORDS[Reporting.loop_vm_fate(result)]
            loop = Reporting.LOOP_NOT_THE_GATE.format(host=result.get("host") or "<host>", vm=vm)
        return {
            "verdict": Reporting.verdict_words(result),
            "kept": Reporting.KEPT_WORDS[Reporting.kept_reason(command, verdict, keep)]
            if result.get("kept")
            else None,
            "expect": Reporting.expect_words(result),
            "loop": loop,
        }

    def inspection_help(ctx, rs, kept):
        """The kept VM's inspection help; `kept` says why it stays up (closing_lines)."""
        # Under scripts/it-run's sandbox the VM is only reachable inside its namespace.
        netns = ctx.settings["BOMA_IT_NETNS"]
        prefix = f"ip netns exec {netns} " if netns else ""
        ssh_cmd = shlex.join(
            Guest.ssh_argv(rs.dir, rs.domain, rs.ip or "<ip>", "", port=ctx.ssh_port)[:-1]
        )
        return (
            f"integration-vm: VM {rs.domain} (run {rs.name}) {kept}:\n"
            f"  console log:  {rs.console_log}\n"
            f"  serial:       {prefix}virsh --connect {ctx.uri} console {rs.domain}\n"
            f"  ssh:          {prefix}{ssh_cmd}\n"
            f"  diagnostics:  {rs.diag_dir}\n"
            f"  clean up:     scripts/integration-vm.py down --run {rs.name}   "
            f"(or: make test-integration-clean)\n"
        )

    def finish_result(ctx, result, rs, junit=None, stream=None, strategy=None):
        """result.json and report.html (with a run), JUnit, the summary line -> the report's
        path or None."""
        report = None
        result.finished_at = Env.now_iso()
        result.total_seconds = round(time.monotonic() - ctx.t0, 1)
        result.phases = {
            k: round(v, 1) for k, v in Utilities.phase_totals(result.phase_details).items()
        }
        if strategy is not None:
            result.ansible_strategy = strategy
        if rs is not None:
            result.vm, result.domain, result.ip = rs.name, rs.domain, rs.ip
            result.accel, result.run_dir = rs.record.accel, str(rs.dir)
            try:
                text = json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n"
                rs.dir.mkdir(parents=True, exist_ok=True)
                Utilities.write_owned(rs.dir / "result.json", text)
                rs.diag_dir.mkdir(parents=True, exist_ok=True)
                Utilities.write_owned(rs.diag_dir / "result.json", text)
            except (OSError, ValueError, HarnessError) as e:
                print(f"integration-vm: warning: could not write result.json: {e}", file=sys.stderr)
            report = Report.write_run_reports(rs)
        if junit:
            try:
                pathlib.Path(junit).write_text(Reporting.render_junit(result.to_json()))
            except OSError as e:
                print(f"integration-vm: warning: could not write {junit}: {e}", file=sys.stderr)
        print(Reporting.format_summary(result.to_json()), file=stream or sys.stdout, flush=True)
        return report

    def expected_failure(result, stage):
        """Whether a VerifyFailed at `stage` is the one --expect-fail[=STAGE] names (verify by
        default; a family name like `apply` covers `apply:site.yml`)."""
        want = result.get("expect_fail")
        return bool(want) and stage is not None and want in (stage, stage.split(":")[0])

    def apply_expect_fail(result, exit_code):
        """--expect-fail: the named stage failing is a pass; a pass is a failure; a failure
        at another stage stays one."""
        want = result.expect_fail
        if not want or exit_code not in (EXIT_PASS, EXIT_VERIFY):
            return exit_code
        if exit_code == EXIT_VERIFY and Reporting.expected_failure(
            result.to_json(), result.failed_stage
        ):
            return EXIT_PASS
        print(
            f"integration-vm: {Reporting.closing_lines(result.to_json())['expect']}",
            file=sys.stderr,
        )
        return EXIT_VERIFY


# --------------------------------------------------------------------------------------
# Session: preflight, phases, the failure policy
# --------------------------------------------------------------------------------------
# A session is one command's life: preflight guards (tools, libvirt), its phase
# list, and one policy for each way it can end (diagnostics? keep or destroy? exit code).


@dataclasses.dataclass(frozen=True)
class FailurePolicy:
    verdict: str  # result.json's verdict
    diagnostics: bool  # collect them (when a run exists)
    end: str  # the run's VM: "destroy" what this invocation created (unless --keep),
    #           "keep" it for inspection, or "leave" it as it is without a word
    exit_code: int  # (its words: closing_lines)


class Session:
    """The Session section's functions as a namespace (its functions called on the class, never
    an instance): preflight guards, the phase list per command, the failure-policy table,
    result.json, JUnit, the closing lines."""

    # The end-of-run checkpoint gc waits this long for checkpoints.lock, then skips (another
    # run writing a checkpoint holds it for minutes; the next run's gc does the work).
    END_GC_LOCK_WAIT = 5.0

    TOOL_PACKAGES = {
        "virsh": "libvirt-clients",
        "virt-install": "virt-install (bookworm: virtinst)",
        "qemu-img": "qemu-utils",
        "cloud-localds": "cloud-image-utils",
        "ssh": "openssh-client",
        "ssh-keygen": "openssh-client",
        "mmdebstrap": "mmdebstrap",
        "mkfs.ext4": "e2fsprogs",
        "qemu-system-x86_64": "qemu-system-x86",
        "ansible-playbook": "make venv",
    }

    def tools_for(command, image_source, need_build=True):
        tools = ["virsh"] if command != "image" else []
        if command in CREATING_COMMANDS:
            tools += ["virt-install", "qemu-img", "cloud-localds", "ssh", "ssh-keygen"]
        if command in (*CREATING_COMMANDS, "image") and image_source == "build" and need_build:
            tools += ["mmdebstrap", "mkfs.ext4", "qemu-img"]
        if command in ("apply", "reboot", "assert"):
            tools += ["ssh"]
        return list(dict.fromkeys(tools))

    def check_tools(ctx, tools):
        path = ctx.environ.get("PATH")
        for t in tools:
            if shutil.which(t, path=path) is None:
                raise InfraError(
                    "tools",
                    f"required tool {t!r} not found on PATH (install "
                    f"{Session.TOOL_PACKAGES.get(t, t)})",
                )

    def check_ansible(ctx):
        pb = Ansible.find_ansible_playbook(ctx)
        if shutil.which(pb, path=ctx.environ.get("PATH")) is None and not os.access(pb, os.X_OK):
            raise InfraError(
                "tools",
                "ansible-playbook not found (set BOMA_IT_ANSIBLE_PLAYBOOK or run `make venv`)",
            )
        return pb

    def check_libvirt(ctx):
        r = virsh(ctx, "uri", timeout=min(ctx.bounds["virsh"], 30))
        if r.returncode != 0:
            lines = (
                r.stderr.strip()
                or r.stdout.strip()
                or ("timed out" if r.timed_out else "no output")
            ).splitlines()
            raise InfraError("libvirt", f"libvirtd not reachable at {ctx.uri}: {lines[0]}")

    def _ignore_signals():
        """While diagnostics/teardown run, a second Ctrl-C must not abort them. A Python
        handler (not SIG_IGN, which children would inherit across exec) keeps the processes
        we start killable."""

        def note(signum, frame):
            print("integration-vm: cleaning up, please wait", file=sys.stderr, flush=True)

        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, note)

    def session(ctx, args, command, options=None):
        """Run a command's phases (SESSION_PHASES) and end it by FAILURE_POLICY; the exit
        code. A success of cycle/bench tears down (unless --keep)."""
        return Session.run_session(ctx, args, command, options).exit_code

    def run_session(ctx, args, command, options=None):
        """One session as a Run (what cmd_bench composes): its phases, the policy for how they
        ended, then result.json, JUnit and the summary line. Returns the Run."""
        options = options or SessionOptions()
        result = Reporting.new_result(command, args.host)
        result.started_at = Env.now_iso()
        result.certs = args.certs
        result.expect_fail = args.expect_fail or False
        session = Run(
            command=command,
            options=options,
            result=result,
            bounds=dict(ctx.default_bounds),
            strategy=options.strategy,
        )
        ctx = dataclasses.replace(ctx, session=session)  # the process's context, bound to this run
        if shutil.which("git", path=ctx.environ.get("PATH")) and (ctx.repo / ".git").exists():
            result.commit = Day2.working_tree_commit(ctx)  # what the report names
        try:
            session.exit_code = Reporting.apply_expect_fail(
                result, Session.run_phases(ctx, args, session)
            )
            result.exit_code = session.exit_code
            if session.exit_code == EXIT_USAGE and session.rs is None:
                return session  # bad input: the one error line says it all, nothing ran
            Session.end_session(ctx, args, session)
            session.reported = True
            return session
        finally:  # REF's worktree goes, whatever happened (end_session: after the verdict)
            if session.day2 is not None:
                session.day2.close(ctx)

    def run_phases(ctx, args, session):
        """The command's phases in order; the first failure is classified and handled by
        on_failure. The VM slot is released last, after any teardown."""
        try:
            try:
                for phase in Session.SESSION_PHASES[session.command]:
                    phase(ctx, args, session)
            except VerifyFailed as e:
                return Session.on_failure(ctx, args, session, "verify", e)
            except KeyboardInterrupt:
                return Session.on_failure(ctx, args, session, "interrupt", None)
            except Exception as e:  # every error takes the same road
                e = Session.as_harness_error(e, session.result)
                return Session.on_failure(
                    ctx, args, session, Session.ERROR_KINDS.get(e.exit_code, "infra"), e
                )
            return EXIT_PASS
        finally:
            if session.rs is not None:  # a kept VM keeps no SSH process of ours either
                session.rs.close_ssh()
            flush_command_log(session.cmdlog)
            session.release_slot()
            session.release_claims()

    def end_session(ctx, args, session):
        """After the verdict: the verdict written (write_verdict) with interrupts held back,
        then the end-of-run work (REF's worktree removed, the checkpoint gc), bounded; an
        interrupt there cuts it short and leaves the verdict, and its exit code, as written
        (issue 27). run_session removes the worktree if this did not."""
        try:
            with _signals_deferred():
                Session.write_verdict(ctx, args, session)
            if session.day2 is not None:  # REF's worktree (and git's record of it) goes
                session.day2.close(ctx)
            Session.gc_after_run(ctx, session)
        except KeyboardInterrupt:
            print(
                "\nintegration-vm: interrupted after the verdict: checkpoint cleanup skipped "
                "(the next run's does it)",
                file=sys.stderr,
            )
        if session.report is not None:  # the run's last line (stdout's last stays the summary)
            sys.stdout.flush()
            print(f"report: {session.report}", file=sys.stderr, flush=True)

    def gc_after_run(ctx, session):
        """One chain per profile: what these inputs can no longer resume goes. Optional
        work: its lock is waited for END_GC_LOCK_WAIT at most (another run writing a
        checkpoint holds it for minutes), then skipped with one line."""
        if not (session.checkpoint_chain and session.options.gc_outdated):
            return
        try:
            gone = Checkpoints.gc_checkpoints(
                ctx,
                session.result.host,
                keep=[k for _, k, _ in session.checkpoint_chain],
                lineage=Checkpoints.run_lineage(session),
                wait=Session.END_GC_LOCK_WAIT,
            )
            if gone:
                Env.progress(ctx, "checkpoint", f"removed {len(gone)} outdated checkpoint(s)")
        except LockBusy as e:
            print(
                f"integration-vm: checkpoint cleanup skipped: another run holds {e.path} "
                "(the next run's cleanup does it)",
                file=sys.stderr,
            )
        except Exception as e:  # a cleanup must not change the verdict
            print(f"integration-vm: warning: checkpoint cleanup: {e}", file=sys.stderr)

    def write_verdict(ctx, args, session):
        """The boot-time history, result.json (the converging commands and assert), JUnit,
        the summary line and the command's footer."""
        result, command = session.result, session.command
        Guest.note_boot_times(ctx, result, session.rs.name if session.rs else None)
        writes_result = command in (*CONVERGING_COMMANDS, "assert")
        session.report = Reporting.finish_result(
            ctx,
            result,
            session.rs if writes_result else None,
            args.junit,
            stream=sys.stdout if writes_result else sys.stderr,
            strategy=session.strategy,
        )
        if command == "bench":
            sys.stdout.write(Report.format_bench_table(result.to_json()))
        if command == "loop":
            print(
                f"integration-vm: {Reporting.closing_lines(result.to_json())['loop']}",
                file=sys.stderr,
            )

    # ---- the phases: each takes (ctx, args, run) and raises on failure -------------------

    def phase_prepare(ctx, args, session):
        """Every check that can fail before anything is created (prepare)."""
        session.profile, session.certs = Session.prepare(ctx, args, session.command)
        session.result.certs = session.certs

    def phase_retire_loop_vms(ctx, args, session):
        Loop.retire_loop_vms(ctx, session.profile["name"])

    def phase_reuse_loop_vm(ctx, args, session):
        """loop: the edit goes onto the VM the last loop left when it can (reuse_loop_vm);
        any other loop VM of the profile is torn down, as the gate does."""
        Loop.reuse_loop_vm(ctx, args, session)

    def phase_provision(ctx, args, session):
        """A new VM: image, accel, network, slot, then a resumed checkpoint or a cold boot
        (nothing to do for a loop that reuses the last loop's VM)."""
        if session.reused:
            return
        Session.provision(ctx, args, session)
        session.result.host = session.rs.record.host

    def phase_attach(ctx, args, session):
        """The live run this command acts on (--run, or the host's only one): its state,
        command log and its accelerator's bounds."""
        rs = Guest.select_run(ctx, args.run, session.profile["name"], live="required")
        if rs.record.state != "up":
            raise UsageError(f"run {rs.name} is {rs.record.state}, not up")
        session.attach(rs)
        session.bounds = Env.stage_bounds(rs.record.accel, ctx.settings)
        session.result.host = rs.record.host

    def phase_apply(ctx, args, session):
        Ansible.apply(ctx, session.rs, session.profile, session.certs, result=session.result)

    def phase_from_ref(ctx, args, session):
        """--from REF (day 2): resolve REF (exit 2 when it is not a commit or lacks the
        profile), then check it out in a worktree and load REF's own profile."""
        host, frm = session.profile["name"], session.options.from_ref
        if frm is None and args.from_ref:
            frm = Day2.resolve_from_ref(ctx, args.from_ref, host)
        if frm is None:
            return
        session.day2 = DayTwo(frm, host, git_repo=session.options.git_repo)
        session.result.from_ref = session.day2.frm.as_json()
        session.day2.open(ctx, f"{session.profile['name']}-{os.getpid()}")

    def phase_converge(ctx, args, session):
        """The playbooks from the first step this VM has not applied (a resumed checkpoint's),
        each followed by its checkpoint when the run keeps them. Day 2: REF's playbooks that
        way (REF's chain), then the working tree's on top."""
        after_step = Checkpoints.checkpoint_after_apply(ctx, session)
        start = session.rs.record.applied_steps or 0
        if session.day2 is None:
            Ansible.apply(
                ctx,
                session.rs,
                session.profile,
                session.certs,
                result=session.result,
                start=start,
                after_step=after_step,
                start_why="on the last loop's VM, its inputs unchanged" if session.reused else None,
            )
            return
        Day2.apply_from_ref(
            ctx, session.rs, session.day2, session.certs, session.result, after_step
        )
        Day2.upgrade(ctx, session.rs, session.profile, session.certs, session.result, session.day2)

    def phase_verify_live(ctx, args, session):
        """The verify right after the applies, before any reboot: a host broken live fails
        here ("dead live"), one the reboot breaks fails the verify after it ("dies on reboot")."""
        if session.command in GATE_COMMANDS and args.no_reboot:
            return  # no reboot: the one verify is the live one
        Ansible.run_assert(
            ctx,
            session.rs,
            session.profile,
            session.certs,
            session.result,
            stage=Ansible.LIVE_VERIFY,
        )

    def phase_reboots(ctx, args, session):
        """Each reboot mode the command runs (loop: one graceful; reboot: the first; the gate:
        all, unless --no-reboot), each proved and diffed against the capture before it."""
        command, result, rs = session.command, session.result, session.rs
        if command in GATE_COMMANDS and args.no_reboot:
            return
        modes = [args.reboot] if args.reboot else session.profile["reboot"]
        result.reboot_modes = (
            ["graceful"] if command == "loop" else modes[:1] if command == "reboot" else modes
        )
        last = None  # the previous reboot's final capture is the next one's `before`
        for mode in result.reboot_modes:
            with Utilities.timed_phase(ctx, result, f"reboot:{mode}") as entry:
                before, after = Machine(ctx, rs).reboot(
                    mode, before=last, settled_when=session.profile.get("reboot_settled_when")
                )
                entry["message"] = Guest.warn_reboot(result, rs.record.reboots, rs)
            last_reboot = rs.record.reboots[-1]
            stage = {
                k: last_reboot.get(k)
                for k in ("mode", *(key for _, key in Reboot.REBOOT_STAGE_ROWS), "stop_jobs")
            }
            for k in ("timer_jobs", "emulator_oops"):  # only when there are some
                if last_reboot.get(k):
                    stage[k] = last_reboot[k]
            result.reboot_stages = result.reboot_stages or []  # None until the first reboot
            result.reboot_stages.append(stage)
            with Utilities.timed_phase(ctx, result, f"reboot-diff:{mode}") as entry:
                summary = Reboot.reboot_diff(
                    ctx, rs, session.profile, mode, before, after, result, args.reboot_diff
                )
                if summary.get("warning"):
                    entry["message"] = summary["warning"]
            last = None if summary.get("recaptured") else after

    def phase_assert(ctx, args, session):
        Ansible.run_assert(ctx, session.rs, session.profile, session.certs, session.result)

    def phase_idempotence(ctx, args, session):
        if not args.no_idempotence and not args.no_reboot:
            Ansible.idempotence(ctx, session.rs, session.profile, session.certs, session.result)

    def phase_finish(ctx, args, session):
        """Everything passed: the verdict, the transport timing (bench), then teardown (the
        gate) or the kept VM's inspection help; `up` prints name and IP."""
        command, rs = session.command, session.rs
        session.result.verdict = "pass"
        if session.options.time_transports:
            Ansible.compare_transports(ctx, rs, session.profile, session.certs, session.result)
        if command in GATE_COMMANDS and not args.keep:
            with Utilities.timed_phase(ctx, session.result, "teardown"):
                Machine(ctx, rs).destroy()
        elif command in CONVERGING_COMMANDS:
            Session.keep_vm(ctx, args, command, session.result, rs)
        if command == "up":
            print(f"{rs.name} {rs.ip}", flush=True)

    # Each command's phases, in order (a new phase is one line here: e.g. a live verify
    # after the converge and before the reboots). The gate's --no-reboot/--no-idempotence
    # are read by the phases they skip.
    _GATE_PHASES = (
        phase_prepare,
        phase_from_ref,
        phase_retire_loop_vms,
        phase_provision,
        phase_converge,
        phase_verify_live,
        phase_reboots,
        phase_assert,
        phase_idempotence,
        phase_finish,
    )
    SESSION_PHASES = {
        "up": (phase_prepare, phase_provision, phase_finish),
        "apply": (phase_prepare, phase_attach, phase_apply, phase_finish),
        "reboot": (phase_prepare, phase_attach, phase_reboots, phase_finish),
        "assert": (phase_prepare, phase_attach, phase_assert, phase_finish),
        "loop": (
            phase_prepare,
            phase_from_ref,
            phase_reuse_loop_vm,
            phase_provision,
            phase_converge,
            phase_verify_live,
            phase_reboots,
            phase_assert,
            phase_finish,
        ),
        "cycle": _GATE_PHASES,
        "bench": _GATE_PHASES,
    }

    def teardown_or_keep(ctx, args, command, result, rs, teardown):
        """Tear down what this invocation created (never raises), or keep it and say how to
        inspect it."""
        if rs is None:
            return
        if teardown and command in CREATING_COMMANDS and not args.keep:
            try:
                with Utilities.timed_phase(ctx, result, "teardown"):
                    Machine(ctx, rs).destroy()
            except Exception as e:  # report, never mask the verdict
                result.teardown_error = str(e)
                print(
                    f"integration-vm: warning: teardown of {rs.name} incomplete: {e}",
                    file=sys.stderr,
                )
            return
        Session.keep_vm(ctx, args, command, result, rs)

    def keep_vm(ctx, args, command, result, rs):
        """The VM stays up (a pass or a failure alike): result.json says so, a loop's VM is
        the next loop's (keep_for_next_loop), and the operator is told how to inspect it."""
        result.kept = True
        if command == "loop":
            Loop.keep_for_next_loop(rs)
        kept = Reporting.closing_lines(result.to_json(), args.keep)["kept"]
        print(Reporting.inspection_help(ctx, rs, kept), file=sys.stderr, end="")

    # How a session ends, by failure kind. A VerifyFailed at the stage --expect-fail names
    # is destroyed like a pass; an interrupt announces its teardown (the operator waits).
    # fmt: off
    FAILURE_POLICY = {
        #                          verdict        diagnostics  the VM     exit code
        "verify":    FailurePolicy("fail",        True,        "keep",    EXIT_VERIFY),
        "infra":     FailurePolicy("error",       True,        "destroy", EXIT_INFRA),
        "usage":     FailurePolicy("error",       False,       "leave",   EXIT_USAGE),
        "interrupt": FailurePolicy("interrupted", False,       "destroy", EXIT_INTERRUPTED),
    }
    # fmt: on
    ERROR_KINDS = {EXIT_INFRA: "infra", EXIT_USAGE: "usage"}  # a HarnessError's, by exit code

    def on_failure(ctx, args, session, kind, e):
        """FAILURE_POLICY[kind] applied to the run: result.json's verdict and failed stage,
        one line, then diagnostics and teardown-or-keep as the table says. Its exit code."""
        Session._ignore_signals()
        policy, result, rs = Session.FAILURE_POLICY[kind], session.result, session.rs
        stage = e.stage if e is not None else Reporting._current_phase(result)
        msg = getattr(e, "msg", str(e)) if e is not None else "interrupted"
        result.verdict, result.failed_stage, result.message = policy.verdict, stage, msg
        if kind == "verify":
            result.failures = e.failed_tasks
            result.story = Ansible.story_of(result)
        lead = "\n" if kind == "interrupt" else ""  # after ^C the terminal's line is not empty
        print(
            f"{lead}integration-vm: {Reporting.closing_lines(result.to_json())['verdict']}",
            file=sys.stderr,
        )
        if rs is None or policy.end == "leave":
            return policy.exit_code
        if policy.diagnostics:
            reason = f"{stage}: {msg}" if kind == "verify" else str(e)
            result.diagnostics = str(Diagnostics.collect_diagnostics(ctx, rs, reason))
        destroy = policy.end == "destroy" or Reporting.expected_failure(result.to_json(), stage)
        if kind == "interrupt" and session.creates and not args.keep:
            Env.progress(ctx, "teardown", f"tearing down {rs.name}")
        Session.teardown_or_keep(ctx, args, session.command, result, rs, destroy)
        return policy.exit_code

    def as_harness_error(e, result):
        """An exception as the HarnessError the policy handles: an unexpected one (OSError,
        ValueError, ...) is an infrastructure error of the stage that was running."""
        if isinstance(e, HarnessError):
            return e
        failed = [p["name"] for p in result.phase_details if p["status"] == "error"]
        stage = failed[-1] if failed else "session"
        what = (
            f"{e.strerror}: {e.filename}"
            if isinstance(e, OSError) and e.strerror and e.filename
            else (str(e).splitlines() or [""])[0]
        )
        return InfraError(stage, f"unexpected {type(e).__name__}: {what}")

    def check_junit(path):
        """--junit FILE: its directory must exist and be writable now, not after a cycle."""
        if not path:
            return
        f = pathlib.Path(path)
        parent = f.parent if str(f.parent) else pathlib.Path(".")
        if f.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(
                f"--junit {path}: not a writable file path (its directory must exist and be "
                "writable)"
            )

    def prepare(ctx, args, command):
        """All validation that can fail before anything is created."""
        Session.check_junit(args.junit)
        host = args.host
        if host is None and command in ("apply", "assert", "reboot"):
            rs = Guest.select_run(ctx, args.run, None, live="required")
            host = rs.record.host
        profile = Profiles.load_profile(
            host, ctx.repo / "tests" / "integration" / "profiles", ctx.repo
        )
        certs = args.certs
        if certs is None and command in ("apply", "assert", "reboot") and host:
            try:
                certs = Guest.select_run(ctx, args.run, host, live="required").record.certs
            except UsageError:
                certs = None
        certs = certs or "internal"
        if certs == PROD_TIER and not args.allow_prod_certs:
            raise UsageError(
                f"--certs {PROD_TIER} uses the production DNS token and the real "
                "zone; pass --allow-prod-certs to confirm"
            )
        if not (ctx.repo / "tests" / "integration" / "certs" / f"{certs}.yml").is_file():
            raise UsageError(f"cert tier file tests/integration/certs/{certs}.yml does not exist")
        if certs in REAL_SECRET_TIERS and command in ("apply", *CREATING_COMMANDS):
            # Before anything is created: these tiers need the real Gandi token.
            r = run([str(ctx.repo / "scripts" / "vault-password.sh")], timeout=30)
            if r.returncode != 0 or not r.stdout.strip():
                why = (r.stderr.strip().splitlines() or ["no password printed"])[-1]
                raise UsageError(
                    f"--certs {certs} needs the production vault password "
                    f"(scripts/vault-password.sh: {why})"
                )
        if command != "reboot" and command != "up":
            Session.check_ansible(ctx)
        cached = (ctx.cache / "images" / Images.current_image_key(ctx) / "manifest.json").is_file()
        Session.check_tools(
            ctx, Session.tools_for(command, Images.image_source(ctx), need_build=not cached)
        )
        Session.check_libvirt(ctx)
        return profile, certs

    def provision(ctx, args, session):
        """image -> accel -> network -> guarded create -> boot (or a resumed checkpoint)."""
        profile, certs, result = session.profile, session.certs, session.result
        cached = (ctx.cache / "images" / Images.current_image_key(ctx) / "manifest.json").is_file()
        # before a build
        Utilities.check_guards(ctx, profile, need_image=not cached, count_vms=not cached)
        if session.options.cold_image:
            # The benchmark measures both: a forced rebuild (cold) and the cache hit (warm).
            with Utilities.timed_phase(ctx, result, "image:cold"):
                Images.ensure_image(ctx, force=True)
        with Utilities.timed_phase(ctx, result, "image"):
            image = Images.ensure_image(ctx)
            if not image.built:
                Env.progress(ctx, "image", f"cached {image.dir}")
        accel = Network.choose_accel(ctx, image)
        result.accel = accel
        session.bounds = Env.stage_bounds(accel, ctx.settings)
        session.acquire_slot(ctx)  # held until the session ends, after its teardown
        if certs in REAL_SECRET_TIERS and Checkpoints.checkpoints_enabled(ctx, args):
            Env.progress(
                ctx,
                "checkpoint",
                f"off: --certs {certs} puts the real Gandi token in the "
                "guest's memory, which a checkpoint would keep on disk",
            )
        elif session.command in CONVERGING_COMMANDS and Checkpoints.checkpoints_enabled(ctx, args):
            day2 = session.day2  # a day-2 run resumes REF's chain (its keys hash REF's files)
            session.checkpoint_chain = (
                Checkpoints.checkpoint_chain(
                    day2.ref_ctx(ctx), day2.profile, certs, image.key, accel
                )
                if day2
                else Checkpoints.checkpoint_chain(ctx, profile, certs, image.key, accel)
            )
            result.checkpoints = Checkpoints.chain_record(session.checkpoint_chain)
            if session.options.fresh_checkpoints:  # a cold benchmark starts with none of its own
                Checkpoints.gc_checkpoints(ctx, profile["name"], keep=())
            # a restore needs it active too (a fresh libvirtd has not started it)
            Network.ensure_network(ctx)
            if Checkpoints.try_resume(ctx, session) is not None:
                return session.rs
        with Utilities.timed_phase(ctx, result, "boot"):
            Network.ensure_network(ctx)
            with Utilities.file_lock(ctx, ctx.cache / "lock", "up"):
                # authoritative, under the lock
                Utilities.check_guards(ctx, profile, need_image=False)
                t0 = time.monotonic()
                create_run(ctx, profile, certs, accel, image, session)
                Guest.note_span(ctx, "create-vm", t0)
            session.rs.record.lineage = Checkpoints.run_lineage(session)
            panic = Machine(ctx, session.rs).start(image)
            if panic:
                result.first_boot_panic = panic
            Checkpoints.record_applied(session.rs, session.applied_chain, 0)
        result.boot_stages = session.rs.record.boot_stages or {}
        if session.checkpoint_chain:
            _, key, _ = session.checkpoint_chain[0]
            Checkpoints.take_checkpoint(ctx, session.rs, "booted", key, None, result)
        return session.rs


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    """What a caller composing sessions (cmd_bench) changes about one, decided before it
    starts; a plain command runs with the defaults."""

    cold_image: bool = False  # rebuild the golden image first, timed as image:cold
    fresh_checkpoints: bool = False  # remove this profile's checkpoints before resuming
    gc_outdated: bool = True  # after the run, remove checkpoints these inputs cannot resume
    time_transports: bool = False  # time linear vs Mitogen on the VM before teardown
    strategy: dict = None  # a strategy_choice() already resolved in this process
    from_ref: object = None  # a FromRef resolved by the caller (bench), instead of --from
    git_repo: pathlib.Path = None  # ... and the repository its worktree comes from


@dataclasses.dataclass(eq=False)
class Run:
    """One session's run (cockpit's and the NixOS driver's `Machine` are the models): the
    command and its options, the profile and cert tier it runs, its RunState once created
    or selected (run.json), its VM slot lock, its result (result.json), its stage bounds,
    command log, checkpoint chain and resolved Ansible strategy."""

    command: str = "session"
    options: SessionOptions = SessionOptions()
    result: object = None  # its ResultRecord (result.json), live; new_result(command) if None
    profile: dict = None
    certs: str = None
    rs: object = None  # a RunState
    slot: object = None  # the open vm-slot-N.lock, held from define to teardown
    claims: list = dataclasses.field(default_factory=list)  # Claims held to the end
    bounds: dict = dataclasses.field(default_factory=dict)
    cmdlog: pathlib.Path = None
    checkpoint_chain: list = None  # [(stage, key, detail)] when this run uses checkpoints
    strategy: dict = None  # strategy_choice(), resolved once (resolve_strategy)
    day2: object = None  # a DayTwo: --from REF's ref, worktree and profile
    reused: bool = False  # loop: its VM is the one the last loop left (reuse_loop_vm)
    exit_code: int = None
    reported: bool = False  # result.json and the summary line written (end_session)
    report: pathlib.Path = None  # its report.html (end_session)

    def __post_init__(self):
        if self.result is None:
            self.result = Reporting.new_result(self.command)

    def attach(self, rs):
        """This run's state from now on: its command log, and what a failure tears down."""
        self.rs = rs
        self.cmdlog = rs.dir / "logs" / "commands.log" if rs is not None else None

    @property
    def applied_chain(self):
        """The chain whose keys say what this run's VM has applied (record_applied), or
        None: a day-2 run applies the working tree on top of REF's chain."""
        return None if self.day2 else self.checkpoint_chain

    @property
    def creates(self):
        return self.command in CREATING_COMMANDS

    def acquire_slot(self, ctx):
        """Hold one of BOMA_IT_MAX_VMS slot locks from before the domain is defined to the
        end of the session (its teardown included): two sessions can never both be
        between define and teardown beyond the limit. Busy -> InfraError('guard') at once."""
        for i in range(ctx.max_vms):
            fh = Utilities.open_lock_file(Utilities.owned_path(ctx.cache, f"vm-slot-{i}.lock"))
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            self.slot = fh
            return
        raise InfraError(
            "guard",
            f"refusing to start: another run holds the VM slot "
            f"(BOMA_IT_MAX_VMS={ctx.max_vms}, all slots busy)",
        )

    def release_slot(self):
        if self.slot is not None:
            self.slot.close()
            self.slot = None

    def release_claims(self):
        """The checkpoints and the loop VM this session claimed (claim_dir) are free."""
        while self.claims:
            self.claims.pop().close()


# --------------------------------------------------------------------------------------
# Commands: one cmd_* per subcommand that is not a plain session, and the bench
# --------------------------------------------------------------------------------------
# cmd_image, cmd_down, cmd_prune, cmd_status, cmd_console, cmd_doctor; cmd_bench composes
# sessions (cold, loop, warm) and compares them with the targets.


class Commands:
    """The Commands section as a namespace (its functions called on the class, never an
    instance): cmd_* and the bench."""

    BENCH_EDIT_SUFFIXES = (".yml", ".yaml", ".j2", ".sh", ".py", ".cfg", ".conf", ".nft", ".txt")
    BENCH_DEFAULT_EDIT = "roles/docker_host/templates/etc/nftables.d/10-docker-forward.nft.j2"

    def bench_repo_copy(repo):
        """A copy of what the applies read, for a bench leg: the working tree is never
        touched (bench_edit appends the edit to the copy)."""
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="boma-bench-"))
        ignore = shutil.ignore_patterns(".run", "__pycache__", ".venv", ".git", "*.pyc")
        for name in ("roles", "playbooks", "inventories", "scripts"):
            if (repo / name).is_dir():
                shutil.copytree(repo / name, tmp / name, symlinks=True, ignore=ignore)
        for name in ("tests/integration", "tests/vault"):
            if (repo / name).is_dir():
                shutil.copytree(repo / name, tmp / name, symlinks=True, ignore=ignore)
        for name in Checkpoints.APPLY_SHARED_INPUTS:
            if (repo / name).is_file():
                shutil.copy2(repo / name, tmp / name)
        return tmp

    def bench_edit(tmp, edited, stamp):
        """The bench's one-role edit in a copy: a comment appended to roles/`edited`."""
        target = tmp / "roles" / edited  # edited: relative to roles/, symlinks resolved
        if (
            Profiles.resolved_under(target, tmp / "roles") != target.resolve()
            or target.is_symlink()
        ):
            raise UsageError(f"--warm-edit: roles/{edited} is not a plain file in the copy")
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        with os.fdopen(fd, "a") as fh:
            fh.write(f"\n# bench-integration: the warm re-run's edit ({stamp})\n")

    def bench_edit_target(ctx, edited):
        """--warm-edit: a plain file under roles/ (symlinks resolved, not molecule/) with an
        extension a comment can be appended to; returned relative to roles/."""
        f = Profiles.resolved_under(ctx.repo / edited, ctx.repo / "roles")
        rel = f.relative_to((ctx.repo / "roles").resolve()) if f else None
        if (
            f is None
            or not f.is_file()
            or not f.name.endswith(Commands.BENCH_EDIT_SUFFIXES)
            or "molecule" in rel.parts
        ):
            raise UsageError(
                f"--warm-edit {edited}: must be an existing file under roles/ (not "
                f"molecule/, symlinks resolved) ending in {' '.join(Commands.BENCH_EDIT_SUFFIXES)}"
            )
        return rel

    # The bench's sessions: what each leg changes about a plain session (SessionOptions).
    BENCH_COLD = SessionOptions(cold_image=True, fresh_checkpoints=True, time_transports=True)
    BENCH_ONLY = SessionOptions(cold_image=True, time_transports=True)  # --no-warm: one cycle
    BENCH_AFTER_EDIT = {
        "loop-first": SessionOptions(gc_outdated=False),
        "loop": SessionOptions(gc_outdated=False),
        "warm": SessionOptions(gc_outdated=False),
        "upgrade": SessionOptions(gc_outdated=False),  # + from_ref, git_repo (bench --from)
    }
    BENCH_LEGS = {
        "loop-first": "first quick loop (no loop VM yet), nothing edited",
        "loop": "quick loop onto the first one's VM",
        "warm": "warm full cycle",
        "upgrade": "day-2 cycle from REF's checkpoint (--from)",
    }

    def cmd_bench(ctx, args):
        """A cold cycle (image rebuilt, none of this profile's checkpoints; the transport
        compared on its VM before teardown); a first quick loop with nothing edited (it
        resumes the cold cycle's newest checkpoint), then the one-role edit in that loop's
        copy and the quick loop onto its VM (an agent's edit -> verdict); then a warm full
        cycle after the same edit in a copy of its own; all side by side."""
        if args.no_warm or not Checkpoints.checkpoints_enabled(ctx, args):
            return Session.session(ctx, args, "bench", Commands.BENCH_ONLY)
        rel = Commands.bench_edit_target(ctx, args.warm_edit)
        legs = [("loop-first", "loop"), ("loop", "loop"), ("warm", "bench")]
        upgrade_from = None
        if args.from_ref:  # resolved now: a bad REF is exit 2 before the cold cycle
            upgrade_from = Day2.resolve_from_ref(ctx, args.from_ref, args.host)
            legs.append(("upgrade", "bench"))
        Env.progress(ctx, "bench", "cold cycle: image rebuilt, no checkpoint of this profile")
        plain = dataclasses.replace(args, from_ref=None)  # a plain cycle; REF is the upgrade leg's
        cold = Session.run_session(ctx, plain, "bench", Commands.BENCH_COLD)
        if cold.exit_code != EXIT_PASS:
            return cold.exit_code
        after, rc, copies = {}, cold.exit_code, []
        try:
            for phase, command in legs:
                a = dataclasses.replace(args, cmd=command, from_ref=None)
                # The loop edits the first loop's copy (its VM is the one it goes onto); the
                # other legs get a copy and a stamp of their own: each must find the edit
                # new (same file, same invalidation), not resume another leg's checkpoint.
                if phase != "loop":
                    copies.append(Commands.bench_repo_copy(ctx.repo))
                sub = dataclasses.replace(ctx, repo=copies[-1], t0=time.monotonic())
                what = Commands.BENCH_LEGS[phase]
                if phase != "loop-first":
                    Commands.bench_edit(sub.repo, rel, f"{phase} {Env.now_iso()} {time.time_ns()}")
                    what += f" after editing {args.warm_edit}"
                Env.progress(sub, "bench", f"{what} in {sub.repo}")
                options = dataclasses.replace(
                    Commands.BENCH_AFTER_EDIT[phase], strategy=cold.strategy
                )
                if phase == "upgrade":
                    options = dataclasses.replace(options, from_ref=upgrade_from, git_repo=ctx.repo)
                leg = Session.run_session(sub, a, command, options)
                after[phase], rc = leg.result.to_json() if leg.reported else None, leg.exit_code
                if rc != EXIT_PASS:
                    break
        finally:
            for tmp in copies:
                shutil.rmtree(tmp, ignore_errors=True)
        Loop.retire_loop_vms(ctx, cold.result.host)  # the bench leaves nothing running
        sys.stdout.write(
            "\n"
            + Report.format_bench_comparison(
                cold.result.to_json(),
                after.get("warm"),
                args.warm_edit,
                loop=after.get("loop"),
                upgrade=after.get("upgrade"),
                first_loop=after.get("loop-first"),
            )
        )
        return rc

    def cmd_image(ctx, args):
        Session.check_tools(ctx, Session.tools_for("image", Images.image_source(ctx)))
        ctx.cache.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        img = Images.ensure_image(ctx, force=args.force)
        print(
            f"{img.dir} ({'built' if img.built else 'cached'}, key {img.key}, "
            f"{time.monotonic() - t0:.1f}s)"
        )
        return EXIT_PASS

    def cmd_down(ctx, args):
        Session.check_tools(ctx, ["virsh"])
        try:
            rs = Guest.select_run(ctx, args.run, args.host, live=True)
        except UsageError:
            if Guest.list_runs(ctx) and not args.run:
                raise
            if args.run and args.run.startswith(NAME_PREFIX):
                Session.check_libvirt(ctx)
                Utilities.destroy_domain(ctx, args.run)  # only if it carries our metadata
            print("integration-vm: nothing to tear down")
            return EXIT_PASS
        Session.check_libvirt(ctx)
        if args.keep:
            print(f"integration-vm: --keep: leaving {rs.name} up")
            return EXIT_PASS
        was = rs.record.state
        Machine(ctx, rs).destroy()
        print(f"integration-vm: {rs.name} {'already down' if was == 'down' else 'destroyed'}")
        return EXIT_PASS

    def cmd_prune(ctx, args):
        Session.check_tools(ctx, ["virsh"])
        Session.check_libvirt(ctx)
        owned = Utilities.owned_domains(ctx)
        r = virsh(ctx, "list", "--all", "--name", check=True)
        for name in Utilities.parse_name_list(r.stdout):
            if name not in owned and name.startswith(NAME_PREFIX):
                print(f"integration-vm: skipping {name}: no boma metadata (not the harness's)")
        for name in owned:
            Utilities.destroy_domain(ctx, name)
            print(f"integration-vm: pruned domain {name}")
        for name, target in Diagnostics.harness_pools(ctx):
            Diagnostics.remove_pool(ctx, name)
            print(f"integration-vm: pruned storage pool {name} ({target})")
        Commands.prune_tree(ctx.cache / "runs", None, match=RUN_NAME_RE.fullmatch)
        for rs in Guest.list_runs(ctx):
            shutil.rmtree(rs.dir, ignore_errors=True)
            print(f"integration-vm: removed run {rs.name}")
        (ctx.run_parent / "current").unlink(missing_ok=True)
        if Commands.prune_tree(ctx.cache / "checkpoints", "checkpoint"):
            shutil.rmtree(ctx.cache / "checkpoints", ignore_errors=True)
        Day2.prune_worktrees(ctx)
        if args.images:
            Commands.prune_tree(
                ctx.cache / "images", "image", keep=(Images.current_image_key(ctx),)
            )
        print("integration-vm: prune done")
        return EXIT_PASS

    def prune_tree(tree, what, keep=(), match=None):
        """Remove the directories in one of the harness's cache trees (those `match`es, but
        those in `keep`). A tree or entry that is a symlink is skipped with one line, never
        followed. Returns whether the tree was the harness's own (a real dir)."""
        if tree.is_symlink():
            print(
                f"integration-vm: not pruning {tree}: a symlink, not the harness's own tree",
                file=sys.stderr,
            )
            return False
        if not tree.is_dir():
            return False
        for d in sorted(tree.iterdir()):
            if d.name in keep or (match and not match(d.name)):
                continue
            if d.is_symlink() or not d.is_dir():
                print(
                    f"integration-vm: skipping {d}: not a directory the harness made",
                    file=sys.stderr,
                )
                continue
            shutil.rmtree(d, ignore_errors=True)
            if what:
                print(f"integration-vm: removed {what} {d.name}")
        return True

    def cmd_status(ctx, args):
        Session.check_tools(ctx, ["virsh"])
        Session.check_libvirt(ctx)
        owned = Utilities.owned_domains(ctx)
        runs = {rs.domain: rs for rs in Guest.list_runs(ctx) if rs.record.state != "down"}
        print(f"{'NAME':<36} {'STATE':<10} {'PROFILE':<20} {'AGE':>5}  IP")
        for name in sorted(set(owned) | set(runs)):
            meta, rs = owned.get(name, {}), runs.get(name)
            state = meta.get("state") or (rs.record.state if rs else "?")
            if rs and name not in owned and rs.record.state != "down":
                state = "orphan-run"
            created = meta.get("created_at") or (rs.record.created_at if rs else None)
            profile = meta.get("profile") or (rs.record.host if rs else "?")
            print(
                f"{name:<36} {state:<10} {profile:<20} {Utilities._age(created):>5}  "
                f"{(rs.ip if rs else '') or '-'}"
            )
        for name, target in Diagnostics.harness_pools(ctx):
            print(
                f"storage pool {name}: {target} (left over; make test-integration-clean removes it)"
            )
        for d in sorted((ctx.cache / "images").glob("*/manifest.json")):
            try:
                m = json.loads(d.read_text())
            except (OSError, ValueError):
                continue
            size = sum(p.stat().st_size for p in d.parent.iterdir() if p.is_file()) // (1 << 20)
            cur = " (current)" if m.get("key") == Images.current_image_key(ctx) else ""
            print(
                f"image {m.get('key')}{cur}: {size} MiB, built "
                f"{Utilities._age(m.get('built_at'))} ago"
            )
        for d in sorted((ctx.cache / "checkpoints").glob("*")):
            m = Checkpoints.load_checkpoint(ctx, d.name)
            size = sum(p.stat().st_size for p in d.iterdir() if p.is_file()) // (1 << 20)
            if m is None:
                print(f"checkpoint {d.name}: incomplete, {size} MiB")
            else:
                print(
                    f"checkpoint {d.name}: {m['host']} {m['stage']}, {size} MiB, saved "
                    f"{Utilities._age(m.get('created_at'))} ago"
                )
        return EXIT_PASS

    def cmd_console(ctx, args):
        rs = Guest.select_run(ctx, args.run, args.host, live=True)
        print(f"console log: {rs.console_log}")
        print(f"interactive: virsh --connect {ctx.uri} console {rs.domain}")
        try:
            lines = rs.console_log.read_text(errors="replace").splitlines()
            sys.stdout.write("\n".join(lines[-int(args.lines) :]) + "\n")
        except OSError as e:
            print(f"(console log not readable: {e.strerror or e})")
        return EXIT_PASS

    def cmd_doctor(ctx, args):
        checks = []

        def check(name, ok, detail, fix=""):
            checks.append(ok)
            print(
                f"{'OK  ' if ok else 'FAIL'} {name}: {detail}"
                + ("" if ok or not fix else f" — fix: {fix}")
            )

        Commands._doctor_tools(ctx, check)
        Commands._doctor_libvirt(ctx, check)
        img = Commands._doctor_accel(ctx, check)
        Commands._doctor_resources(ctx, check, img)
        check("golden image", True, str(img.dir) if img else "not built yet (up/image builds it)")
        return EXIT_PASS if all(checks) else EXIT_INFRA

    def _doctor_tools(ctx, check):
        """doctor: every tool a cycle needs on PATH, and ansible-playbook."""
        src = Images.image_source(ctx)
        path = ctx.environ.get("PATH")
        for t in list(dict.fromkeys(Session.tools_for("cycle", src) + ["qemu-system-x86_64"])):
            w = shutil.which(t, path=path)
            check(
                f"tool {t}",
                w is not None,
                w or "not found",
                f"apt-get install {Session.TOOL_PACKAGES.get(t, t)}",
            )
        pb = Ansible.find_ansible_playbook(ctx)
        ok = shutil.which(pb, path=path) is not None or os.access(pb, os.X_OK)
        check("tool ansible-playbook", ok, pb, "make venv (or set BOMA_IT_ANSIBLE_PLAYBOOK)")

    def _doctor_libvirt(ctx, check):
        """doctor: libvirtd reachable, and the harness network's state."""
        try:
            Session.check_libvirt(ctx)
            check("libvirtd", True, f"reachable at {ctx.uri}")
            libvirt_ok = True
        except HarnessError as e:
            check(
                "libvirtd",
                False,
                getattr(e, "msg", str(e)),
                "start libvirtd (virtlogd -d; libvirtd -d) or set --connect/LIBVIRT_DEFAULT_URI",
            )
            libvirt_ok = False
        if libvirt_ok:
            r = virsh(ctx, "net-info", Network.NET_NAME)
            if r.returncode != 0:
                check(
                    f"network {Network.NET_NAME}",
                    True,
                    "not defined yet (up defines and starts it)",
                )
            else:
                active = Network.parse_net_info(r.stdout).get("active") == "yes"
                check(
                    f"network {Network.NET_NAME}",
                    True,
                    "active" if active else "defined, inactive (up starts it)",
                )

    def _doctor_accel(ctx, check):
        """doctor: /dev/kvm usable by QEMU and the accelerator choice; -> the current golden
        image (None: not built yet)."""
        exists, group_ok, desc = Network.kvm_dev_status(ctx)
        check(
            "/dev/kvm",
            group_ok or not exists,
            desc
            + (
                ""
                if not exists
                else (
                    ": libvirt-qemu (group kvm) can open it"
                    if group_ok
                    else ": libvirt-qemu (group kvm) cannot open it"
                )
            ),
            'udev rule: KERNEL=="kvm", GROUP="kvm", MODE="0660" (or chmod 0660 + chgrp kvm)',
        )
        img_dir = ctx.cache / "images" / Images.current_image_key(ctx)
        img = (
            Images.image_from_dir(img_dir, img_dir.name)
            if (img_dir / "manifest.json").is_file()
            else None
        )
        try:
            verdict = Network.choose_accel(ctx, img)
            check(
                "accelerator",
                True,
                verdict + ("" if verdict == "kvm" else " (guests run under TCG: slow but correct)"),
            )
        except HarnessError as e:
            check("accelerator", False, str(e))
        return img

    def _doctor_resources(ctx, check, img):
        """doctor: RAM for a default VM, a writable cache dir and the disk space a run needs."""
        ok, detail = Utilities.ram_guard(ctx, DEFAULT_MEM_MIB)
        check("RAM", ok, f"{detail} (a default VM)", "stop other VMs/workloads")
        try:
            ctx.cache.mkdir(parents=True, exist_ok=True)
            probe = ctx.cache / f".doctor-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
            check("cache dir", True, f"{ctx.cache} writable")
            ok, detail = Utilities.disk_guard(ctx, need_image=img is None)
            check("disk", ok, detail, "free space or point BOMA_IT_CACHE elsewhere")
        except OSError as e:
            check(
                "cache dir",
                False,
                f"{ctx.cache}: {e.strerror or e}",
                "apply the integration_test role (make substrate) or set BOMA_IT_CACHE",
            )


# --------------------------------------------------------------------------------------
# CLI: help texts, the parser, main()
# --------------------------------------------------------------------------------------
# The subcommands, their flags and help texts (ENV_HELP is generated from SETTINGS), and
# main(), which maps every HarnessError to its exit code.


class CLI:
    """The CLI section as a namespace (its functions called on the class, never an instance):
    help texts, build_parser, main."""

    ENV_HELP = Env.env_help()
    REBOOT_HELP = """reboots (cycle, bench, reboot):
  A profile's "reboot" list runs in order: "reboot": ["graceful", "hard"] reboots
  gracefully (the ACPI power button, as virsh reboot sends it; once the guest is
  off, virsh start), then cuts the power (virsh destroy + start); default
  ["graceful"]; --reboot MODE replaces the list with that one mode (the reboot
  subcommand does one reboot). Each reboot must change the guest's boot_id.
  Right before and after each reboot the guest's state is captured in one SSH call
  and normalised into categories: nft (ruleset without handles, counter values,
  table/chain creation order; Docker's iptables-nft chains compared as multisets;
  a running container's address shown as <name>),
  ports (docker ps published ports), sockets (ss -tulnp: proto, address:port,
  process; kernel-picked ports shown as "ephemeral"), failed_units, services
  (every enabled service and whether it is active). Written on every outcome to
  <diagnostics>/reboot-<n>-<mode>/{before,after}/ and diff.txt; summarised in
  result.json "reboot_diffs". A difference the profile does not tolerate is captured
  once more after BOMA_IT_TIMEOUT_REBOOT_SETTLE seconds and, if still there, fails the
  run: exit 1, stage reboot-diff, VM kept (--reboot-diff=warn only reports it).
  Tolerance, in the profile: "reboot_diff_tolerate": {"sockets": ["dhclient"],
  "nft": ["^rule ip6? (nat|filter) DOCKER"]} maps a category to regexes searched
  (re.search) in each changed line without its +/- sign; a plain list of regexes
  applies to every category.
"""

    COMMAND_HELP = {
        "image": "build (or fetch) and verify the golden image for the current inputs",
        "up": "boot a VM for --host and wait until it is ready (prints NAME IP)",
        "apply": "apply the profile's playbooks to a run's VM",
        "reboot": "reboot a run's VM and prove it (boot_id must change)",
        "assert": "run the verify playbook against a run's VM (writes result.json)",
        "cycle": "up, apply, reboot, verify, idempotence, teardown (writes result.json)",
        "bench": "a cycle that prints a per-phase timing table at the end",
        "loop": "quick loop for an edit: onto the VM the last loop left (else the newest "
        "valid checkpoint), apply what the edit invalidated, verify live, one graceful "
        "reboot + state diff, verify; the VM stays up for the next edit (NOT the gate: cycle)",
        "down": "destroy a run's VM and disks (idempotent)",
        "console": "print a run's console log path and tail it",
        "prune": "remove every VM, disk and run the harness owns (only those)",
        "status": "list the harness's VMs, runs and images with their age",
        "doctor": "preflight: tools, libvirtd, accelerator, /dev/kvm, network, RAM, disk",
        "report": "rebuild RUN_DIR/report.html (one self-contained page) from a run dir "
        "(tests/integration/.run/<vm>) or its diagnostics bundle",
    }

    def build_parser():
        common = CLI._common_options()
        p = argparse.ArgumentParser(
            prog="integration-vm",
            description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
            epilog=EXIT_CODES_HELP + "\n" + CLI.ENV_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
        sps = {}
        for c in SUBCOMMANDS:
            sps[c] = sub.add_parser(
                c,
                parents=[common],
                help=CLI.COMMAND_HELP[c],
                description=CLI.COMMAND_HELP[c],
                epilog=(CLI.REBOOT_HELP + "\n" if c in ("cycle", "bench", "loop", "reboot") else "")
                + EXIT_CODES_HELP,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        CLI._add_command_options(sps)
        return p

    def _common_options():
        """The options every subcommand takes."""
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument(
            "--connect", metavar="URI", help="libvirt URI (env LIBVIRT_DEFAULT_URI)"
        )
        common.add_argument(
            "--accel",
            choices=ACCEL_CHOICES,
            help="accelerator: auto probes KVM, falls back to TCG (env BOMA_IT_ACCEL)",
        )
        common.add_argument(
            "--strategy",
            choices=STRATEGY_CHOICES,
            help="Ansible transport: mitogen (default; falls back to default "
            "when it cannot load) or default (ansible-core's linear) "
            "(env BOMA_IT_ANSIBLE_STRATEGY)",
        )
        return common

    def _run_opts(sp, host_required=False):
        sp.add_argument(
            "--host",
            required=host_required,
            help="profile name: tests/integration/profiles/<host>.json",
        )
        sp.add_argument(
            "--run", metavar="NAME", help="address a specific run (default: newest run of --host)"
        )

    def _cert_opts(sp):
        sp.add_argument(
            "--certs",
            choices=VALID_TIERS,
            help="cert tier (default internal; le-prod-wildcard needs --allow-prod-certs)",
        )
        sp.add_argument(
            "--allow-prod-certs",
            action="store_true",
            help="confirm the le-prod-wildcard tier (real DNS token and zone)",
        )

    def _cycle_opts(sp):
        sp.add_argument(
            "--keep", action="store_true", help="keep the VM afterwards, whatever the outcome"
        )
        sp.add_argument(
            "--no-reboot", action="store_true", help="skip the reboot (and idempotence)"
        )
        sp.add_argument(
            "--reboot",
            choices=REBOOT_MODES,
            help='one reboot of this mode instead of the profile\'s "reboot" '
            'list (default ["graceful"]; ["graceful", "hard"] does '
            "both in order); hard = virsh destroy + start",
        )
        sp.add_argument(
            "--reboot-diff",
            choices=Reboot.REBOOT_DIFF_POLICIES,
            default="fail",
            help="an unexpected difference in the guest's state across a reboot "
            "fails the run (fail, default) or is only reported (warn)",
        )
        sp.add_argument(
            "--no-idempotence",
            action="store_true",
            help="skip the post-reboot re-apply that must change nothing",
        )
        sp.add_argument("--junit", metavar="FILE", help="write JUnit XML here")
        sp.add_argument(
            "--no-checkpoints",
            action="store_true",
            help="neither resume from nor write checkpoints (env BOMA_IT_CHECKPOINTS=0)",
        )
        sp.add_argument(
            "--expect-fail",
            nargs="?",
            const="verify",
            metavar="STAGE",
            help="RED runs: a failure of the verify stage (or of STAGE, e.g. "
            "--expect-fail=reboot-diff; apply covers apply:<playbook>) is "
            "the expected outcome (exit 0; the VM is torn down); a pass, "
            "or a failure at another stage, exits 1",
        )

    def _from_opts(sp):
        sp.add_argument(
            "--from",
            dest="from_ref",
            metavar="REF",
            help="day 2: converge the VM with the repository at git REF first (a clean "
            "worktree of REF; its state is checkpointed per REF), then apply the working "
            "tree on top, verify live, reboot, verify (REF: what production runs, e.g. main)",
        )

    def _loop_opts(sp):
        sp.add_argument("--junit", metavar="FILE", help="write JUnit XML here")
        sp.add_argument(
            "--reboot-diff",
            choices=Reboot.REBOOT_DIFF_POLICIES,
            default="fail",
            help="an unexpected state difference fails (default) or warns",
        )
        sp.add_argument(
            "--no-checkpoints",
            action="store_true",
            help="boot cold and write no checkpoint (slow: the point of the loop is the "
            "checkpoint)",
        )
        sp.add_argument(
            "--fresh",
            action="store_true",
            help="do not apply onto the VM the last loop left: tear it down and start from "
            "the newest valid checkpoint (the edit's playbooks applied as on a fresh VM)",
        )

    def _add_command_options(sps):
        """Each subcommand's own options, on its parser in sps."""
        sps["image"].add_argument("--force", action="store_true", help="rebuild even if cached")
        for c in CREATING_COMMANDS:
            CLI._run_opts(sps[c], host_required=True)
            CLI._cert_opts(sps[c])
        CLI._loop_opts(sps["loop"])
        for c in ("cycle", "bench"):
            CLI._cycle_opts(sps[c])
        for c in ("cycle", "loop", "bench"):
            CLI._from_opts(sps[c])
        sps["bench"].add_argument(
            "--warm-edit",
            metavar="ROLE_FILE",
            default=Commands.BENCH_DEFAULT_EDIT,
            help="the role file the warm re-run edits, in a copy of the "
            f"repo (default {Commands.BENCH_DEFAULT_EDIT})",
        )
        sps["bench"].add_argument("--no-warm", action="store_true", help="only the cold cycle")
        sps["up"].add_argument(
            "--keep", action="store_true", help="on a failed boot keep what was created"
        )
        for c in ("apply", "reboot", "assert"):
            CLI._run_opts(sps[c])
            CLI._cert_opts(sps[c])
            sps[c].add_argument("--junit", metavar="FILE", help="write JUnit XML here")
        sps["reboot"].add_argument(
            "--reboot",
            choices=REBOOT_MODES,
            help='graceful or hard (default: the first of the profile\'s "reboot" list, else '
            "graceful)",
        )
        sps["reboot"].add_argument(
            "--reboot-diff",
            choices=Reboot.REBOOT_DIFF_POLICIES,
            default="fail",
            help="an unexpected state difference fails (default) or warns",
        )
        for c in ("down", "console"):
            CLI._run_opts(sps[c])
        sps["down"].add_argument(
            "--keep", action="store_true", help="do nothing (spec compatibility)"
        )
        sps["console"].add_argument(
            "--lines", type=int, default=60, help="lines to tail (default 60)"
        )
        sps["report"].add_argument("run_dir", metavar="RUN_DIR", help="holds the run's result.json")
        sps["prune"].add_argument(
            "--images",
            action="store_true",
            help="also remove golden images other than the current one",
        )

    def main(argv=None):
        parser = CLI.build_parser()
        args = Options.from_args(parser.parse_args(argv))

        def on_term(signum, frame):
            raise KeyboardInterrupt

        try:  # from here an interrupt unwinds: what the command created is torn down
            if signal.getsignal(signal.SIGINT) is _interrupted_before_main:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, on_term)
            ctx = Env.ctx_from_env(os.environ, args)
            if args.cmd == "bench":
                return Commands.cmd_bench(ctx, args)
            if args.cmd in ("up", "apply", "reboot", "assert", "cycle", "loop"):
                return Session.session(ctx, args, args.cmd)
            return {
                "image": Commands.cmd_image,
                "down": Commands.cmd_down,
                "console": Commands.cmd_console,
                "prune": Commands.cmd_prune,
                "status": Commands.cmd_status,
                "doctor": Commands.cmd_doctor,
                "report": Report.cmd_report,
            }[args.cmd](ctx, args)
        except KeyboardInterrupt:
            ended = dict(Reporting.new_result(args.cmd).to_json(), verdict="interrupted")
            print(f"\nintegration-vm: {Reporting.closing_lines(ended)['verdict']}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:  # one line, never a traceback
            e = Session.as_harness_error(e, Reporting.new_result(args.cmd))
            msg = getattr(e, "msg", str(e))
            ended = dict(
                Reporting.new_result(args.cmd).to_json(),
                verdict="error",
                failed_stage=e.stage,
                message=msg,
            )
            print(f"integration-vm: {Reporting.closing_lines(ended)['verdict']}", file=sys.stderr)
            return e.exit_code


class OutputWithoutReader:
    """stdout or stderr whose reader may be gone: a parent killed before the driver (CI's
    trap stopping a background job, a pytest that died of the same SIGTERM) closes the
    pipe, and a write to it (the interrupt's own line) would end the run with
    BrokenPipeError before its verdict and teardown, leaving the VM up. From the first
    write that finds no reader on, the output goes to /dev/null."""

    def __init__(self, stream):
        self._stream = stream

    def _gone(self):
        self._stream = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the stream's own
        return getattr(self._stream, name)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout, sys.stderr = OutputWithoutReader(sys.stdout), OutputWithoutReader(sys.stderr)
    sys.exit(CLI.main())
