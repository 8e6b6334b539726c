"""The fakes under tests/fakes/ document every FAKE_* knob they read: a test that needs a
behaviour finds it in the fake's docstring, one line per knob, and no line is stale."""

import ast
import contextlib
import os
import pathlib
import re

import pytest

FAKES = pathlib.Path(__file__).resolve().parent / "fakes"
KNOB = re.compile(r"\bFAKE_[A-Z][A-Z_]*[A-Z]\b")


def knobs(source):
    """(knobs the code reads, knobs the docstring gives a line of its own) of one fake."""
    tree = ast.parse(source)
    doc = ast.get_docstring(tree, clean=False) or ""
    code = source.replace(doc, "", 1)
    documented = {m.group(0) for ln in doc.splitlines() if (m := KNOB.match(ln.strip()))}
    return set(KNOB.findall(code)), documented


def test_the_scan_sees_a_knob_read_and_its_line():
    src = '"""Fake.\n\n  FAKE_AA=1  does a\nmentions FAKE_BB in prose\n"""\nENV.get("FAKE_BB")\n'
    assert knobs(src) == ({"FAKE_BB"}, {"FAKE_AA"})


def test_every_fake_knob_has_a_line_in_its_fakes_docstring():
    fakes = sorted(FAKES.glob("*.py"))
    assert {p.name for p in fakes} >= {"fakebin.py", "sysbin.py"}
    problems, seen = [], 0
    for p in fakes:
        read, documented = knobs(p.read_text())
        seen += len(read)
        problems += [f"{p.name}: {k} is read but has no docstring line" for k in read - documented]
        problems += [f"{p.name}: {k} is documented but never read" for k in documented - read]
    assert seen >= 20, seen  # the scan found the knobs (fakebin alone reads 22)
    assert not problems, "\n".join(problems)


# ---- the forked fakes (tests/conftest.py _ForkedFakesPopen) ---------------------------------
def _cycle_as_seen(tmp, **env):
    """One in-process cycle against the fakes: its exit status, the tools it ran in order
    (virsh by subcommand), result.json's verdict and failed stage, and the fakes' pids."""
    import conftest

    h = conftest.Harness(tmp)
    try:
        p = h.run("cycle", "--host", "askari", **env)
        calls = h.calls()
        steps = [c["tool"] + (":" + c["argv"][2] if c["tool"] == "virsh" else "") for c in calls]
        (res,) = h.results()
        return (
            p.returncode,
            steps,
            (res["verdict"], res.get("failed_stage")),
            [c["pid"] for c in calls],
        )
    finally:
        h.close()


@pytest.mark.parametrize("name, env", [("green", {}), ("red", {"FAKE_VERIFY_FAIL": "1"})])
def test_a_forked_fake_is_what_an_execd_one_is(tmp_path, monkeypatch, name, env):
    # The unit tests fork the fakes instead of exec'ing an interpreter per call. The driver
    # must not be able to tell: the same run, green and red, gives the same calls, exit
    # status and verdict either way, and each forked fake is a process of its own.
    import conftest

    forked = _cycle_as_seen(tmp_path / f"{name}-forked", **env)
    monkeypatch.setattr(conftest, "EXEC_FAKES", True)
    execd = _cycle_as_seen(tmp_path / f"{name}-execd", **env)
    monkeypatch.setattr(conftest, "EXEC_FAKES", False)
    assert forked[:3] == execd[:3], name
    assert forked[0] == (0 if name == "green" else 1)
    pids = forked[3]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids


class _CutShort:
    """The fork server's socket, but the first reply is never read: an interrupt lands
    while the request is in flight (as run_driver's alarm can)."""

    def __init__(self, sock):
        self.sock, self.cut = sock, False

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def recv(self, n):
        if not self.cut:
            self.cut = True
            raise KeyboardInterrupt
        return self.sock.recv(n)


def test_a_fake_cut_short_does_not_hand_its_pid_to_the_next_request(tmp_path):
    # The server answers every request with the fake's pid. An answer left unread must not
    # become the next request's: the driver would wait on a fake that is not the one
    # writing to its pipe. The interrupted server is retired and the next fake is the
    # one the next request asked for.
    import conftest

    h = conftest.Harness(tmp_path)
    try:
        server = conftest._ForkServer.get()
        server.sock = _CutShort(server.sock)
        virsh = [str(h.bin / "virsh"), "--connect", "test:///fake"]
        null = os.open(os.devnull, os.O_RDWR)
        try:
            with contextlib.suppress(KeyboardInterrupt):
                server.spawn([*virsh, "uri"], None, h.env, (null, null, null), True)
            nxt = conftest._ForkServer.get().spawn(
                [*virsh, "version"], None, h.env, (null, null, null), True
            )
        finally:
            os.close(null)
        os.waitpid(nxt, 0)  # the fake it names has exited, so it has logged
        assert conftest._ForkServer.get() is not server
        assert [c["pid"] for c in h.calls("virsh") if c["argv"][-1] == "version"] == [nxt]
    finally:
        h.close()
