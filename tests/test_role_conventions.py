"""The role conventions of CLAUDE.md and the house style, checked over every role.

- Inputs: `defaults/main.yml`, `meta/argument_specs.yml` (entry point `main`) and the
  role's README name the same `<role>__*` variables, and the specs state each default
  (a templated default may be left out) with a type that fits it.
- Handlers: every handler listens on a topic `<role> <verb> <service>` of its own role;
  every `notify` names such a topic (never a handler name); every topic is notified.
- apt: the probe that refreshes an empty or stale package index lives only in role
  `apt_index`; a task file that installs packages imports it before its first install,
  and the integration driver's checkpoint scanner follows that import.

Each check returns the problems it finds, so one test lists all of them; the scaffold of
`make new-role` is held to the same checks.
"""

import pathlib
import re
import subprocess
import sys

import pytest
import yaml
from conftest import load_script

REPO = pathlib.Path(__file__).resolve().parent.parent
ROLES_DIR = REPO / "roles"
ROLES = sorted(p.name for p in ROLES_DIR.iterdir() if (p / "tasks").is_dir())
APT_INDEX_ROLE = "apt_index"
# Keys whose value is a list of tasks (in a tasks file, a handlers file or a block).
TASK_LIST_KEYS = ("block", "rescue", "always")
IMPORT_ROLE_KEYS = ("import_role", "ansible.builtin.import_role")
APT_KEYS = ("apt", "ansible.builtin.apt")
FIND_KEYS = ("find", "ansible.builtin.find")
APT_LISTS_DIR = "/var/lib/apt/lists"
# Python type of a literal default -> the argument_specs types that fit it.
SPEC_TYPES = {
    bool: {"bool"},
    int: {"int"},
    float: {"float"},
    str: {"str", "path", "raw"},
    list: {"list"},
    dict: {"dict"},
}


def topic_re(role):
    """`<role> <verb> <service>`: e.g. `reverse_proxy restart caddy`."""
    return re.compile(rf"^{re.escape(role)} [a-z]+ [a-z0-9][a-z0-9_.@-]*$")


def load_yaml(path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def walk_tasks(tasks):
    """Every task of a task list, blocks flattened (the block itself included)."""
    for task in tasks or []:
        if not isinstance(task, dict):
            continue
        yield task
        for key in TASK_LIST_KEYS:
            yield from walk_tasks(task.get(key))


def as_list(value):
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def task_files(role_dir, kind):
    """(path, [task, ...]) for every YAML file of roles/<role>/<kind>/."""
    return [(p, list(walk_tasks(load_yaml(p)))) for p in sorted((role_dir / kind).glob("*.yml"))]


def is_templated(value):
    return isinstance(value, str) and "{{" in value


# --- the checks (each returns a list of problems, empty when the role complies) ----------


def input_problems(role_dir):
    role = role_dir.name
    defaults = load_yaml(role_dir / "defaults" / "main.yml") or {}
    specs = load_yaml(role_dir / "meta" / "argument_specs.yml") or {}
    options = ((specs.get("argument_specs") or {}).get("main") or {}).get("options") or {}
    readme = role_dir / "README.md"
    mentioned = (
        set(re.findall(rf"\b{role}__[a-z0-9_]+", readme.read_text()))
        if (readme.is_file())
        else set()
    )
    problems = []
    if not readme.is_file():
        problems.append("no README.md")
    for name in sorted(set(defaults) - set(options)):
        problems.append(f"{name}: in defaults/main.yml, not in meta/argument_specs.yml")
    for name in sorted(set(options) - set(defaults)):
        problems.append(f"{name}: in meta/argument_specs.yml, not in defaults/main.yml")
    for name in sorted(set(defaults) - mentioned):
        problems.append(f"{name}: an input the README does not mention")
    for name in sorted(mentioned - set(defaults)):
        problems.append(f"{name}: the README names it, but it is no input (defaults/main.yml)")
    for name in sorted(set(defaults) & set(options)):
        value, spec = defaults[name], options[name] or {}
        if not name.startswith(f"{role}__"):
            problems.append(f"{name}: an input must be named {role}__<name>")
        if "default" in spec and spec["default"] != value:
            problems.append(f"{name}: argument_specs default {spec['default']!r} != {value!r}")
        if "default" not in spec and not is_templated(value):
            problems.append(f"{name}: argument_specs states no default (defaults: {value!r})")
        if not spec.get("description"):
            problems.append(f"{name}: argument_specs has no description")
        fits = SPEC_TYPES.get(type(value), set())
        if not is_templated(value) and value is not None and spec.get("type") not in fits:
            problems.append(f"{name}: argument_specs type {spec.get('type')!r} for {value!r}")
    return problems


def listen_topics(role_dir):
    """{topic: handler name} of a role."""
    topics = {}
    for _, tasks in task_files(role_dir, "handlers"):
        for handler in tasks:
            for topic in as_list(handler.get("listen")):
                topics[topic] = handler.get("name")
    return topics


def notifies(role_dir):
    """[(file, task name, topic)] of every notify in a role's tasks and handlers."""
    found = []
    for kind in ("tasks", "handlers"):
        for path, tasks in task_files(role_dir, kind):
            for task in tasks:
                for topic in as_list(task.get("notify")):
                    found.append((path.relative_to(role_dir.parent), task.get("name"), topic))
    return found


def handler_problems(role_dir, roles_dir):
    """Handlers listen on `<role> <verb> <service>`; notify names a topic of some role
    (cross-role notify is allowed); every topic of this role is notified by some role."""
    role = role_dir.name
    problems = []
    for _, handlers in task_files(role_dir, "handlers"):
        for handler in handlers:
            topics = as_list(handler.get("listen"))
            if not topics:
                problems.append(f"handler {handler.get('name')!r} has no listen topic")
            for topic in topics:
                if not topic_re(role).match(topic):
                    problems.append(
                        f"handler {handler.get('name')!r}: topic {topic!r} is not "
                        f"'{role} <verb> <service>'"
                    )
    every_role = sorted(p for p in roles_dir.iterdir() if (p / "tasks").is_dir())
    all_topics = {t for r in every_role for t in listen_topics(r)}
    for where, name, topic in notifies(role_dir):
        if topic not in all_topics:
            problems.append(f"{where}: {name!r} notifies {topic!r}, which no handler listens on")
    notified = {topic for r in every_role for _, _, topic in notifies(r)}
    for topic, name in listen_topics(role_dir).items():
        if topic not in notified:
            problems.append(f"topic {topic!r} (handler {name!r}) is never notified")
    return problems


def module_args(task, keys):
    """The arguments of the task's module when it is one of `keys`, else None."""
    for key in keys:
        if key in task:
            return task[key] if isinstance(task[key], dict) else {}
    return None


def imports_apt_index(task):
    args = module_args(task, IMPORT_ROLE_KEYS)
    return args is not None and args.get("name") == APT_INDEX_ROLE


def apt_problems(role_dir):
    """Outside apt_index: no apt lists probe, no cache refresh, and every file that
    installs packages imports apt_index before its first install."""
    if role_dir.name == APT_INDEX_ROLE:
        return []
    problems = []
    for path, tasks in task_files(role_dir, "tasks") + task_files(role_dir, "handlers"):
        where = path.relative_to(role_dir.parent)
        imported = False
        for task in tasks:
            imported = imported or imports_apt_index(task)
            find = module_args(task, FIND_KEYS)
            if find is not None and APT_LISTS_DIR in str(find.get("paths")):
                problems.append(f"{where}: {task.get('name')!r} probes {APT_LISTS_DIR}")
            apt = module_args(task, APT_KEYS)
            if apt is None:
                continue
            if apt.get("update_cache") or "cache_valid_time" in apt:
                problems.append(f"{where}: {task.get('name')!r} refreshes the apt index itself")
            if apt.get("name") and not imported:
                problems.append(
                    f"{where}: {task.get('name')!r} installs packages without importing "
                    f"role {APT_INDEX_ROLE} before it"
                )
    return problems


# --- the tests ------------------------------------------------------------------------------


def test_there_are_roles_to_check():
    assert {"base", "docker_host", "reverse_proxy", APT_INDEX_ROLE} <= set(ROLES)


@pytest.mark.parametrize("role", ROLES)
def test_defaults_argument_specs_and_readme_agree(role):
    assert input_problems(ROLES_DIR / role) == []


@pytest.mark.parametrize("role", ROLES)
def test_handlers_listen_on_role_topics_and_notify_uses_them(role):
    assert handler_problems(ROLES_DIR / role, ROLES_DIR) == []


@pytest.mark.parametrize("role", ROLES)
def test_the_apt_index_probe_lives_in_one_role(role):
    assert apt_problems(ROLES_DIR / role) == []


def test_the_checks_catch_what_they_guard(tmp_path):
    """A role that breaks each rule once yields one problem per rule."""
    role = tmp_path / "roles" / "demo"
    for d in ("defaults", "meta", "tasks", "handlers"):
        (role / d).mkdir(parents=True)
    (role / "defaults" / "main.yml").write_text("---\ndemo__a: 1\ndemo__b: x\n")
    (role / "meta" / "argument_specs.yml").write_text(
        "---\nargument_specs:\n  main:\n    options:\n"
        "      demo__a: {type: str, default: 2, description: a}\n"
        "      demo__c: {type: str, default: c, description: c}\n"
    )
    (role / "README.md").write_text("# demo\n`demo__a`, `demo__z`\n")
    (role / "handlers" / "main.yml").write_text(
        "---\n- name: Restart demo\n  ansible.builtin.debug:\n  listen: restart demo\n"
        "- name: Reload demo\n  ansible.builtin.debug:\n  listen: demo reload demo\n"
    )
    (role / "tasks" / "main.yml").write_text(
        "---\n- name: Configure\n  ansible.builtin.debug:\n  notify: Restart demo\n"
        "- name: Probe\n  ansible.builtin.find:\n    paths: /var/lib/apt/lists\n"
        "- name: Install\n  ansible.builtin.apt:\n    name: x\n    update_cache: true\n"
    )
    inputs = input_problems(role)
    assert any("demo__b: in defaults/main.yml, not in meta" in p for p in inputs)
    assert any("demo__c: in meta/argument_specs.yml, not in defaults" in p for p in inputs)
    assert any("demo__b: an input the README does not mention" in p for p in inputs)
    assert any("demo__z: the README names it" in p for p in inputs)
    assert any("demo__a: argument_specs default 2 != 1" in p for p in inputs)
    assert any("demo__a: argument_specs type 'str'" in p for p in inputs)
    handlers = handler_problems(role, tmp_path / "roles")
    assert any("'restart demo' is not 'demo <verb> <service>'" in p for p in handlers)
    assert any("notifies 'Restart demo', which no handler listens on" in p for p in handlers)
    assert any(
        "'demo reload demo' (handler 'Reload demo') is never notified" in p for p in handlers
    )
    apt = apt_problems(role)
    assert any("probes /var/lib/apt/lists" in p for p in apt)
    assert any("refreshes the apt index itself" in p for p in apt)
    assert any("without importing role apt_index" in p for p in apt)


def test_the_new_role_scaffold_follows_the_conventions(tmp_path):
    roles = tmp_path / "roles"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "new-role.py"), "--roles-dir", str(roles), "demo"],
        check=True,
        capture_output=True,
    )
    role = roles / "demo"
    assert input_problems(role) == []
    assert handler_problems(role, roles) == []
    assert apt_problems(role) == []


def test_the_checkpoint_scanner_follows_the_apt_index_import():
    """The driver keys each apply's checkpoint by the roles it runs: an import_role of
    apt_index must be followed (an edit there invalidates the apply) and must not make the
    scan give up (which would count every role as an input of every apply)."""
    ivm = load_script("integration-vm.py", "integration_vm")
    for playbook, tags, role in (
        ("site.yml", ["base"], "base"),
        ("offsite.yml", ["docker_host", "reverse_proxy"], "docker_host"),
        ("workstation.yml", [], "integration_test"),
    ):
        text = (REPO / "playbooks" / playbook).read_text()
        roles, complete = ivm.Checkpoints.roles_used(REPO, text, tags)
        assert complete, playbook
        assert role in roles and APT_INDEX_ROLE in roles, (playbook, roles)
