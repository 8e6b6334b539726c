"""The fakes under tests/fakes/ document every FAKE_* knob they read: a test that needs a
behaviour finds it in the fake's docstring, one line per knob, and no line is stale."""

import ast
import pathlib
import re

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
