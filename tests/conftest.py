"""Shared test plumbing: load a script under scripts/ as a module once per session, and
run the integration-vm driver in-process.

The driver runs the fake tools as real subprocesses either way; what run_driver saves is
the driver's own interpreter start and its 4,000-line compile (~0.1 s per call, ~100
calls). Tests whose subject IS the driver's process (signals, process groups, two
concurrent runs) start it as a subprocess (Harness.popen / Harness.run(subprocess=True)).
"""

import contextlib
import functools
import importlib.util
import io
import os
import pathlib
import signal
import subprocess
import sys
import traceback

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


class _DriverTimeout(BaseException):
    pass


def run_driver(script, args, env, cwd, timeout):
    """`python3 script *args` with exactly env, in cwd, as a fresh module in this process:
    a CompletedProcess like subprocess.run(capture_output=True, text=True) gives. The
    module is re-executed per call (its globals read __file__ and the environment at
    import), from a code object compiled once. An exception the driver lets escape becomes
    a traceback on stderr and exit 1, as the interpreter would report it. Bounded: a
    driver still running after `timeout` s is interrupted (SIGALRM) and reported as 124."""
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
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            mod = type(sys)(name)
            mod.__file__ = str(script)
            sys.modules[name] = mod
            try:
                exec(code, mod.__dict__)
                ret = mod.main(list(args))
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
