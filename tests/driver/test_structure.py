"""The driver's structure: processes start only in the process section (an AST scan), no
function is over 60 lines, and the docstring's table of contents lists the sections.
"""

import ast
import re

from conftest import DRIVER

# The functions of the driver's "Processes" section: the only ones that may touch
# subprocess (run() starts, _start() spawns, _kill_group() reaps, _communicate_capped reads).
PROCESS_FUNCTIONS = {"run", "_start", "_kill_group", "_drain_killed", "_communicate_capped"}

MAX_FUNCTION_LINES = 60

_OS_STARTERS = ("system", "popen", "exec", "spawn", "posix_spawn", "fork")


def _starter(node):
    """A description of a process-starting reference at `node`, or None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        mod, attr = node.value.id, node.attr
        if mod == "subprocess":
            return f"subprocess.{attr}"
        if mod == "os" and attr.startswith(_OS_STARTERS):
            return f"os.{attr}"
        if mod == "pty" and attr == "spawn":
            return "pty.spawn"
    if isinstance(node, ast.ImportFrom) and node.module in ("subprocess", "pty"):
        return f"from {node.module} import"
    return None


def process_starts_outside(source, allowed=PROCESS_FUNCTIONS):
    """[(line, what, where)] for every process-starting reference outside the allowed
    top-level functions (module level included)."""
    found = []
    for top in ast.parse(source).body:
        where = getattr(top, "name", "<module>")
        if isinstance(top, ast.FunctionDef) and top.name in allowed:
            continue
        for node in ast.walk(top):
            what = _starter(node)
            if what:
                found.append((node.lineno, what, where))
    return found


def long_functions(source, limit=MAX_FUNCTION_LINES):
    """{name: lines} of every function (nested and methods included) over `limit` lines,
    counted from its `def` line (decorators excluded) to its last line."""
    return {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > limit
    }


def test_processes_start_only_in_the_process_section():
    assert process_starts_outside(DRIVER.read_text()) == []


def test_the_process_functions_exist_and_do_start_processes():
    # Guards the rule against going vacuous when the process section is renamed.
    source = DRIVER.read_text()
    tops = {n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
    assert tops >= PROCESS_FUNCTIONS
    assert process_starts_outside(source, allowed=set())


def test_the_scan_sees_each_way_to_start_a_process():
    src = (
        "import os, subprocess, pty\n"
        "def run():\n    subprocess.Popen(['x'])\n"
        "def sneaky():\n    os.system('x'); os.execvp('x', ['x']); os.spawnl(0, 'x')\n"
        "def other():\n    pty.spawn('x'); subprocess.run(['x'])\n"
        "from subprocess import check_output\n"
        "X = os.popen('x')\n"
    )
    assert [(w, where) for _, w, where in process_starts_outside(src)] == [
        ("os.system", "sneaky"),
        ("os.execvp", "sneaky"),
        ("os.spawnl", "sneaky"),
        ("pty.spawn", "other"),
        ("subprocess.run", "other"),
        ("from subprocess import", "<module>"),
        ("os.popen", "<module>"),
    ]


def test_no_function_is_over_60_lines():
    too_long = long_functions(DRIVER.read_text())
    assert too_long == {}


def test_the_length_check_counts_from_def_to_last_line():
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    assert long_functions(f"def ok():\n{body[: -len('    x59 = 59') - 1]}") == {}
    assert long_functions(f"@deco\ndef long():\n{body}") == {"long": 61}


def banner_sections(source):
    """The first word of each section banner's title (`# Name: what it holds` between two
    dashed lines), in file order."""
    return re.findall(r"^# -{40,}\n# (\w+)[^\n]*\n# -{40,}$", source, re.M)


def contents_sections(source):
    """The first word of each entry of the module docstring's table of contents (a line
    indented two spaces; its continuation lines are indented further), in order."""
    toc = ast.get_docstring(ast.parse(source)).split("in this order:\n", 1)[1]
    return re.findall(r"^  (\w+)", toc, re.M)


def test_the_table_of_contents_lists_every_section_in_order():
    source = DRIVER.read_text()
    assert len(banner_sections(source)) >= 15  # the scan still sees the banners
    assert contents_sections(source) == banner_sections(source)


def _callee(node, classes):
    """The top-level name a call reaches: `f(...)` is f, `Cls.method(...)` is Cls when Cls
    is a top-level class (a section's class of static methods), anything else None."""
    if not isinstance(node, ast.Call):
        return None
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
        return node.func.value.id if node.func.value.id in classes else None
    return None


def calls_into_later_sections(source):
    """[(line, caller, callee)] of every call, inside a top-level statement, to a top-level
    function or class (or a method of that class) that a later section (banner) defines."""
    tree = ast.parse(source)
    starts = [source.count("\n", 0, m.start()) + 1 for m in _BANNER.finditer(source)]

    def section(line):
        return sum(1 for s in starts if s <= line)

    defined = {n.name: section(n.lineno) for n in tree.body if hasattr(n, "name")}
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    found = []
    for top in tree.body:
        here = section(top.lineno)
        for node in ast.walk(top):
            callee = _callee(node, classes)
            if defined.get(callee, -1) > here:
                found.append((node.lineno, getattr(top, "name", "<module>"), callee))
    return found


_BANNER = re.compile(r"^# -{40,}\n# (\w+)[^\n]*\n# -{40,}$", re.M)


def test_no_call_points_to_a_later_section():
    # A reader meets each name before its first use (issue 26: 23 such calls before).
    assert calls_into_later_sections(DRIVER.read_text()) == []


def test_the_later_section_scan_sees_a_forward_call():
    dashes = "# " + "-" * 40 + "\n"
    src = (
        f"{dashes}# One\n{dashes}def a():\n    b()\n    c()\n\ndef c():\n    pass\n"
        f"{dashes}# Two\n{dashes}def b():\n    a()\n"
        "X = [b() for _ in ()]\n"
        f"{dashes}# Three\n{dashes}class C:\n    @staticmethod\n    def d():\n        pass\n"
    )
    src = src.replace("    c()\n", "    c()\n    C.d()\n", 1)
    assert calls_into_later_sections(src) == [(5, "a", "b"), (7, "a", "C")]


MAX_TOP_LEVEL_NAMES = 150


def top_level_names(source):
    """The names the module's own statements bind at top level (functions, classes,
    constants; imports not counted): the outline a reader holds. A section's helpers live
    in its class (issue 26: 587 top-level names before)."""
    names = set()
    for top in ast.parse(source).body:
        if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(top.name)
        elif isinstance(top, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = top.targets if isinstance(top, ast.Assign) else [top.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def test_the_outline_is_at_most_150_top_level_names():
    names = top_level_names(DRIVER.read_text())
    assert len(names) <= MAX_TOP_LEVEL_NAMES, sorted(names)


def test_the_outline_count_sees_functions_classes_and_constants():
    src = "import os\nA = 1\nB, C = 2, 3\nD: int = 4\ndef f():\n    x = 1\nclass K:\n    y = 2\n"
    assert top_level_names(src) == {"A", "B", "C", "D", "f", "K"}
