#!/usr/bin/env python3
"""Check that every Ansible tag in the repo belongs to the tag vocabulary.

A tag is allowed when it is listed in tests/tags.yml or is the name of a role
(roles/<name>/ exists: plays tag each role with its own name). Scanned files:
roles/*/tasks/*.yml, roles/*/handlers/*.yml and playbooks/*.yml.

Exit codes: 0 every tag is known, 1 unknown tags (one line each, `path:line: ...`),
2 the vocabulary or a scanned file cannot be read.
"""

import argparse
import pathlib
import sys

import yaml

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCABULARY = pathlib.Path("tests") / "tags.yml"
SCAN_GLOBS = ("roles/*/tasks/*.yml", "roles/*/handlers/*.yml", "playbooks/*.yml")
# Keys whose value is a list of tasks (in plays, blocks and handlers files).
TASK_LIST_KEYS = ("tasks", "pre_tasks", "post_tasks", "handlers", "block", "rescue", "always")

EXIT_OK = 0
EXIT_UNKNOWN_TAGS = 1
EXIT_BAD_INPUT = 2


class InputError(Exception):
    """A file the check needs cannot be read or parsed (exit code 2)."""


# --- pure helpers -------------------------------------------------------------------


def parse_vocabulary(text):
    """Return the set of tags a tests/tags.yml document allows."""
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("tags"), list):
        raise InputError("the vocabulary must be a mapping with a `tags:` list")
    return {str(tag) for tag in data["tags"]}


def _mapping_get(node, key):
    """Value node for `key` in a YAML mapping node, or None."""
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return value_node
    return None


def _tag_values(node):
    """(line, tag) pairs of a `tags:` value: a list, or a comma-separated string."""
    if isinstance(node, yaml.ScalarNode):
        items = [(node, part) for part in node.value.split(",")]
    elif isinstance(node, yaml.SequenceNode):
        items = [(item, item.value) for item in node.value if isinstance(item, yaml.ScalarNode)]
    else:  # a mapping is some module's own `tags` argument, not Ansible's
        return []
    pairs = []
    for item, value in items:
        value = value.strip()
        if value and "{{" not in value:  # templated tags cannot be checked statically
            pairs.append((item.start_mark.line + 1, value))
    return pairs


def _walk(node):
    """Yield (line, tag) for every tag of the plays/tasks/handlers under `node`."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _walk(item)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    tags = _mapping_get(node, "tags")
    if tags is not None:
        yield from _tag_values(tags)
    for key in TASK_LIST_KEYS:
        child = _mapping_get(node, key)
        if child is not None:
            yield from _walk(child)
    roles = _mapping_get(node, "roles")
    if isinstance(roles, yaml.SequenceNode):
        for role in roles.value:
            if isinstance(role, yaml.MappingNode):
                role_tags = _mapping_get(role, "tags")
                if role_tags is not None:
                    yield from _tag_values(role_tags)
    # include_role / include_tasks: `apply: {tags: [...]}` inside the module arguments.
    for _key, value in node.value:
        if isinstance(value, yaml.MappingNode):
            apply = _mapping_get(value, "apply")
            if isinstance(apply, yaml.MappingNode):
                apply_tags = _mapping_get(apply, "tags")
                if apply_tags is not None:
                    yield from _tag_values(apply_tags)


def tags_in(text):
    """Return the (line, tag) pairs used in one Ansible YAML file's text."""
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise InputError(f"cannot parse YAML: {str(exc).splitlines()[0]}") from exc
    found = []
    for document in documents:
        found.extend(_walk(document))
    return found


def unknown_tags(files, allowed):
    """Lines `path:line: ...` for each tag in `files` ({path: text}) not in `allowed`."""
    offenders = []
    for path in sorted(files):
        try:
            pairs = tags_in(files[path])
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from exc
        for line, tag in pairs:
            if tag not in allowed:
                offenders.append(
                    f"{path}:{line}: tag '{tag}' is neither in {VOCABULARY} nor a role name"
                )
    return offenders


# --- impure orchestration -------------------------------------------------------------


def _read(path):
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc


def collect(root, vocabulary_path):
    """Read the vocabulary, role names and scanned files under `root`."""
    allowed = parse_vocabulary(_read(vocabulary_path))
    roles_dir = root / "roles"
    if roles_dir.is_dir():
        allowed |= {p.name for p in roles_dir.iterdir() if p.is_dir()}
    files = {}
    for pattern in SCAN_GLOBS:
        for path in sorted(root.glob(pattern)):
            files[str(path.relative_to(root))] = _read(path)
    return allowed, files


# --- CLI ------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(prog="check-tags", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=pathlib.Path,
        default=REPO_ROOT,
        help="repository root to scan (default: this script's repo)",
    )
    parser.add_argument(
        "--vocabulary",
        type=pathlib.Path,
        default=None,
        help=f"tag vocabulary file (default: ROOT/{VOCABULARY})",
    )
    args = parser.parse_args(argv)
    vocabulary = args.vocabulary or args.root / VOCABULARY
    try:
        allowed, files = collect(args.root, vocabulary)
        offenders = unknown_tags(files, allowed)
    except InputError as exc:
        print(f"check-tags: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for line in offenders:
        print(line)
    if offenders:
        return EXIT_UNKNOWN_TAGS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
