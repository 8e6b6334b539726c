"""CI walks the README's path (issue 24): `.ci/run` installs only what the README says a bare
machine needs first, and never a tool that a README command must install itself.

A green CI that installs shellcheck or Docker's engine by its own apt line proves nothing
for a newcomer whose `make test` then stops at the missing tool (it did, 2026-12-06).
"""

import pathlib
import re

import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent

# Packages that a README command installs itself, so CI's own line must never put them
# there first: the substrate (integration_test's list), Docker's engine and the image
# builder (scripts/docker-engine, scripts/build-molecule-image.sh), the sandbox's firewall
# tool (scripts/it-run), the report test's browser (make test-report).
TARGETS_INSTALL = {"shellcheck", "docker.io", "mmdebstrap", "chromium", "iptables"}


def substrate_packages():
    defaults = yaml.safe_load((REPO / "roles/integration_test/defaults/main.yml").read_text())
    return {p for p in defaults["integration_test__packages"] if "{{" not in p} | {
        "virtinst",
        "virt-install",
    }


def ci_text():
    return (REPO / ".ci/run").read_text()


def ci_bare_machine_needs(text):
    match = re.search(r"^BARE_MACHINE_NEEDS=\(([^)]*)\)", text, re.M)
    return set(match.group(1).split()) if match else set()


def ci_installed_packages(text):
    """Every package an `apt-get install` line of .ci/run names (the array expanded)."""
    text = text.replace("\\\n", " ")
    words = set()
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not re.search(r"\bapt-get\b.*\binstall\b", line):
            continue
        args = line.split("install", 1)[1].replace(
            '"${BARE_MACHINE_NEEDS[@]}"', " ".join(ci_bare_machine_needs(text))
        )
        words |= {w for w in args.split() if re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", w)}
    return words


def readme_bare_machine_needs():
    """The packages of the README's one `apt-get install ...` line for a bare machine."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"`(?:sudo )?apt-get install ([a-z0-9 .+-]+)`", readme)
    assert match, "README.md: no `apt-get install ...` line naming what a bare machine needs"
    return set(match.group(1).split())


def offending_ci_installs(text):
    return sorted(ci_installed_packages(text) & (TARGETS_INSTALL | substrate_packages()))


def test_ci_installs_exactly_what_the_readme_says_a_bare_machine_needs():
    assert ci_bare_machine_needs(ci_text()) == readme_bare_machine_needs()
    assert ci_installed_packages(ci_text()) == readme_bare_machine_needs()


def test_ci_never_installs_what_a_readme_command_installs_itself():
    assert offending_ci_installs(ci_text()) == []


def test_the_check_names_a_tool_ci_put_there_itself():
    """RED for the check: .ci/run's install line as it was on 2026-12-06."""
    old = (
        "install_packages() {\n  apt-get install -y -qq --no-install-recommends \\\n"
        "    python3-venv docker.io mmdebstrap curl iproute2 iptables ca-certificates make git \\\n"
        "    shellcheck >/dev/null\n}\n"
    )
    assert offending_ci_installs(old) == ["docker.io", "iptables", "mmdebstrap", "shellcheck"]
