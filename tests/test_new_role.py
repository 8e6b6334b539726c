"""scripts/new-role.py: `make new-role NAME=x` scaffolds a role in house style."""

import pathlib

import pytest
import yaml
from conftest import load_script

REPO = pathlib.Path(__file__).resolve().parent.parent
new_role = load_script("new-role.py", "new_role")

EXPECTED_FILES = {
    "defaults/main.yml",
    "meta/main.yml",
    "meta/argument_specs.yml",
    "tasks/main.yml",
    "handlers/main.yml",
    "README.md",
    "molecule/default/molecule.yml",
    "molecule/default/converge.yml",
    "molecule/default/verify.yml",
}


# Python type of a default -> argument_specs `type`.
SPEC_TYPES = {bool: "bool", int: "int", str: "str", list: "list", dict: "dict"}


@pytest.fixture
def scaffold(tmp_path):
    """Scaffold `tmp_probe` into a temp roles dir; return (role dir, exit code)."""
    roles = tmp_path / "roles"
    rc = new_role.main(["--roles-dir", str(roles), "tmp_probe"])
    return roles / "tmp_probe", rc


def _load(path):
    return yaml.safe_load(path.read_text())


def test_scaffold_writes_every_file(scaffold):
    role, rc = scaffold
    assert rc == 0
    written = {str(p.relative_to(role)) for p in role.rglob("*") if p.is_file()}
    assert written == EXPECTED_FILES


def test_scaffold_leaves_no_temp_dir(scaffold):
    role, _ = scaffold
    assert [p.name for p in role.parent.iterdir()] == ["tmp_probe"]


def test_every_yaml_file_parses(scaffold):
    role, _ = scaffold
    for rel in EXPECTED_FILES - {"README.md"}:
        text = (role / rel).read_text()
        assert text.startswith("---\n"), rel
        yaml.safe_load(text)


def test_defaults_hold_the_documented_example_var(scaffold):
    role, _ = scaffold
    text = (role / "defaults/main.yml").read_text()
    assert _load(role / "defaults/main.yml") == {"tmp_probe__enabled": True}
    # the input carries a comment on the line(s) above it
    before = text.split("tmp_probe__enabled:")[0].rstrip().splitlines()
    assert before[-1].startswith("#")


def test_argument_specs_mirror_defaults(scaffold):
    role, _ = scaffold
    defaults = _load(role / "defaults/main.yml")
    options = _load(role / "meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    assert set(options) == set(defaults)
    for name, value in defaults.items():
        assert options[name]["default"] == value
        assert options[name]["type"] == SPEC_TYPES[type(value)]
        assert options[name]["description"]


def test_every_input_is_prefixed_with_the_role_name(scaffold):
    role, _ = scaffold
    assert all(k.startswith("tmp_probe__") for k in _load(role / "defaults/main.yml"))


def test_meta_names_the_role(scaffold):
    role, _ = scaffold
    info = _load(role / "meta/main.yml")["galaxy_info"]
    assert info["role_name"] == "tmp_probe"
    assert info["namespace"] == "boma"
    assert isinstance(info["min_ansible_version"], str)


def test_tasks_and_handlers_are_lists(scaffold):
    role, _ = scaffold
    tasks = _load(role / "tasks/main.yml")
    assert isinstance(tasks, list) and tasks
    assert all(t["name"][0].isupper() for t in tasks)
    assert all(any(k.startswith("ansible.builtin.") for k in t) for t in tasks)
    assert _load(role / "handlers/main.yml") == []


def test_readme_has_the_house_sections(scaffold):
    role, _ = scaffold
    readme = (role / "README.md").read_text()
    for heading in ("# tmp_probe", "## Requirements", "## Role Variables", "## Example Playbook"):
        assert f"\n{heading}\n" in "\n" + readme
    assert "`tmp_probe__enabled`" in readme
    assert "- role: tmp_probe" in readme


def test_molecule_platform_is_bases_with_a_unique_name(scaffold):
    role, _ = scaffold
    mine = _load(role / "molecule/default/molecule.yml")
    base = _load(REPO / "roles/base/molecule/default/molecule.yml")
    (platform,) = mine["platforms"]
    (base_platform,) = base["platforms"]
    assert platform["name"] == "tmp-probe-debian13"
    assert {k: v for k, v in platform.items() if k != "name"} == {
        k: v for k, v in base_platform.items() if k != "name"
    }
    assert mine["driver"] == base["driver"]
    assert mine["scenario"] == base["scenario"]
    assert mine["ansible"] == base["ansible"]


def test_platform_names_differ_from_every_existing_role():
    existing = set()
    for f in (REPO / "roles").glob("*/molecule/*/molecule.yml"):
        existing |= {p["name"] for p in _load(f)["platforms"]}
    assert new_role.platform_name("tmp_probe") not in existing
    assert new_role.platform_name("base") == "base-debian13"


def test_converge_applies_the_role(scaffold):
    role, _ = scaffold
    (play,) = _load(role / "molecule/default/converge.yml")
    assert play["roles"][0]["role"] == "tmp_probe"
    (verify,) = _load(role / "molecule/default/verify.yml")
    assert any("ansible.builtin.assert" in t for t in verify["tasks"])


@pytest.mark.parametrize("bad", ["", "Bad", "9lives", "_x", "with-dash", "a b", "x.y", "é"])
def test_invalid_names_exit_2_with_one_line(tmp_path, capsys, bad):
    roles = tmp_path / "roles"
    assert new_role.main(["--roles-dir", str(roles), bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid role name" in err
    assert not roles.exists() or not any(roles.iterdir())


def test_existing_role_exits_2_and_is_left_alone(tmp_path, capsys):
    roles = tmp_path / "roles"
    (roles / "base").mkdir(parents=True)
    (roles / "base" / "keep.txt").write_text("mine")
    assert new_role.main(["--roles-dir", str(roles), "base"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert [p.name for p in (roles / "base").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in roles.iterdir()) == ["base"]


def test_scaffold_files_is_pure_and_names_the_role():
    files = new_role.scaffold_files("web_cache")
    assert set(files) == EXPECTED_FILES
    assert all("tmp_probe" not in text for text in files.values())
    assert "web_cache__enabled: true" in files["defaults/main.yml"]


def test_default_roles_dir_is_the_repos():
    assert new_role.ROLES_DIR == REPO / "roles"
