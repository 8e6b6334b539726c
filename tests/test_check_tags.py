import textwrap

from conftest import load_script

check_tags = load_script("check-tags.py", "check_tags")

VOCABULARY = "---\ntags:\n  - always\n  - packages\n  - firewall\n"


def _write(root, relpath, text):
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _tree(root):
    """A small clean repo: one role, one playbook, every tag known."""
    _write(root, "tests/tags.yml", VOCABULARY)
    _write(
        root,
        "roles/base/tasks/main.yml",
        """\
        ---
        - name: Refuse a lockout
          ansible.builtin.import_tasks: preflight.yml
          tags: [always]
        - name: Install packages
          ansible.builtin.apt:
            name: nftables
          tags: packages
        - name: Configure the firewall
          block:
            - name: Render the ruleset
              ansible.builtin.template:
                src: a.j2
                dest: /b
              tags: [firewall]
        """,
    )
    _write(
        root,
        "roles/base/handlers/main.yml",
        """\
        ---
        - name: Reload nftables
          ansible.builtin.command: nft -f /etc/nftables.conf
          listen: reload nftables
          tags: [firewall]
        """,
    )
    _write(
        root,
        "playbooks/site.yml",
        """\
        ---
        - name: Baseline
          hosts: all
          roles:
            - role: base
              tags: [base]
        """,
    )
    return root


def test_clean_tree_passes(tmp_path, capsys):
    _tree(tmp_path)
    assert check_tags.main(["--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""


def test_role_names_are_allowed_implicitly(tmp_path):
    _tree(tmp_path)
    _write(
        tmp_path,
        "roles/docker_host/tasks/main.yml",
        "---\n- name: X\n  ansible.builtin.debug:\n  tags: [base]\n",
    )
    assert check_tags.main(["--root", str(tmp_path)]) == 0


def test_offending_tags_are_reported_one_line_each(tmp_path, capsys):
    _tree(tmp_path)
    _write(
        tmp_path,
        "roles/base/tasks/extra.yml",
        """\
        ---
        - name: Do a thing
          ansible.builtin.debug:
          tags: [packages, pkgs]
        - name: A block
          block:
            - name: Nested
              ansible.builtin.debug:
          rescue:
            - name: Rescued
              ansible.builtin.debug:
              tags: "firewall,netfilter"
        """,
    )
    _write(
        tmp_path,
        "playbooks/offsite.yml",
        """\
        ---
        - name: Offsite
          hosts: offsite_hosts
          tags: [offsite]
          roles:
            - role: base
              tags: [reverse-proxy]
        """,
    )
    assert check_tags.main(["--root", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert "playbooks/offsite.yml:4: tag 'offsite'" in lines[0]
    assert "playbooks/offsite.yml:7: tag 'reverse-proxy'" in lines[1]
    assert "roles/base/tasks/extra.yml:4: tag 'pkgs'" in lines[2]
    assert "roles/base/tasks/extra.yml:12: tag 'netfilter'" in lines[3]


def test_include_role_apply_tags_are_checked(tmp_path, capsys):
    _tree(tmp_path)
    _write(
        tmp_path,
        "roles/base/tasks/inc.yml",
        """\
        ---
        - name: Include another role
          ansible.builtin.include_role:
            name: base
            apply:
              tags: [bogus]
        """,
    )
    assert check_tags.main(["--root", str(tmp_path)]) == 1
    assert "tag 'bogus'" in capsys.readouterr().out


def test_module_tags_mapping_is_not_a_tag(tmp_path):
    _tree(tmp_path)
    _write(
        tmp_path,
        "roles/base/tasks/cloud.yml",
        """\
        ---
        - name: A module with its own tags argument
          some.collection.instance:
            tags:
              Name: web
        """,
    )
    assert check_tags.main(["--root", str(tmp_path)]) == 0


def test_unparsable_yaml_is_one_line_and_exit_2(tmp_path, capsys):
    _tree(tmp_path)
    _write(tmp_path, "playbooks/broken.yml", "- name: x\n  tags: [a\n")
    assert check_tags.main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "check-tags: playbooks/broken.yml: cannot parse YAML"
    )


def test_missing_vocabulary_is_exit_2(tmp_path, capsys):
    (tmp_path / "roles").mkdir()
    assert check_tags.main(["--root", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_parse_vocabulary_rejects_wrong_shape():
    try:
        check_tags.parse_vocabulary("- a\n- b\n")
    except check_tags.InputError as exc:
        assert "tags:" in str(exc)
    else:
        raise AssertionError("expected InputError")


def test_repo_vocabulary_parses():
    allowed = check_tags.parse_vocabulary((check_tags.REPO_ROOT / "tests" / "tags.yml").read_text())
    assert {"always", "packages", "firewall", "ssh", "preflight"} <= allowed
