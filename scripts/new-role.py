#!/usr/bin/env python3
"""Scaffold a role in boma's house style: make new-role NAME=x

Writes roles/<x>/ with defaults/main.yml (one documented example input, x__enabled),
meta/main.yml, meta/argument_specs.yml mirroring the defaults, tasks/main.yml,
handlers/main.yml, README.md (Requirements / Role Variables / Example Playbook) and a
Molecule default scenario whose platform block is the one roles/base uses (with the
role's own platform name, so scenarios of different roles never share a container).

Stdlib only (the Makefile runs it with the system python3). The files are written to a
temporary directory next to the target and renamed into place, so a failure leaves no
half-made role behind.

Exit codes: 0 scaffolded; 2 invalid name, or the role already exists (one line on
stderr, nothing written); 3 the files could not be written.
"""

import argparse
import os
import pathlib
import re
import shutil
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ROLES_DIR = REPO_ROOT / "roles"
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_WRITE = 3

# The platform block of roles/base/molecule/default/molecule.yml, minus its name
# (tests/test_new_role.py fails when base's block changes and this copy does not).
MOLECULE_PLATFORM_BODY = """\
    image: boma/molecule-debian13:latest
    pre_build_image: true
    override_command: false
    command: /lib/systemd/systemd
    capabilities: [SYS_ADMIN, NET_ADMIN]
    security_opts: [seccomp=unconfined, apparmor=unconfined]
    cgroupns_mode: host
    volumes: ["/sys/fs/cgroup:/sys/fs/cgroup:rw"]
    tmpfs: ["/run", "/tmp"]
"""


class UsageError(Exception):
    """A name the user can fix (exit 2)."""


# --- pure helpers -------------------------------------------------------------------


def check_name(name):
    """Raise UsageError unless `name` is a valid role name (and Ansible variable prefix)."""
    if not NAME_RE.match(name or ""):
        raise UsageError(
            f"invalid role name {name!r}: it must match {NAME_RE.pattern} "
            "(lower-case letters, digits and _, starting with a letter)"
        )


def platform_name(name):
    """Molecule platform (container) name, unique per role: base -> base-debian13."""
    return f"{name.replace('_', '-')}-debian13"


def render_defaults(name):
    return f"""\
---
# {name}: what this role does, in one line (replace this). Every input is documented here
# and in meta/argument_specs.yml; internal values go to vars/main.yml as __{name}_*.

# Whether the role does anything. `false` skips every task, so the role can sit in a
# play before a host is ready for it.
{name}__enabled: true
"""


def render_argument_specs(name):
    return f"""\
---
# Validated by Ansible before the role runs; mirrors defaults/main.yml.
argument_specs:
  main:
    short_description: "{name}: what this role does, in one line (replace this)."
    description:
      - Describe what the role changes on a host, and what it never touches.
    options:
      {name}__enabled:
        type: bool
        default: true
        description: Whether the role does anything; false skips every task.
"""


def render_meta(name):
    return f"""\
---
galaxy_info:
  role_name: {name}
  namespace: boma
  author: boma
  description: >-
    {name}: what this role does, in one line (replace this).
  license: MIT
  min_ansible_version: "2.17"
  platforms:
    - name: Debian
      versions:
        - bookworm
        - trixie
  galaxy_tags:
    - {name.replace("_", "")}
dependencies: []
"""


def render_tasks(name):
    return f"""\
---
# {name}: preflight → packages → config → service (split into preflight.yml, ... as the
# role grows; import each with its tag from tests/tags.yml).

- name: Report that the role has nothing to do yet
  ansible.builtin.debug:
    msg: "{name} is enabled; replace this task with the role's work."
  when: {name}__enabled | bool
"""


def render_handlers(name):
    return f"""\
---
# {name} handlers. One per service action, with a stable capitalised name and a
# `listen:` topic `<role> <verb> <service>`; notify by the topic, not by the name
# (tests/test_role_conventions.py checks both). Example:
#
# - name: Restart example
#   ansible.builtin.systemd_service:
#     name: example.service
#     state: restarted
#   listen: {name} restart example
[]
"""


def render_readme(name):
    return f"""\
# {name}

What this role does, in a paragraph (replace this): what it changes on a host, and what it
never touches.

## Requirements

- Debian 12 (bookworm) or 13 (trixie) with systemd; `become: true`.

## Role Variables

See `defaults/main.yml` (every input is commented) and `meta/argument_specs.yml` (types,
defaults; Ansible validates them before the role runs).

| Variable | Default | Meaning |
|---|---|---|
| `{name}__enabled` | `true` | Whether the role does anything; `false` skips every task. |

## Tags

`{name}` (from the playbook). Task tags come from the vocabulary in `tests/tags.yml`.

## Example Playbook

```yaml
- name: Apply {name}
  hosts: all
  become: true
  roles:
    - role: {name}
      tags: [{name}]
```

## Testing

`make test-role ROLE={name}`: Molecule in a systemd Debian 13 container (converge,
idempotence, verify). `molecule/default/verify.yml` must assert outcomes (service state,
file contents, a port answering), not that tasks ran.
"""


def render_molecule(name):
    return f"""\
---
# Molecule scenario for {name}: make test-role ROLE={name}
#
# A systemd Debian 13 container built locally (make molecule-image; no registry is
# reachable). --privileged is not possible on these machines, so the container gets only
# what systemd needs (the platform block is roles/base's, with this role's own name).
driver:
  name: docker
platforms:
  - name: {platform_name(name)}
{MOLECULE_PLATFORM_BODY}\
ansible:
  cfg:
    defaults:
      # The repo's roles/ directory, so converge can name roles directly.
      roles_path: ${{MOLECULE_PROJECT_DIRECTORY}}/..
      callbacks_enabled: ansible.posix.profile_tasks
provisioner:
  name: ansible
scenario:
  test_sequence:
    - destroy
    - syntax
    - create
    - converge
    - idempotence
    - verify
    - destroy
verifier:
  name: ansible
"""


def render_converge(name):
    return f"""\
---
- name: Converge
  hosts: all
  become: true
  gather_facts: false
  pre_tasks:
    - name: Wait for systemd to finish booting the container
      # multi-user.target active = boot done (geerlingguy roles wait the same way).
      ansible.builtin.systemd_service:
        name: multi-user.target
      register: __converge_target
      until: __converge_target.status.ActiveState == 'active'
      retries: 30
      delay: 2

    - name: Gather facts once systemd is up
      ansible.builtin.setup:

  roles:
    - role: {name}
      vars:
        {name}__enabled: true
"""


def render_verify(name):
    return f"""\
---
# Verify outcomes, not tasks: replace the placeholder with checks of what {name} makes
# true on a host (a service enabled and active, a file's content, a port answering).
- name: Verify
  hosts: all
  become: true
  gather_facts: false
  tasks:
    - name: Read the state of systemd
      ansible.builtin.systemd_service:
        name: multi-user.target
      register: __verify_target

    - name: Assert the host is still up after the role (replace with the role's outcomes)
      ansible.builtin.assert:
        that:
          - __verify_target.status.ActiveState == 'active'
"""


def scaffold_files(name):
    """{relative path: content} of every file of a new role."""
    check_name(name)
    return {
        "defaults/main.yml": render_defaults(name),
        "meta/main.yml": render_meta(name),
        "meta/argument_specs.yml": render_argument_specs(name),
        "tasks/main.yml": render_tasks(name),
        "handlers/main.yml": render_handlers(name),
        "README.md": render_readme(name),
        "molecule/default/molecule.yml": render_molecule(name),
        "molecule/default/converge.yml": render_converge(name),
        "molecule/default/verify.yml": render_verify(name),
    }


# --- impure ------------------------------------------------------------------------


def write_role(roles_dir, name):
    """Create roles_dir/<name>/ atomically. Returns its path."""
    files = scaffold_files(name)
    roles_dir = pathlib.Path(roles_dir)
    dest = roles_dir / name
    if dest.exists() or dest.is_symlink():
        raise UsageError(f"role {name!r} already exists: {dest}")
    roles_dir.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".new-role-{name}-", dir=roles_dir))
    try:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)  # fails, rather than merges, if dest appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="new-role",
        description=__doc__.split("\n\n")[0],
        epilog="exit codes: 0 scaffolded, 2 invalid name or existing role, 3 write error",
    )
    parser.add_argument("name", help="role name: ^[a-z][a-z0-9_]*$ (it prefixes every input)")
    parser.add_argument(
        "--roles-dir",
        type=pathlib.Path,
        default=ROLES_DIR,
        help=f"where to create the role (default {ROLES_DIR})",
    )
    args = parser.parse_args(argv)
    try:
        dest = write_role(args.roles_dir, args.name)
    except UsageError as e:
        print(f"new-role: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"new-role: cannot write the role: {e}", file=sys.stderr)
        return EXIT_WRITE
    try:
        shown = dest.relative_to(pathlib.Path.cwd())
    except ValueError:
        shown = dest
    print(
        f"new-role: created {shown}/ — next: fill in defaults/main.yml, "
        f"meta/argument_specs.yml, tasks/main.yml and README.md, then "
        f"`make test` and `make test-role ROLE={args.name}`"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
