"""Settings: the SETTINGS table (every BOMA_IT_* variable declared once), its parsing, the
stage bounds.
"""

import dataclasses
import re

import pytest
from conftest import HERE, assert_nothing_created, assert_one_line_error, ivm


def test_stage_bounds_scale_for_tcg_and_env_wins():
    kvm = ivm.Env.stage_bounds("kvm", {})
    tcg = ivm.Env.stage_bounds("tcg", {"BOMA_IT_TIMEOUT_DHCP_LEASE": "7"})
    assert tcg["cloud-init"] == kvm["cloud-init"] * ivm.TCG_SCALE
    assert tcg["virsh"] == kvm["virsh"] and tcg["dhcp-lease"] == 7.0


@pytest.mark.parametrize(
    "var,value",
    [
        ("BOMA_IT_RAM_FLOOR_MIB", "abc"),
        ("BOMA_IT_RAM_FLOOR_MIB", "nan"),
        ("BOMA_IT_RAM_FLOOR_MIB", "-1"),
        ("BOMA_IT_MIN_DISK_MIB", "inf"),
        ("BOMA_IT_TIMEOUT_DHCP_LEASE", "nan"),
        ("BOMA_IT_TIMEOUT_DHCP_LEASE", "inf"),
        ("BOMA_IT_TIMEOUT_APPLY", "-5"),
        ("BOMA_IT_TIMEOUT_LOCK", "abc"),
        ("BOMA_IT_POLL", "0"),
        ("BOMA_IT_POLL", "nan"),
        ("BOMA_IT_SSH_PORT", "99999"),
        ("BOMA_IT_SSH_PORT", "0"),
        ("BOMA_IT_MAX_VMS", "0"),
        ("BOMA_IT_MAX_VMS", "1.5"),
        ("BOMA_IT_CACHE", ""),
        ("BOMA_IT_CACHE", "relative/cache"),
        ("BOMA_IT_DIAG_DIR", ""),
        ("BOMA_IT_CHECKPOINTS", "maybe"),
        ("BOMA_IT_IMAGE_SOURCE", "ftp"),
        # issue 27, class 6: values that parse but cannot work
        ("BOMA_IT_CACHE", "/"),
        ("BOMA_IT_CACHE", "/./"),
        ("BOMA_IT_TIMEOUT_APPLY", "0"),
        ("BOMA_IT_TIMEOUT_LOCK", "0"),
        ("BOMA_IT_MIRROR", "--customize-hook=touch /tmp/x"),
        ("BOMA_IT_MIRROR", "deb.debian.org/debian"),
        ("BOMA_IT_IMAGE_URL", "-o/etc/x"),
    ],
)
def test_bad_environment_values_are_exit_2_naming_the_variable(h, var, value):
    p = h.run("cycle", "--host", "askari", **{var: value})
    assert p.returncode == 2, (p.returncode, p.stderr)
    line = assert_one_line_error(p)
    assert f"{var}=" in line, line
    assert_nothing_created(h)
    assert not (h.tmp / "boma-it").exists() and not (h.tmp / "images").exists()


def test_every_setting_is_declared_once_read_once_and_documented():
    src = (HERE.parent / "scripts" / "integration-vm.py").read_text()
    names = [row[0] for row in ivm.Env.SETTINGS]
    assert len(names) == len(set(names))
    used = set(re.findall(r'"(BOMA_IT_[A-Z_]+[A-Z])"', src))
    assert used <= set(names), used - set(names)
    assert 'environ.get("BOMA_IT' not in src and 'environ["BOMA_IT' not in src
    help_text = ivm.CLI.build_parser().format_help()  # what --help prints, epilog included
    for name in names:
        if not name.startswith("BOMA_IT_TIMEOUT_"):
            assert re.search(rf"^  {name} ", help_text, re.M), name  # a line of its own
    for stage in ivm.DEFAULT_BOUNDS:
        assert re.search(rf"[ ,]{stage}=", help_text), stage  # not split at its hyphen
        assert ivm.Env.stage_bounds("tcg", {ivm.timeout_var(stage): "7"})[stage] == 7.0, stage
    st = ivm.Env.read_settings({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.values = {}
    for dead in (
        "CACHE_DIR",
        "RUN_DIR",
        "DIAG_ROOT",
        "IMAGE_NAME",
        "PLAYBOOK_DIR",
        "PROD_GROUP_VARS",
        "MIN_FREE_MIB",
        "METADATA_KEY",
        "profile_path",
        "remove_checkpoint",
    ):
        assert not hasattr(ivm, dead), dead


@pytest.mark.parametrize("var", ["BOMA_IT_RUN_DIR", "BOMA_IT_DIAG_DIR", "BOMA_IT_CACHE"])
@pytest.mark.parametrize("where", ["file", "below-file"])
def test_a_directory_setting_on_a_regular_file_is_exit_2_creating_nothing(h, var, where):
    f = h.tmp / "a-file"
    f.write_text("")
    value = f if where == "file" else f / "sub" / "dir"
    p = h.run("cycle", "--host", "askari", **{var: str(value)})
    assert p.returncode == 2, (p.returncode, p.stderr)
    line = assert_one_line_error(p)
    assert f"{var}=" in line and "is not a directory" in line, line
    assert_nothing_created(h)
    assert f.read_text() == ""


def test_a_zero_settle_bound_still_means_no_settle():
    assert ivm.Env.stage_bounds("kvm", {"BOMA_IT_TIMEOUT_REBOOT_SETTLE": "0"})["reboot-settle"] == 0
