"""The golden image, booted, is the reference it was built from (issue 10, ADR-028).

Boots one real VM (marker `vm`, not part of `make test`): `make test-vm`, or alone:
`scripts/it-run exec -- .venv/bin/pytest -m vm tests/e2e/test_golden_image_vm.py`.
Every package of Debian's cloud image's list is installed, and every package installed
by hand is in that list, in the harness's extras, or part of minbase; none of what the
roles install is there; the guest runs the kernel its own disk's GRUB booted.
The package check itself is a unit test here (no mark: `make test` runs it).
"""

import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
from conftest import ivm  # noqa: E402 (tests/conftest.py: pytest puts tests/ on the path)

DRIVER = REPO / "scripts" / "integration-vm.py"
RUN_ROOT = pathlib.Path(os.environ.get("BOMA_IT_RUN_DIR", REPO / "tests" / "integration" / ".run"))
HOST = os.environ.get("BOMA_IT_E2E_HOST", "askari")
UP_TIMEOUT_S = int(os.environ.get("BOMA_IT_E2E_TIMEOUT", "1800"))

QUERY_PACKAGES = (
    r"dpkg-query -W -f '${Package}\t${Priority}\t${Essential}\t${Pre-Depends}, ${Depends}\n'"
)


def package_check(query_text, manual, reference, extras):
    """Compare a booted guest's packages with the reference list. query_text:
    QUERY_PACKAGES's output; manual: `apt-mark showmanual`. Returns (missing, unlisted):
    reference packages not installed, and manually installed packages that are neither in
    the reference or the extras nor part of minbase (Priority required or Essential, and
    what those depend on: mmdebstrap leaves minbase's packages marked manual)."""
    rows = {}
    for line in query_text.splitlines():
        name, prio, essential, deps = (line.split("\t") + ["", "", ""])[:4]
        alts = [re.split(r"[\s:(]", a.strip(), maxsplit=1)[0] for a in re.split(r"[,|]", deps)]
        rows[name] = (prio == "required" or essential == "yes", {a for a in alts if a})
    base = [n for n, (core, _) in rows.items() if core]
    seen = set(base)
    while base:
        for dep in rows[base.pop()][1]:
            if dep in rows and dep not in seen:
                seen.add(dep)
                base.append(dep)
    listed = set(reference) | set(extras)
    missing = sorted(set(reference) - set(rows))
    return missing, sorted(set(manual) - listed - seen)


QUERY = "\n".join(
    [
        "bash\trequired\tyes\t, base-files (>= 2.1.12), debianutils (>= 5.6-0.1)",
        "base-files\trequired\tyes\t, ",
        "debianutils\trequired\tyes\t, libc6 (>= 2.34)",
        "libc6\toptional\tno\t, libgcc-s1",
        "libgcc-s1\toptional\tno\t, gcc-14-base (= 14.2.0-19), libc6 (>= 2.35)",
        "gcc-14-base\toptional\tno\t, ",
        "sudo\toptional\tno\t, libc6 (>= 2.38), libpam0g:any | libpam-x",
        "curl\toptional\tno\t, libcurl4t64 (= 8.14.1-2)",
        "nftables\toptional\tno\t, libnftables1 (= 1.1.3-1)",
        "libnftables1\toptional\tno\t, libc6",
        "",
    ]
)


def test_package_check_finds_missing_and_hand_installed_packages():
    minbase = ["bash", "base-files", "debianutils", "libc6", "libgcc-s1", "gcc-14-base"]
    ok = package_check(QUERY, [*minbase, "sudo", "curl"], ["sudo", "curl"], [])
    assert ok == ([], [])
    # a package the image should not carry, installed by hand: flagged (its library,
    # marked auto, is not); a reference package absent: flagged
    missing, unlisted = package_check(
        QUERY, [*minbase, "sudo", "nftables"], ["sudo", "curl", "vim"], []
    )
    assert missing == ["vim"] and unlisted == ["nftables"]
    # unless the extras list carries it
    assert package_check(QUERY, ["nftables"], [], ["nftables"]) == ([], [])


def driver(*args):
    return subprocess.run(
        [sys.executable, str(DRIVER), *args],
        cwd=REPO,
        timeout=UP_TIMEOUT_S,
        text=True,
        capture_output=True,
        env={**os.environ, "BOMA_IT_CHECKPOINTS": "0"},  # the image as built, not a restore
    )


@pytest.fixture(scope="module")
def guest():
    """(run_dir, name, ip) of a freshly booted VM (no checkpoint: the image as built)."""
    up = driver("up", "--host", HOST)
    sys.stderr.write(up.stderr[-3000:])
    assert up.returncode == 0, up.stderr[-2000:]
    name, ip = up.stdout.split()[-2:]
    try:
        yield RUN_ROOT / name, name, ip
    finally:
        driver("down", "--run", name)  # its own VM only: other runs may share the host


def guest_run(guest, command):
    run_dir, name, ip = guest
    r = subprocess.run(
        ivm.Guest.ssh_argv(run_dir, name, ip, command), text=True, capture_output=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.vm
def test_installed_packages_are_the_reference(guest):
    missing, unlisted = package_check(
        guest_run(guest, QUERY_PACKAGES),
        guest_run(guest, "apt-mark showmanual").split(),
        ivm.Images.reference_packages(),
        ivm.Images.extra_packages(),
    )
    assert missing == [], f"reference packages not installed: {missing}"
    assert unlisted == [], f"installed by hand, in neither list nor minbase: {unlisted}"
    installed = set(guest_run(guest, "dpkg-query -W -f '${Package}\\n'").split())
    assert not installed & {"docker.io", "docker-cli", "python3-docker", "nftables", "gnupg"}


@pytest.mark.vm
def test_timers_are_on_and_the_disk_booted_its_own_kernel(guest):
    enabled = guest_run(
        guest,
        "systemctl is-enabled apt-daily.timer apt-daily-upgrade.timer unattended-upgrades.service"
        " systemd-timesyncd.service systemd-networkd.service systemd-resolved.service",
    )
    assert enabled.split() == ["enabled"] * 6
    cmdline = guest_run(guest, "cat /proc/cmdline")
    assert cmdline.startswith("BOOT_IMAGE=/vmlinuz"), cmdline  # GRUB put it there
    assert guest_run(guest, "uname -r").strip() in guest_run(guest, "readlink /vmlinuz")


# A kernel package from trixie-backports: newer than the image's, so the guest's own
# update-grub makes it the default entry. Installing it under TCG takes ~6 minutes.
NEW_KERNEL = (
    "echo 'deb http://deb.debian.org/debian trixie-backports main'"
    " | sudo tee /etc/apt/sources.list.d/backports.list >/dev/null"
    " && sudo apt-get update -q >/dev/null"
    " && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t trixie-backports"
    " linux-image-cloud-amd64 >/dev/null"
)
REBOOT_WAIT_S = 600


def wait_for_new_boot(guest, old_boot_id):
    deadline = time.monotonic() + REBOOT_WAIT_S
    run_dir, name, ip = guest
    while time.monotonic() < deadline:
        r = subprocess.run(
            ivm.Guest.ssh_argv(run_dir, name, ip, "cat /proc/sys/kernel/random/boot_id"),
            text=True,
            capture_output=True,
            timeout=60,
        )
        if r.returncode == 0 and r.stdout.strip() not in ("", old_boot_id):
            return
        time.sleep(5)
    pytest.fail(f"no new boot within {REBOOT_WAIT_S}s")


@pytest.mark.vm
@pytest.mark.skipif(os.environ.get("BOMA_IT_E2E_KERNEL", "1") == "0", reason="BOMA_IT_E2E_KERNEL=0")
def test_a_kernel_installed_in_the_guest_is_the_kernel_it_reboots_into(guest):
    before = guest_run(guest, "uname -r").strip()
    boot_id = guest_run(guest, "cat /proc/sys/kernel/random/boot_id").strip()
    run_dir, name, ip = guest
    subprocess.run(ivm.Guest.ssh_argv(run_dir, name, ip, NEW_KERNEL), check=True, timeout=1500)
    newest = guest_run(guest, "readlink /vmlinuz").strip()
    assert before not in newest, newest  # the postinst moved /vmlinuz to the new kernel
    subprocess.run(ivm.Guest.ssh_argv(run_dir, name, ip, "sudo systemctl reboot"), timeout=60)
    wait_for_new_boot(guest, boot_id)
    after = guest_run(guest, "uname -r").strip()
    assert after != before and after in newest, (before, after, newest)
