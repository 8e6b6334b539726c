"""What the real-VM tests share: run the driver, read a host's newest result.json, read a
chain of base's `table inet filter` from a saved ruleset."""

import json
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
DRIVER = REPO / "scripts" / "integration-vm.py"
RUN_ROOT = pathlib.Path(os.environ.get("BOMA_IT_RUN_DIR", REPO / "tests" / "integration" / ".run"))


def run_driver(*args, timeout):
    """The driver as a user runs it; `timeout` is a last resort (it bounds every stage)."""
    return subprocess.run(
        [sys.executable, str(DRIVER), *args],
        cwd=REPO,
        timeout=timeout,
        text=True,
        capture_output=True,
    )


def newest_result(host):
    """result.json of the newest run of `host` (the driver writes one per run dir)."""
    results = sorted(RUN_ROOT.glob("*/result.json"), key=lambda p: p.stat().st_mtime)
    results = [p for p in results if json.loads(p.read_text()).get("host") == host]
    assert results, f"no result.json for {host} under {RUN_ROOT}"
    return json.loads(results[-1].read_text())


def filter_chain(ruleset_text, name):
    """The text of `chain <name> { ... }` inside `table inet filter`."""
    table = re.search(r"table inet filter \{(.*?)\n\}", ruleset_text, re.S)
    assert table, "no `table inet filter` in the ruleset"
    chain = re.search(rf"chain {name} \{{(.*?)\n\t\}}", table.group(1), re.S)
    assert chain, f"no {name} chain in `table inet filter`"
    return chain.group(1)


def libvirt_domains():
    """Every domain libvirt knows, running or not (a passing cycle must leave none of its own)."""
    return subprocess.run(
        ["virsh", "list", "--all", "--name"], text=True, capture_output=True, timeout=30
    ).stdout.split()
