"""Image: the golden image recipe, its key, build, seal, fetch and checksum."""

import json

import pytest
from conftest import assert_one_line_error, ivm


def test_second_cycle_reuses_cached_image(h):
    assert h.run("cycle", "--host", "askari").returncode == 0
    assert len(h.calls("mmdebstrap")) == 1
    p = h.run("cycle", "--host", "askari")
    assert p.returncode == 0, p.stderr
    assert len(h.calls("mmdebstrap")) == 1
    assert len(list((h.cache / "images").iterdir())) == 1  # one key dir, no leftovers
    assert not list((h.cache / "images").glob(".tmp-*"))


def _fetch_env(h, payload, sums):
    src = h.tmp / "mirror"
    src.mkdir(exist_ok=True)
    (src / "debian-13-genericcloud-amd64.qcow2").write_bytes(payload)
    (src / "SHA512SUMS").write_text(sums)
    return {
        "BOMA_IT_IMAGE_SOURCE": "fetch",
        "BOMA_IT_IMAGE_URL": (src / "debian-13-genericcloud-amd64.qcow2").as_uri(),
        "BOMA_IT_SHA_URL": (src / "SHA512SUMS").as_uri(),
    }


def test_fetch_source_verifies_sha512(h):
    import hashlib

    payload = b"qcow2 bytes"
    good = hashlib.sha512(payload).hexdigest() + "  debian-13-genericcloud-amd64.qcow2\n"
    p = h.run("image", **_fetch_env(h, payload, good))
    assert p.returncode == 0, p.stderr
    (img,) = [d for d in (h.cache / "images").iterdir() if d.is_dir()]
    assert (img / "disk.qcow2").read_bytes() == payload and not list(img.glob("*.part"))
    assert not h.calls()  # the fetch source runs no tools


def test_fetch_source_refuses_a_mismatch_and_deletes_it(h):
    bad = "00" * 64 + "  debian-13-genericcloud-amd64.qcow2\n"
    p = h.run("image", **_fetch_env(h, b"tampered", bad))
    assert p.returncode == 3
    assert "SHA512 mismatch" in assert_one_line_error(p)
    assert not [d for d in (h.cache / "images").rglob("*") if d.is_file()]
    missing = h.run("image", **_fetch_env(h, b"x", "abc  other-file.qcow2\n"))
    assert missing.returncode == 3 and "checksum for debian-13" in missing.stderr


def test_image_build_seals_and_is_keyed(h):
    p = h.run("image")
    assert p.returncode == 0, p.stderr
    (img,) = [d for d in (h.cache / "images").iterdir() if d.is_dir()]
    assert {f.name for f in img.iterdir()} == {
        "disk.qcow2",
        "vmlinuz",
        "initrd.img",
        "manifest.json",
        "build.log",
    }
    m = json.loads((img / "manifest.json").read_text())
    assert m["key"] == img.name and "docker.io" not in m["inputs"]["packages"]
    mk = h.calls("mmdebstrap")[0]["argv"]
    assert mk[-3:-1] == ["trixie", mk[-2]] and mk[-1] == "http://deb.debian.org/debian"
    again = h.run("image")
    assert "cached" in again.stdout and len(h.calls("mmdebstrap")) == 1
    other = h.run("image", BOMA_IT_MIRROR="http://mirror.invalid/debian")
    assert other.returncode == 0 and len(h.calls("mmdebstrap")) == 2
    assert len([d for d in (h.cache / "images").iterdir() if d.is_dir()]) == 2


def test_seal_spec_contents():
    s = ivm.Images.seal_spec()
    f = s["files"]
    assert f["etc/machine-id"] == ""
    assert f["etc/fstab"] == "LABEL=root / ext4 defaults 0 1\n"
    cfg = f["etc/cloud/cloud.cfg.d/90-boma.cfg"]
    assert "datasource_list: [NoCloud, None]" in cfg
    assert "etc/ssh/ssh_host_*" in s["remove_globs"]
    links = s["symlinks"]
    assert links["etc/systemd/system/multi-user.target.wants/systemd-networkd.service"].endswith(
        "/systemd-networkd.service"
    )
    assert "etc/systemd/system/multi-user.target.wants/systemd-resolved.service" in links


def test_image_key_does_not_depend_on_the_order_inputs_were_written_in():
    inputs = ivm.Images.image_inputs()
    backwards = dict(reversed(inputs.items()))
    backwards["seal"] = dict(reversed(inputs["seal"].items()))
    assert ivm.Images.image_key(backwards) == ivm.Images.image_key(inputs)
    assert len(ivm.Images.image_key(inputs)) == 16


@pytest.mark.parametrize(
    "mutate",
    [
        lambda i: i.update(suite="forky"),
        lambda i: i.update(mirror="http://mirror.example/debian"),
        lambda i: i.update(packages=i["packages"] + ["vim"]),
        lambda i: i["seal"]["files"].update({"etc/fstab": "x"}),
        lambda i: i["seal"]["symlinks"].pop("etc/resolv.conf"),
        lambda i: i.update(recipe_version=i["recipe_version"] + 1),
        lambda i: i.update(disk_size="16G"),
        lambda i: i.update(kernel_args="quiet"),
    ],
)
def test_image_key_changes_with_each_input(mutate):
    inputs = ivm.Images.image_inputs()
    before = ivm.Images.image_key(inputs)
    mutate(inputs)
    assert ivm.Images.image_key(inputs) != before


def test_fetch_key_differs_from_build_key():
    assert ivm.Images.image_key(ivm.Images.fetch_inputs()) != ivm.Images.image_key(
        ivm.Images.image_inputs()
    )


def test_image_build_argv():
    a = ivm.Images.mmdebstrap_argv("trixie", "/t/root", "http://deb.debian.org/debian", ["a", "b"])
    assert a[0] == "mmdebstrap" and "--variant=minbase" in a and "--include=a,b" in a
    assert a[-3:] == ["trixie", "/t/root", "http://deb.debian.org/debian"]
    assert ivm.Images.mkfs_argv("/t/root", "/t/disk.raw", 8 << 30) == [
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        "root",
        "-E",
        "offset=1048576",
        "-d",
        "/t/root",
        "/t/disk.raw",
        f"{(8 << 20) - 1024}k",
    ]
    assert ivm.Images.qemu_img_convert_argv("/t/r", "/t/q") == [
        "qemu-img",
        "convert",
        "-O",
        "qcow2",
        "/t/r",
        "/t/q",
    ]


def test_size_bytes():
    assert ivm.Images.size_bytes("8G") == 8 * 1024**3 and ivm.Images.size_bytes("512") == 512
    with pytest.raises(ValueError):
        ivm.Images.size_bytes("8 GB")


def test_find_boot_file_resolves_symlink_inside_root(tmp_path):
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "vmlinuz-6.12.9-cloud-amd64").write_text("new")
    (tmp_path / "boot" / "vmlinuz-6.12.10-cloud-amd64").write_text("newer")
    assert (
        ivm.Images.find_boot_file(tmp_path, "vmlinuz", "vmlinuz").name
        == "vmlinuz-6.12.10-cloud-amd64"
    )
    (tmp_path / "vmlinuz").symlink_to("/boot/vmlinuz-6.12.9-cloud-amd64")  # absolute: re-rooted
    assert (
        ivm.Images.find_boot_file(tmp_path, "vmlinuz", "vmlinuz")
        == tmp_path / "boot" / "vmlinuz-6.12.9-cloud-amd64"
    )
    assert ivm.Images.find_boot_file(tmp_path, "initrd.img", "initrd.img") is None


def test_apply_seal(tmp_path):
    (tmp_path / "etc" / "ssh").mkdir(parents=True)
    (tmp_path / "etc" / "ssh" / "ssh_host_rsa_key").write_text("k")
    (tmp_path / "etc" / "ssh" / "sshd_config").write_text("c")
    (tmp_path / "etc" / "machine-id").write_text("abc\n")
    (tmp_path / "etc" / "resolv.conf").write_text("nameserver 1.1.1.1\n")
    ivm.Images.apply_seal(tmp_path, ivm.Images.seal_spec())
    assert not (tmp_path / "etc" / "ssh" / "ssh_host_rsa_key").exists()
    assert (tmp_path / "etc" / "ssh" / "sshd_config").exists()
    assert (tmp_path / "etc" / "machine-id").read_text() == ""
    assert (tmp_path / "etc" / "resolv.conf").is_symlink()
    assert (tmp_path / "etc" / "apt" / "apt.conf.d" / "20auto-upgrades").is_file()
    ivm.Images.apply_seal(tmp_path, ivm.Images.seal_spec())  # idempotent


def test_expected_sha():
    text = "abc123  debian-13-genericcloud-amd64.qcow2\ndef456 *other.raw\nbad line here x\n"
    assert ivm.Images._expected_sha(text, "debian-13-genericcloud-amd64.qcow2") == "abc123"
    assert ivm.Images._expected_sha(text, "other.raw") == "def456"
    assert ivm.Images._expected_sha(text, "missing.qcow2") is None


def test_cloud_cfg_is_valid_yaml():
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load(ivm.Images.CLOUD_CFG)
    assert cfg == {"datasource_list": ["NoCloud", "None"]}  # network, growpart: cloud-init's


def test_the_download_bound_covers_the_whole_transfer(h, monkeypatch, tmp_path):
    src = tmp_path / "big"
    src.write_bytes(b"x" * (3 << 20))  # three reads
    clock = iter(range(100))
    monkeypatch.setattr(ivm.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(ivm.InfraError) as e:
        ivm.Images._download(src.as_uri(), tmp_path / "out", deadline=2.5, bound=2.5)
    assert "exceeded BOMA_IT_TIMEOUT_DOWNLOAD" in str(e.value)
    monkeypatch.undo()
    # ... and the driver passes BOMA_IT_TIMEOUT_DOWNLOAD to it
    import hashlib

    env = _fetch_env(
        h, b"q", hashlib.sha512(b"q").hexdigest() + "  debian-13-genericcloud-amd64.qcow2\n"
    )
    p = h.run("image", BOMA_IT_TIMEOUT_DOWNLOAD="0.000001", **env)
    assert p.returncode == 3 and "BOMA_IT_TIMEOUT_DOWNLOAD" in assert_one_line_error(p)
    assert not [f for f in (h.cache / "images").rglob("*") if f.is_file()]
