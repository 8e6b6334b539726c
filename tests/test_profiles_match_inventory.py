"""The integration profiles and the production inventory cannot drift apart (issue 29, 25).

- a host profile's `groups` are exactly that host's groups in the production inventory;
- an overlay of a host profile sets only the closed list in
  tests/integration/overrides/allowed-stubs.yml (what a VM cannot have, each with why); one
  that sets a variable production also sets is named with the production file. RED profiles
  (`<host>-regression`, extending the host's profile) are the declared exception.
"""

import json
import pathlib

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
PRODUCTION = REPO / "inventories" / "production"
INTEGRATION = REPO / "tests" / "integration"
PROFILES = INTEGRATION / "profiles"
ALLOWED = INTEGRATION / "overrides" / "allowed-stubs.yml"


class _VaultLoader(yaml.SafeLoader):
    """safe_load that reads `!vault` values as opaque strings (vault.yml is never decrypted)."""


_VaultLoader.add_constructor("!vault", lambda loader, node: "<vault>")


def load_yaml(path):
    return yaml.load(path.read_text(), Loader=_VaultLoader) or {}


def inventory_hosts(hosts_file=PRODUCTION / "hosts.yml"):
    """{host: {"groups": set, "vars": {name: value}}} from a YAML inventory's nested groups."""
    hosts = {}

    def walk(name, group, parents):
        group = group or {}
        lineage = parents | ({name} if name != "all" else set())
        for host, host_vars in (group.get("hosts") or {}).items():
            entry = hosts.setdefault(host, {"groups": set(), "vars": {}})
            entry["groups"] |= lineage
            entry["vars"].update(host_vars or {})
        for child, body in (group.get("children") or {}).items():
            walk(child, body, lineage)

    for name, group in load_yaml(hosts_file).items():
        walk(name, group, set())
    return hosts


def production_settings(host):
    """{variable: the production file that sets it} for one host (host vars + its group_vars)."""
    entry = inventory_hosts()[host]
    where = {name: PRODUCTION / "hosts.yml" for name in entry["vars"]}
    for group in sorted(entry["groups"] | {"all"}):
        group_dir = PRODUCTION / "group_vars" / group
        files = sorted(group_dir.glob("*.yml")) if group_dir.is_dir() else []
        for path in files + [PRODUCTION / "group_vars" / f"{group}.yml"]:
            if path.is_file():
                where.update({name: path for name in load_yaml(path)})
    return where


def profile(name):
    return json.loads((PROFILES / f"{name}.json").read_text())


def host_profiles():
    """Profiles named after a production host (not RED variants)."""
    hosts = inventory_hosts()
    return sorted(p.stem for p in PROFILES.glob("*.json") if p.stem in hosts)


def overlay_violations(profile_name, allowed):
    """A line for each overlay variable outside the allow-list, naming the production file
    that sets it when production does (the drift that matters most)."""
    settings = production_settings(profile_name)
    found = []
    for rel in profile(profile_name).get("extra_vars_files", []):
        for name in load_yaml(INTEGRATION / rel):
            if name in allowed:
                continue
            where = (
                f"which production sets in {settings[name].relative_to(REPO)}"
                if name in settings
                else "which is not on the list"
            )
            found.append(
                f"{rel} sets {name}, {where}: an overlay stubs only what a VM cannot have"
                f" ({ALLOWED.relative_to(REPO)})"
            )
    return found


def test_every_profile_is_a_host_or_a_red_variant_of_one():
    hosts = inventory_hosts()
    for path in PROFILES.glob("*.json"):
        if path.stem in hosts:
            continue
        base = path.stem.removesuffix("-regression")
        assert path.stem.endswith("-regression") and profile(path.stem).get("extends") == base, (
            f"{path.name}: neither a production host nor a RED variant"
            " `<host>-regression` extending it"
        )


@pytest.mark.parametrize("name", host_profiles())
def test_profile_groups_are_the_hosts_production_groups(name):
    want = inventory_hosts()[name]["groups"]
    got = set(profile(name)["groups"])
    assert got == want, (
        f"profiles/{name}.json groups {sorted(got)} differ from {name}'s groups in"
        f" inventories/production/hosts.yml {sorted(want)}"
    )


@pytest.mark.parametrize("name", host_profiles())
def test_overlays_stub_only_what_a_vm_cannot_have(name):
    assert overlay_violations(name, set(load_yaml(ALLOWED))) == []


def test_an_overlay_flipping_a_production_setting_is_named(tmp_path, monkeypatch):
    """RED for the check itself: the askari overlay as it was before issue 29."""
    old = tmp_path / "overrides" / "askari.yml"
    old.parent.mkdir()
    old.write_text("base__firewall_apply: true\nbase__mesh_enabled: false\n")
    monkeypatch.setattr(__import__(__name__), "INTEGRATION", tmp_path)
    found = overlay_violations("askari", set(load_yaml(ALLOWED)))
    assert found == [
        "overrides/askari.yml sets base__firewall_apply, which production sets in"
        " inventories/production/group_vars/offsite_hosts/vars.yml: an overlay stubs only what"
        " a VM cannot have (tests/integration/overrides/allowed-stubs.yml)"
    ]


def test_an_overlay_variable_off_the_list_is_named(tmp_path, monkeypatch):
    (tmp_path / "overrides").mkdir()
    (tmp_path / "overrides" / "askari.yml").write_text("docker_host__forward_dropin: false\n")
    monkeypatch.setattr(__import__(__name__), "INTEGRATION", tmp_path)
    assert overlay_violations("askari", set(load_yaml(ALLOWED))) == [
        "overrides/askari.yml sets docker_host__forward_dropin, which is not on the list: an"
        " overlay stubs only what a VM cannot have (tests/integration/overrides/allowed-stubs.yml)"
    ]


def test_the_allow_list_gives_a_reason_for_each_variable():
    for name, why in load_yaml(ALLOWED).items():
        assert isinstance(why, str) and len(why.split()) >= 5, (
            f"allowed-stubs.yml: {name} needs its why"
        )
