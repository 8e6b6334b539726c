"""Profile: a host's profile files, merged, type-checked, paths confined to the repository;
the cert tiers and the extra vars they lead to.
"""

import json

import pytest
from conftest import ASKARI, assert_nothing_created, assert_one_line_error, ivm

BASE = {
    "groups": ["offsite_hosts"],
    "applies": [{"playbook": "site.yml", "tags": ["base"]}],
    "extra_vars_files": ["overrides/a.yml"],
    "mem_mib": 2048,
    "vcpus": 2,
}


def test_each_cert_tier_has_its_vars_file_and_each_file_is_a_tier():
    certs = ivm.INTEG_DIR / "certs"
    assert {p.name for p in certs.glob("*.yml")} == {f"{t}.yml" for t in ivm.VALID_TIERS}


def test_extra_vars_order(tmp_path):
    (tmp_path / "certs").mkdir()
    vault = tmp_path / "vault.yml"
    prof = {"extra_vars_files": ["overrides/a.yml", "overrides/b.yml"]}
    files = ivm.Profiles.extra_vars_files(prof, "le-staging", tmp_path, vault)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "overrides/a.yml",
        "overrides/b.yml",
        "certs/le-staging.yml",
    ]
    vault.write_text("x: 1\n")
    assert ivm.Profiles.extra_vars_files(prof, "internal", tmp_path, vault)[-1] == vault


@pytest.mark.parametrize("tier", ["le-staging", "le-prod-wildcard"])
def test_real_secret_tiers_never_get_the_fake_vault_values(tmp_path, tier):
    # Their Caddy needs the real Gandi token: the production vault is loaded instead.
    vault = tmp_path / "vault.yml"
    vault.write_text("x: 1\n")
    files = ivm.Profiles.extra_vars_files({"extra_vars_files": []}, tier, tmp_path, vault)
    assert vault not in files and files[-1].name == f"{tier}.yml"
    assert tier in ivm.REAL_SECRET_TIERS and "internal" not in ivm.REAL_SECRET_TIERS


def _profiles(tmp_path, **files):
    (tmp_path / "tests" / "integration" / "profiles").mkdir(parents=True, exist_ok=True)
    (tmp_path / "tests" / "integration" / "overrides").mkdir(exist_ok=True)
    (tmp_path / "playbooks").mkdir(exist_ok=True)
    for pb in ("site.yml", "offsite.yml"):
        (tmp_path / "playbooks" / pb).write_text("---\n")
    for f in ("a.yml", "a-reg.yml"):
        (tmp_path / "tests" / "integration" / "overrides" / f).write_text("---\n")
    (tmp_path / "tests" / "integration" / "verify.yml").write_text("---\n")
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2)
        (tmp_path / "tests" / "integration" / "profiles" / f"{name}.json").write_text(text)
    return lambda host: ivm.Profiles.load_profile(
        host, tmp_path / "tests" / "integration" / "profiles", tmp_path
    )


def test_load_profile_defaults(tmp_path):
    p = _profiles(tmp_path, askari={"groups": ["g"], "applies": [{"playbook": "site.yml"}]})(
        "askari"
    )
    assert p["mem_mib"] == ivm.DEFAULT_MEM_MIB and p["vcpus"] == ivm.DEFAULT_VCPUS
    assert p["reboot"] == ["graceful"] and p["verify"] == "tests/integration/verify.yml"
    assert p["extra_vars_files"] == [] and p["name"] == "askari"


def test_load_profile_extends_appends_extra_vars_and_replaces_lists(tmp_path):
    load = _profiles(
        tmp_path,
        askari=BASE,
        **{
            "askari-regression": {
                "extends": "askari",
                "extra_vars_files": ["overrides/a-reg.yml"],
                "groups": ["x", "y"],
                "reboot": ["graceful", "hard"],
                "_comment": "ignored",
            }
        },
    )
    p = load("askari-regression")
    assert p["extra_vars_files"] == ["overrides/a.yml", "overrides/a-reg.yml"]
    assert p["groups"] == ["x", "y"] and p["applies"] == BASE["applies"]
    assert p["reboot"] == ["graceful", "hard"] and "extends" not in p
    assert p["name"] == "askari-regression"


@pytest.mark.parametrize(
    "files,host,needle",
    [
        ({}, "ghost", "no profile tests/integration/profiles/ghost.json (known: none)"),
        ({"a": BASE}, "ghost", "(known: a)"),
        ({"a": '{\n  "groups": ["x"],\n  "applies": [\n}'}, "a", "invalid JSON at line 4"),
        ({"a": "[1, 2]"}, "a", "top level must be a JSON object"),
        ({"a": {"groups": ["x"]}}, "a", "missing required key 'applies'"),
        ({"a": {**BASE, "vcpus": "2"}}, "a", "key 'vcpus' must be int, got str"),
        ({"a": {**BASE, "vcpus": True}}, "a", "key 'vcpus' must be int, got bool"),
        ({"a": {**BASE, "groups": "offsite_hosts"}}, "a", "key 'groups' must be list"),
        ({"a": {**BASE, "groups": ["bad-group"]}}, "a", "invalid group name"),
        ({"a": {**BASE, "applies": [{"tags": ["x"]}]}}, "a", "'applies[0].playbook' missing"),
        (
            {"a": {**BASE, "applies": [{"playbook": "site.yml", "tags": "base"}]}},
            "a",
            "applies[0].tags",
        ),
        (
            {"a": {**BASE, "applies": [{"playbook": "site.yml", "tgas": []}]}},
            "a",
            "unknown keys ['tgas']",
        ),
        (
            {"a": {**BASE, "applies": [{"playbook": "nope.yml"}]}},
            "a",
            "playbooks/nope.yml, which does not exist",
        ),
        (
            {"a": {**BASE, "extra_vars_files": ["overrides/nope.yml"]}},
            "a",
            "tests/integration/overrides/nope.yml",
        ),
        (
            {"a": {**BASE, "applies": [{"playbook": "site.yml", "extra_vars_files": "x.yml"}]}},
            "a",
            "'applies[0].extra_vars_files' must be a list of non-empty strings",
        ),
        (
            {
                "a": {
                    **BASE,
                    "applies": [
                        {"playbook": "site.yml", "extra_vars_files": ["overrides/nope.yml"]}
                    ],
                }
            },
            "a",
            "tests/integration/overrides/nope.yml, which does not exist",
        ),
        (
            {"a": {**BASE, "verify": "tests/nope.yml"}},
            "a",
            "verify playbook tests/nope.yml does not exist",
        ),
        (
            {"a": {**BASE, "reboot": ["soft"]}},
            "a",
            "key 'reboot' entries must be one of graceful, hard",
        ),
        ({"a": {**BASE, "mem_mib": 64}}, "a", "key 'mem_mib' must be >= 512"),
        (
            {"a": {**BASE, "reboot_settled_when": "true\nreboot"}},
            "a",
            "key 'reboot_settled_when' must be one line of shell, 1-500 printable characters",
        ),
        ({"a": {**BASE, "reboot_settled_when": ""}}, "a", "key 'reboot_settled_when' must be"),
        ({"a": {**BASE, "memory": 1}}, "a", "unknown key 'memory'"),
        ({"a": {"extends": "b"}, "b": {"extends": "a"}}, "a", "'extends' cycle (a -> b -> a)"),
        ({"a": {"extends": "ghost"}}, "a", "key 'extends' names 'ghost'"),
        ({"a": BASE}, "../etc/passwd", "invalid host name"),
    ],
)
def test_load_profile_errors_name_file_and_key(tmp_path, files, host, needle):
    load = _profiles(tmp_path, **files)
    with pytest.raises(ivm.UsageError) as e:
        load(host)
    assert needle in str(e.value)
    assert e.value.exit_code == 2


def test_bad_profile_type_error_names_the_file_that_set_it(tmp_path):
    load = _profiles(tmp_path, a=BASE, b={"extends": "a", "vcpus": "many"})
    with pytest.raises(ivm.UsageError) as e:
        load("b")
    assert "profiles/b.json" in str(e.value)


def test_merge_profiles_is_shallow():
    m = ivm.Profiles.merge_profiles(
        {"groups": ["a"], "extra_vars_files": ["x"], "mem_mib": 1},
        {"groups": ["b"], "extra_vars_files": ["y"], "extends": "p"},
    )
    assert m == {"groups": ["b"], "extra_vars_files": ["x", "y"], "mem_mib": 1}


def test_repo_profiles_load():
    """The profiles other engineers commit must pass the driver's validation."""
    for p in sorted(ivm.PROFILE_DIR.glob("*.json")):
        prof = ivm.Profiles.load_profile(p.stem)
        assert prof["groups"] and prof["applies"]


def test_load_profile_checks_tolerance_and_reboot_list(tmp_path):
    _write_profile_repo(
        tmp_path,
        {
            "a": {
                "groups": ["g"],
                "applies": [{"playbook": "site.yml"}],
                "reboot": ["graceful", "hard"],
                "reboot_diff_tolerate": {"sockets": ["dhclient"]},
            },
            "b": {"extends": "a", "reboot_diff_tolerate": {"x": []}},
        },
    )
    prof = ivm.Profiles.load_profile("a", tmp_path / "tests/integration/profiles", tmp_path)
    assert prof["reboot"] == ["graceful", "hard"]
    assert prof["reboot_diff_tolerate"] == {"sockets": ["dhclient"]}
    with pytest.raises(ivm.UsageError) as e:
        ivm.Profiles.load_profile("b", tmp_path / "tests/integration/profiles", tmp_path)
    assert "b.json: key 'reboot_diff_tolerate' has unknown categories" in str(e.value)


def _write_profile_repo(root, profiles):
    pdir = root / "tests" / "integration" / "profiles"
    pdir.mkdir(parents=True)
    (root / "tests" / "integration" / "verify.yml").write_text("---\n")
    (root / "playbooks").mkdir()
    (root / "playbooks" / "site.yml").write_text("---\n")
    for name, data in profiles.items():
        (pdir / f"{name}.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "setup,needle",
    [
        ({"extra_vars_files": ["/etc/passwd"]}, "key 'extra_vars_files' names '/etc/passwd'"),
        ({"extra_vars_files": ["../../../../../../../../etc/passwd"]}, "resolves outside"),
        (
            {"extra_vars_files": ["overrides/link.yml"]},
            "key 'extra_vars_files' names 'overrides/link.yml'",
        ),
        ({"applies": [{"playbook": "../../../../../../../../etc/passwd"}]}, "applies[0].playbook"),
        ({"applies": [{"playbook": "link.yml"}]}, "applies[0].playbook"),
        ({"verify": "/etc/passwd"}, "key 'verify' names '/etc/passwd'"),
        ("extends-link", "resolves outside"),
        ({"extends": "../../../x"}, "key 'extends' must name a profile"),
    ],
)
def test_profile_paths_must_resolve_inside_the_repository(h, setup, needle):
    integ = h.repo / "tests" / "integration"
    outside = h.tmp / "outside.yml"
    outside.write_text("---\nsecret: 1\n")
    (integ / "overrides" / "link.yml").symlink_to(outside)
    (h.repo / "playbooks" / "link.yml").symlink_to(outside)
    if setup == "extends-link":
        (h.tmp / "evil.json").write_text(json.dumps(ASKARI))
        (integ / "profiles" / "evil.json").symlink_to(h.tmp / "evil.json")
        setup = {"extends": "evil", "groups": ASKARI["groups"]}
    (integ / "profiles" / "hostile.json").write_text(json.dumps({**ASKARI, **setup}))
    p = h.run("cycle", "--host", "hostile")
    assert p.returncode == 2, p.stderr
    assert needle in assert_one_line_error(p)
    assert_nothing_created(h)
    assert not h.calls("ansible-playbook")


@pytest.mark.parametrize(
    "content,needle",
    [
        (b'{"groups": ["a"], "applies": [], "mem_mib": ' + b"9" * 4300 + b"}", "'mem_mib' must be"),
        (b'{"groups": ["a"], "applies": [], "vcpus": ' + b"9" * 5000 + b"}", "invalid JSON"),
        (b"[" * 100000 + b"]" * 100000, "invalid JSON"),
        ('{"groups": ["a"], "description": "café"}'.encode("latin-1"), "not UTF-8"),
    ],
)
def test_hostile_profile_json_is_exit_2_one_line(h, content, needle):
    (h.repo / "tests" / "integration" / "profiles" / "broken.json").write_bytes(content)
    p = h.run("cycle", "--host", "broken")
    assert p.returncode == 2, p.stderr
    assert needle in assert_one_line_error(p)
    assert_nothing_created(h)


def test_a_profile_names_its_verify_and_its_red_inherits_it():
    # askari keeps the default verify; the control node has its own (ADR-031).
    assert ivm.Profiles.load_profile("askari")["verify"] == "tests/integration/verify.yml"
    for host in ("ubongo", "ubongo-regression"):
        prof = ivm.Profiles.load_profile(host)
        assert prof["verify"] == "tests/integration/verify-ubongo.yml", host
        assert prof["groups"] == ["control"] and prof["reboot"] == ["graceful", "hard"]
        assert [a["playbook"] for a in prof["applies"][:2]] == ["site.yml", "workstation.yml"]
    red = ivm.Profiles.load_profile("ubongo-regression")
    assert red["extra_vars_files"] == ["overrides/ubongo.yml"] and red["root"] == "ubongo"
    # The GREEN's applies, then the drop-in's switch on a third apply only (ADR-031).
    assert red["applies"][:2] == ivm.Profiles.load_profile("ubongo")["applies"]
    assert red["applies"][2] == {
        "playbook": "workstation.yml",
        "tags": ["firewall"],
        "extra_vars_files": ["overrides/ubongo-regression.yml"],
    }


def test_every_host_of_the_production_inventory_has_a_profile():
    """Issue 25: the harness proves every host it runs for, the control node included."""
    import yaml

    inventory = yaml.safe_load((ivm.REPO_ROOT / "inventories/production/hosts.yml").read_text())

    def hosts(group):
        found = set((group or {}).get("hosts") or {})
        for child in ((group or {}).get("children") or {}).values():
            found |= hosts(child)
        return found

    names = hosts(inventory["all"])
    assert {"askari", "ubongo"} <= names
    missing = sorted(h for h in names if not (ivm.PROFILE_DIR / f"{h}.json").is_file())
    assert missing == [], f"hosts without tests/integration/profiles/<host>.json: {missing}"
    for host in names:
        groups = {
            g for g, v in inventory["all"]["children"].items() if host in (v.get("hosts") or {})
        }
        assert set(ivm.Profiles.load_profile(host)["groups"]) == groups, host


def test_the_control_nodes_verify_looks_for_every_tool_the_harness_calls():
    """verify-ubongo.yml's tool list is the driver's (a cycle with a locally built image,
    and the emulator): the role installs no Recommends, so its verify must see each."""
    import yaml

    play = yaml.safe_load((ivm.REPO_ROOT / "tests/integration/verify-ubongo.yml").read_text())[0]
    want = list(dict.fromkeys(ivm.Session.tools_for("cycle", "build") + ["qemu-system-x86_64"]))
    assert play["vars"]["verify__harness_tools"] == want
