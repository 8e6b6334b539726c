"""scripts/vault-password.sh (the vault-id `prod` client) and the vault files' contract.

The script is run with a controlled environment: PATH holds only a temp dir with a fake
`rbw` (or none) plus the system tools the script uses, so the real password manager is
never touched.
"""

import os
import pathlib
import re
import shutil
import subprocess

import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "vault-password.sh"
VAULT = REPO / "inventories" / "production" / "group_vars" / "all" / "vault.yml"
TEST_VALUES = REPO / "tests" / "vault" / "test-values.yml"


def tool_dir(tmp_path, rbw_script=None):
    """A PATH dir with bash/head/printf's needs linked in, and optionally a fake rbw."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "head", "env"):
        found = shutil.which(tool)
        assert found, tool
        (bindir / tool).symlink_to(found)
    if rbw_script is not None:
        rbw = bindir / "rbw"
        rbw.write_text("#!" + shutil.which("bash") + "\n" + rbw_script)
        rbw.chmod(0o755)
    return bindir


def run(bindir, **env):
    environ = {"PATH": str(bindir), "HOME": str(bindir.parent)}
    environ.update(env)
    return subprocess.run(
        [str(bindir / "bash"), str(SCRIPT)], env=environ, capture_output=True, text=True, timeout=30
    )


def test_password_file_wins_and_prints_first_line(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret-from-file\nsecond line ignored\n")
    proc = run(tool_dir(tmp_path, rbw_script="echo from-rbw\n"), BOMA_VAULT_PASSWORD_FILE=str(pw))
    assert proc.returncode == 0
    assert proc.stdout == "s3cret-from-file\n"
    assert proc.stderr == ""


def test_unreadable_password_file_is_one_clear_line(tmp_path):
    proc = run(tool_dir(tmp_path), BOMA_VAULT_PASSWORD_FILE=str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert "BOMA_VAULT_PASSWORD_FILE" in proc.stderr and "not a readable file" in proc.stderr


def test_empty_password_file_is_refused(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("")
    proc = run(tool_dir(tmp_path), BOMA_VAULT_PASSWORD_FILE=str(pw))
    assert proc.returncode == 1
    assert "is empty" in proc.stderr


def test_rbw_entry_is_used_without_a_file(tmp_path):
    log = tmp_path / "rbw.argv"
    bindir = tool_dir(tmp_path, rbw_script=f'echo "$*" > {log}\necho s3cret-from-rbw\n')
    proc = run(bindir)
    assert proc.returncode == 0
    assert proc.stdout == "s3cret-from-rbw\n"
    assert log.read_text() == "get boma-ansible-vault\n"


def test_locked_rbw_is_one_clear_line(tmp_path):
    proc = run(tool_dir(tmp_path, rbw_script="echo 'rbw: agent locked' >&2\nexit 1\n"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert "rbw unlock" in proc.stderr


def test_nothing_available_is_one_clear_line(tmp_path):
    proc = run(tool_dir(tmp_path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("vault-password: no vault password")


class _VaultLoader(yaml.SafeLoader):
    """SafeLoader that reads inline `!vault |` values as their ciphertext."""


_VaultLoader.add_constructor(
    "!vault", lambda loader, node: ("!vault", loader.construct_scalar(node))
)


def production_vault():
    return yaml.load(VAULT.read_text(), Loader=_VaultLoader)  # noqa: S506 - SafeLoader subclass


def test_production_vault_values_are_encrypted_for_vault_id_prod():
    vault = production_vault()
    assert vault, "vault.yml holds no variable"
    for name, value in vault.items():
        assert name.startswith("vault_"), name
        assert isinstance(value, tuple) and value[0] == "!vault", (
            f"{name} is not an inline !vault value"
        )
        assert value[1].splitlines()[0] == "$ANSIBLE_VAULT;1.2;AES256;prod", name


def test_test_values_have_exactly_the_production_vault_names():
    assert set(yaml.safe_load(TEST_VALUES.read_text())) == set(production_vault())


def test_test_values_are_plaintext_and_clearly_fake():
    values = yaml.safe_load(TEST_VALUES.read_text())
    assert values, "tests/vault/test-values.yml is empty"
    for name, value in values.items():
        assert name.startswith("vault_"), name
        assert "test" in str(value) and "not-a-real" in str(value), (name, value)


def test_every_vault_variable_in_use_has_a_test_value():
    """Each vault_* referenced by roles or inventories needs a fake twin for the tests."""
    test_values = set(yaml.safe_load(TEST_VALUES.read_text()))
    used = set()
    for base in (REPO / "roles", REPO / "inventories", REPO / "playbooks"):
        for path in base.rglob("*.yml") if base.exists() else ():
            if path == VAULT:
                continue
            used |= set(re.findall(r"\bvault_[a-z0-9_]+\b", path.read_text(errors="replace")))
    assert used, "no vault_* variable referenced anywhere: did the naming change?"
    assert used <= test_values, (
        f"missing from tests/vault/test-values.yml: {sorted(used - test_values)}"
    )


def test_script_is_executable():
    assert os.access(SCRIPT, os.X_OK)
