"""Utilities: what every later section leans on (owned paths and writes, locks and claims,
the phase timer, the harness's domains and their metadata, the resource guards). Most are
exercised through the commands, in the tests of the sections that use them; these are the
direct ones.
"""

import xml.etree.ElementTree as ET

import pytest
from conftest import _result, ivm


def test_metadata_roundtrip():
    x = ivm.Utilities.render_metadata_xml(
        "2026-11-25T18:00:00+00:00/vm",
        "2026-11-25T18:00:00+00:00",
        "askari",
        "claude",
        host="askari",
    )
    m = ivm.Utilities.parse_metadata_xml(x)
    assert m == {
        "id": "2026-11-25T18:00:00+00:00/vm",
        "created_at": "2026-11-25T18:00:00+00:00",
        "profile": "askari",
        "owner": "claude",
        "host": "askari",
    }


def test_metadata_parse_as_virsh_prints_it():
    out = (
        '<boma:run xmlns:boma="https://boma.invalid/integration-vm" id="r1" '
        'created_at="t" profile="p" owner="o"/>\n'
    )
    assert ivm.Utilities.parse_metadata_xml(out)["id"] == "r1"


@pytest.mark.parametrize(
    "text",
    ["", "error: metadata not found", "<run/>", '<x:run xmlns:x="https://other.invalid" id="1"/>'],
)
def test_metadata_parse_rejects_foreign(text):
    assert ivm.Utilities.parse_metadata_xml(text) is None


def test_metadata_escapes_attributes():
    x = ivm.Utilities.render_metadata_xml('a"<b', "t", "p&q", "o")
    assert ivm.Utilities.parse_metadata_xml(x)["id"] == 'a"<b' and ET.fromstring(x) is not None


def test_phase_totals_group_families():
    t = ivm.Utilities.phase_totals(_result()["phase_details"])
    assert t == {
        "image": 0.2,
        "boot": 31.0,
        "apply": 250.0,
        "reboot": 28.0,
        "verify": 12.0,
        "teardown": 2.0,
    }
    assert list(t) == ["image", "boot", "apply", "reboot", "verify", "teardown"]


def test_free_mib_parses_memavailable():
    sample = "MemTotal:       16331156 kB\nMemAvailable:    8388608 kB\n"
    assert ivm.Utilities.free_mib(sample) == 8192


def test_free_mib_missing_field_is_zero():
    assert ivm.Utilities.free_mib("MemTotal: 1 kB\n") == 0
