"""Fork server for the fake tools of an in-process driver run (tests/conftest.py).

Why: forking the fakes from the pytest worker itself costs what the worker weighs. Its
~80 MB of page tables are copied at every fork, and every page either side writes after
it (Python writes reference counts everywhere) is copied again. That was most of the
suite's system time. This process is small (an interpreter with -S and fakebin.py
imported), so a fork from it is cheap. What it pays for (issue 26, the whole unit suite on
2 shared cores, CPU seconds user+sys): 76-97 with it, 166-183 with every fake exec'd
(BOMA_TEST_EXEC_FAKES=1), for 6,632 fakes: ~13 ms of CPU each, about half the suite.

How the fake still is the driver's own child: this server (the worker's child) starts it
with clone(2)'s CLONE_PARENT, which makes it the child of the server's parent, the
worker. It is fork() in every other way, between the hooks os.fork() runs around it. So
the driver's Popen waits on a real child of its own (waitpid, exit status, killpg of its
session) as it does for an exec'd tool. (Until 2026-12-05 an intermediate forked the
fake and exited, and the worker was a child subreaper meanwhile: one more fork per fake,
~0.5 ms of CPU each, ~3 CPU-s a suite.)

Protocol, one SOCK_SEQPACKET message each way: the request is JSON
{argv, cwd, env, fds: [stdin, stdout, stderr] as indexes into the passed fds or null,
new_session}; the reply is the fake's pid. EOF (the worker is gone) ends the server.
"""

import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import fakebin  # noqa: E402


def become_fake(argv, cwd, env, std_fds, new_session):
    """In the forked fake: take the stdio, session, cwd and environment an exec'd tool
    would have, run fakebin.main() as argv[0], and _exit with its status."""
    gc.disable()  # a collection would walk (and so copy, page by page) the server's heap
    code = 1
    try:
        if new_session:
            os.setsid()
        for fd, std in zip(std_fds, (0, 1, 2), strict=True):
            if fd is not None and fd != std:
                os.dup2(fd, std)
        for name in os.listdir("/proc/self/fd"):  # what close_fds=True does on exec
            if int(name) > 2:
                with contextlib.suppress(OSError):
                    os.close(int(name))
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = argv
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        fakebin.TOOL, fakebin.ARGS = os.path.basename(argv[0]), argv[1:]
        try:
            fakebin.main()
            code = 0
        except SystemExit as e:
            if isinstance(e.code, int) or e.code is None:
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# clone(2) with CLONE_PARENT: the new process is the child of this server's parent (the
# worker that started it), as fork() would make it this server's. The syscall is made with
# the GIL held (PyDLL), between the hooks os.fork() itself runs around fork(). A null stack
# pointer: the child goes on on a copy of this stack, as after fork().
CLONE_PARENT, SIGCHLD, SYS_CLONE = 0x00008000, 17, 56  # x86_64 (the only arch CI runs)
_PY = ctypes.PyDLL(None, use_errno=True)
_PY.syscall.restype = ctypes.c_long


def spawn(req, fds):
    """Start the fake as the worker's own child (CLONE_PARENT); return its pid."""
    std_fds = [None if i is None else fds[i] for i in req["fds"]]
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _PY.syscall(SYS_CLONE, CLONE_PARENT | SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        become_fake(req["argv"], req["cwd"], req["env"], std_fds, req["new_session"])
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    return pid if pid > 0 else -1


def serve(sock):
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 8)
        if not msg:
            return
        try:
            pid = spawn(json.loads(msg), fds)
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(str(pid).encode())


if __name__ == "__main__":
    # A Ctrl-C at the terminal is for the tests, not for this server: it ends at EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.freeze()  # what is loaded now is never collected: a fake's pages stay shared
    serve(socket.socket(fileno=int(sys.argv[1])))
