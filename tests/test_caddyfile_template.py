"""Rendering tests for roles/reverse_proxy's Caddyfile and gandi.env templates.

The templates are rendered with Ansible's own templating engine (ansible.template.Templar,
the Jinja2 environment the `template` module uses, with its trim_blocks default) from the
role defaults, optionally the production group_vars, and the fake vault values in
tests/vault/test-values.yml. `ansible_managed` is passed as a plain string.

The load-bearing guarantee (spec Task 11): with the test knobs off, the production
Caddyfile is byte-identical to tests/fixtures/reverse_proxy/Caddyfile.production, a file
written by hand as the output the role produced before the knobs existed. One slow-ish
test (a few seconds) renders through the real `template` module to prove this helper
renders exactly like Ansible does.
"""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
ROLE = REPO / "roles" / "reverse_proxy"
TEMPLATES = ROLE / "templates" / "etc" / "boma" / "caddy"
PRODUCTION_VARS = REPO / "inventories" / "production" / "group_vars" / "all" / "reverse_proxy.yml"
TEST_VAULT = REPO / "tests" / "vault" / "test-values.yml"
GOLDEN = REPO / "tests" / "fixtures" / "reverse_proxy" / "Caddyfile.production"
ANSIBLE_MANAGED = "Ansible managed"
LE_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
HEADER = "#\n# Ansible managed\n#\n"


# Ansible is imported where it is used, not at collection: every xdist worker collects
# every module, and a worker that holds ansible's ~20 MB forks each of the driver tests'
# fake tools (tests/conftest.py) from a bigger process.
def load_vars(production=True, **overrides):
    """Role defaults (+ production group_vars) + fake vault values + overrides."""
    from ansible.parsing.dataloader import DataLoader

    loader = DataLoader()
    variables = dict(
        loader.load_from_file(str(ROLE / "defaults" / "main.yml"), trusted_as_template=True)
    )
    if production:
        variables.update(loader.load_from_file(str(PRODUCTION_VARS), trusted_as_template=True))
    variables.update(loader.load_from_file(str(TEST_VAULT), trusted_as_template=True))
    variables["ansible_managed"] = ANSIBLE_MANAGED
    variables.update(overrides)
    return loader, variables


def render(name, production=True, **overrides):
    """Render roles/reverse_proxy/templates/etc/boma/caddy/<name>.j2 as the template module does."""
    from ansible.template import Templar, trust_as_template

    loader, variables = load_vars(production, **overrides)
    source = trust_as_template((TEMPLATES / f"{name}.j2").read_text())
    templar = Templar(loader=loader, variables=variables)
    return templar.template(
        source,
        escape_backslashes=False,
        overrides=dict(trim_blocks=True, lstrip_blocks=False, newline_sequence="\n"),
    )


def site_blocks(caddyfile):
    """{site address: [directive lines]} of every top-level site block."""
    blocks, current = {}, None
    for line in caddyfile.splitlines():
        if line.endswith(" {") and not line.startswith(("\t", "#")):
            current = line[:-2]
            blocks[current] = []
        elif line == "}":
            current = None
        elif current is not None:
            blocks[current].append(line)
    return blocks


def global_block(caddyfile):
    """Lines inside the global options block (the first bare `{`), or None."""
    lines = caddyfile.splitlines()
    if "{" not in lines:
        return None
    start = lines.index("{")
    return lines[start + 1 : lines.index("}", start)]


# --- default / production byte-identity -------------------------------------------


def test_role_defaults_render_only_the_managed_header():
    assert render("Caddyfile", production=False) == HEADER


def test_production_output_equals_golden_file():
    assert render("Caddyfile") == GOLDEN.read_text()


def test_knobs_explicitly_off_are_byte_identical_to_production():
    off = render(
        "Caddyfile",
        reverse_proxy__tls_internal=False,
        reverse_proxy__acme_ca="",
        reverse_proxy__default_sni="",
    )
    assert off.encode() == GOLDEN.read_bytes()


def test_default_output_has_no_test_knob_directives():
    out = render("Caddyfile")
    for directive in ("tls internal", "acme_ca", "default_sni"):
        assert directive not in out


# --- tls internal ----------------------------------------------------------------


def test_tls_internal_is_first_directive_of_every_site():
    out = render("Caddyfile", reverse_proxy__tls_internal=True)
    blocks = site_blocks(out)
    _, variables = load_vars()
    assert list(blocks) == [r["host"] for r in variables["reverse_proxy__routes"]]
    for host, directives in blocks.items():
        assert directives[0] == "\ttls internal", host
    assert out.count("\ttls internal\n") == len(blocks)


def test_tls_internal_changes_nothing_but_the_added_lines():
    out = render("Caddyfile", reverse_proxy__tls_internal=True)
    assert out.replace("\ttls internal\n", "") == GOLDEN.read_text()


def test_tls_internal_exact_output_for_one_route():
    out = render(
        "Caddyfile",
        production=False,
        reverse_proxy__routes=[{"host": "app.test.example", "upstream": "app:8080"}],
        reverse_proxy__tls_internal=True,
    )
    assert out == HEADER + "\napp.test.example {\n\ttls internal\n\treverse_proxy app:8080\n}\n"


# --- acme_ca (staging) -----------------------------------------------------------


def test_acme_ca_staging_adds_exactly_one_global_line():
    out = render("Caddyfile", reverse_proxy__acme_ca=LE_STAGING)
    assert global_block(out) == [
        f"\tacme_ca {LE_STAGING}",
        "\tacme_dns gandi {env.GANDI_BEARER_TOKEN}",
    ]
    assert out.replace(f"\tacme_ca {LE_STAGING}\n", "") == GOLDEN.read_text()


def test_acme_ca_without_provider_opens_a_global_block():
    out = render("Caddyfile", production=False, reverse_proxy__acme_ca=LE_STAGING)
    assert out == HEADER + "{\n" + f"\tacme_ca {LE_STAGING}\n" + "}\n"


# --- gandi provider / env file -----------------------------------------------------


def test_gandi_provider_global_block_and_sites():
    out = render(
        "Caddyfile",
        production=False,
        reverse_proxy__acme_dns_provider="gandi",
        reverse_proxy__routes=[{"host": "a.wingu.me", "upstream": "a:80"}],
    )
    assert out == (
        HEADER
        + "{\n\tacme_dns gandi {env.GANDI_BEARER_TOKEN}\n}\n"
        + "\na.wingu.me {\n\treverse_proxy a:80\n}\n"
    )


def test_no_provider_no_acme_dns():
    out = render("Caddyfile", reverse_proxy__acme_dns_provider="")
    assert "acme_dns" not in out
    assert global_block(out) is None


def test_gandi_env_file_carries_the_vault_token():
    assert render("gandi.env") == HEADER + "GANDI_BEARER_TOKEN=test-not-a-real-token\n"


# --- every knob at once (the le-staging / internal tier shapes) ---------------------


def test_all_knobs_exact_output():
    out = render(
        "Caddyfile",
        production=False,
        reverse_proxy__routes=[
            {"host": "netbird.wingu.me", "upstream": "netbird-dashboard:80"},
            {"host": "b.wingu.me", "upstream": "b:8080"},
        ],
        reverse_proxy__acme_email="ops@example.org",
        reverse_proxy__acme_ca=LE_STAGING,
        reverse_proxy__acme_dns_provider="gandi",
        reverse_proxy__default_sni="netbird.wingu.me",
        reverse_proxy__tls_internal=True,
    )
    assert out == (
        HEADER
        + "{\n"
        + "\temail ops@example.org\n"
        + f"\tacme_ca {LE_STAGING}\n"
        + "\tacme_dns gandi {env.GANDI_BEARER_TOKEN}\n"
        + "\tdefault_sni netbird.wingu.me\n"
        + "}\n"
        + "\nnetbird.wingu.me {\n\ttls internal\n\treverse_proxy netbird-dashboard:80\n}\n"
        + "\nb.wingu.me {\n\ttls internal\n\treverse_proxy b:8080\n}\n"
    )


# --- this helper renders like the real template module ------------------------------


def test_real_template_module_matches_golden(tmp_path):
    """Render through `ansible -m template` (as a deploy would) and compare bytes."""
    ansible = pathlib.Path(sys.executable).parent / "ansible"
    # make test runs pytest from .venv, where the pinned ansible lives: missing is a defect.
    assert ansible.exists(), f"ansible not installed next to {sys.executable} (run make venv)"
    dest = tmp_path / "Caddyfile"
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_GATHERING="explicit")
    proc = subprocess.run(
        [
            str(ansible),
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"@{ROLE / 'defaults' / 'main.yml'}",
            "-e",
            f"@{PRODUCTION_VARS}",
            "-e",
            f"@{TEST_VAULT}",
            "-e",
            f"ansible_managed='{ANSIBLE_MANAGED}'",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-m",
            "ansible.builtin.template",
            "-a",
            f"src={TEMPLATES / 'Caddyfile.j2'} dest={dest}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert dest.read_bytes() == GOLDEN.read_bytes()
