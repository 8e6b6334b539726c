"""The faithful golden image (issue 10, ADR-028): the package list is Debian's cloud image's
own, nothing a role installs is in it, the timers stay on, and the guest boots its own
disk (GRUB in the MBR, the kernel the guest's packages installed), never a kernel handed
in from outside."""

import pathlib
import re
import struct
import types

import pytest
from conftest import ivm

REPO = pathlib.Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
# What the roles under test install and a provider's image does not have: the image must
# not carry them, or the roles' own installs (and Docker's first start) are never tested.
ROLE_ONLY = {"docker.io", "docker-cli", "python3-docker", "nftables", "gnupg"}


def role_packages():
    """Every package a role installs, read from its defaults (<role>__packages) and from
    the literal `name:` lists of its apt tasks."""
    yaml = pytest.importorskip("yaml")
    found = set()
    for role in ROLES.iterdir():
        if role.name == "integration_test":  # the control node's substrate, not a guest role
            continue
        defaults = role / "defaults" / "main.yml"
        data = yaml.safe_load(defaults.read_text()) if defaults.is_file() else None
        value = (data or {}).get(f"{role.name}__packages")
        if isinstance(value, list):
            found |= set(value)
        elif isinstance(value, str):  # a Jinja expression: its quoted names
            found |= set(re.findall(r"'([a-z0-9][a-z0-9+.-]+)'", value))
        for tasks in (role / "tasks").glob("*.yml"):
            for task in yaml.safe_load(tasks.read_text()) or []:
                names = (task.get("ansible.builtin.apt") or {}).get("name")
                if isinstance(names, list):
                    found |= {n for n in names if "{{" not in n}
    return found


def test_reference_list_parses_and_names_its_source():
    ref = ivm.Images.reference_packages()
    assert len(ref) == len(set(ref)) > 40
    for pkg in (
        "sudo",
        "netplan.io",
        "unattended-upgrades",
        "systemd-timesyncd",
        "openssh-server",
        "cloud-initramfs-growroot",
        "cloud-init",
        "curl",
        "linux-image-cloud-amd64",
        "grub-cloud-amd64",
    ):
        assert pkg in ref
    head = (REPO / ivm.Images.IMAGE_REFERENCE_LIST).read_text()
    assert "config_space/13/package_config" in head and "36cd5fc1" in head


def test_nothing_a_role_installs_is_in_the_image():
    roles = role_packages()
    assert ROLE_ONLY - {"gnupg"} <= roles, roles  # the reader sees the roles' lists
    image = set(ivm.Images.image_packages())
    assert not ROLE_ONLY & image
    # a role may install what the provider ships too (openssh-server, ca-certificates),
    # never what only the image would have added
    assert not (roles - set(ivm.Images.reference_packages())) & image


def test_extras_each_carry_a_reason(tmp_path):
    extras = ivm.Images.extra_packages()
    assert not set(extras) & set(ivm.Images.reference_packages())
    bad = tmp_path / "extras.txt"
    bad.write_text("# header\nqemu-guest-agent\n")
    with pytest.raises(ivm.UsageError, match=r"extras.txt:2: want `package  # reason`"):
        ivm.Images.read_package_list(bad, need_reason=True)
    bad.write_text("Not_A_Package  # why\n")
    with pytest.raises(ivm.UsageError, match="extras.txt:1"):
        ivm.Images.read_package_list(bad, need_reason=True)
    with pytest.raises(ivm.UsageError, match="cannot read"):
        ivm.Images.read_package_list(tmp_path / "missing.txt")


def test_mmdebstrap_installs_exactly_the_list_and_extras_without_recommends():
    a = ivm.Images.mmdebstrap_argv(
        "trixie", "/t/root", "http://m/debian", ivm.Images.image_packages()
    )
    assert "--variant=minbase" in a
    (include,) = [x for x in a if x.startswith("--include=")]
    assert set(include.removeprefix("--include=").split(",")) == set(
        ivm.Images.reference_packages()
    ) | set(ivm.Images.extra_packages())
    assert not any("Recommends" in x for x in a)  # mmdebstrap's default: none
    hooks = [x for x in a if x.startswith("--customize-hook=")]
    assert any("grub-mkimage -O i386-pc" in h for h in hooks)


def test_image_key_follows_the_reference_list(tmp_path, monkeypatch):
    before = ivm.Images.image_key(ivm.Images.image_inputs())
    ref = tmp_path / "ref.txt"
    ref.write_text((REPO / ivm.Images.IMAGE_REFERENCE_LIST).read_text() + "htop\n")
    monkeypatch.setattr(ivm.Images, "IMAGE_REFERENCE_LIST", str(ref))
    assert "htop" in ivm.Images.image_inputs()["packages"]
    assert ivm.Images.image_key(ivm.Images.image_inputs()) != before


def test_timers_and_docker_units_are_left_as_the_packages_enable_them():
    spec = ivm.Images.seal_spec()
    assert spec["remove_globs"] == ["etc/ssh/ssh_host_*", "var/lib/dbus/machine-id"]
    auto = spec["files"]["etc/apt/apt.conf.d/20auto-upgrades"]
    assert 'APT::Periodic::Unattended-Upgrade "1";' in auto
    assert 'APT::Periodic::Update-Package-Lists "1";' in auto
    assert not any("network" in f for f in spec["files"])  # cloud-init's netplan config
    assert spec["files"]["etc/machine-id"] == ""


def test_grub_menu_boots_the_kernel_symlinks():
    cfg = ivm.Images.seal_spec()["files"]["boot/grub/grub.cfg"]
    assert "linux /vmlinuz " + ivm.Images.KERNEL_ARGS in cfg and "initrd /initrd.img" in cfg
    assert "--label root" in cfg


def test_mbr_has_grub_code_and_one_bootable_partition_to_the_end():
    boot = bytes(range(256)) * 2
    disk = 8 << 30
    mbr = ivm.Images.mbr_bytes(boot, disk)
    assert len(mbr) == 512 and mbr[:440] == boot[:440] and mbr[510:] == b"\x55\xaa"
    status, ptype, start, count = struct.unpack("<B3xB3xII", mbr[446:462])
    assert (status, ptype, start) == (0x80, 0x83, 2048)
    assert (start + count) * 512 == disk and mbr[462:510] == bytes(48)
    with pytest.raises(ivm.InfraError, match="boot.img"):
        ivm.Images.mbr_bytes(b"short", disk)


def _fake_root(tmp_path, core=b"core" * 1000):
    grub = tmp_path / "root" / "boot" / "grub" / "i386-pc"
    grub.mkdir(parents=True)
    (grub / "boot.img").write_bytes(b"\xeb\x63" + bytes(510))
    (grub / "core.img").write_bytes(core)
    return tmp_path / "root"


def test_make_disk_embeds_core_img_after_the_mbr(tmp_path, monkeypatch):
    root = _fake_root(tmp_path)
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        if argv[0] == "qemu-img":  # the "conversion" keeps the raw bytes to inspect
            pathlib.Path(argv[-1]).write_bytes(pathlib.Path(argv[-2]).read_bytes())

    monkeypatch.setattr(ivm, "run", fake_run)
    monkeypatch.setattr(ivm.Images, "IMAGE_DISK_SIZE", "4M")
    ctx = types.SimpleNamespace(bounds={"image-build": 10}, cmdlog=None)
    ivm.Images._make_disk(ctx, root, tmp_path)
    assert calls[0][:7] == ["mkfs.ext4", "-q", "-F", "-L", "root", "-E", "offset=1048576"]
    assert calls[0][-1] == "3072k"  # 4 MiB disk − 1 MiB before the partition
    disk = (tmp_path / "disk.qcow2").read_bytes()
    assert len(disk) == 4 << 20 and disk[:2] == b"\xeb\x63" and disk[510:512] == b"\x55\xaa"
    assert disk[512 : 512 + 4000] == b"core" * 1000
    assert not (tmp_path / "disk.raw").exists()


def test_make_disk_refuses_without_grub_boot_code(tmp_path, monkeypatch):
    monkeypatch.setattr(ivm, "run", lambda *a, **k: pytest.fail("no process without boot code"))
    ctx = types.SimpleNamespace(bounds={"image-build": 10}, cmdlog=None)
    with pytest.raises(ivm.InfraError, match="no GRUB boot code"):
        ivm.Images._make_disk(ctx, tmp_path / "empty-root", tmp_path)
    root = _fake_root(tmp_path, core=bytes(ivm.Images.PARTITION_OFFSET))
    with pytest.raises(ivm.InfraError, match="does not fit"):
        ivm.Images._make_disk(ctx, root, tmp_path)
