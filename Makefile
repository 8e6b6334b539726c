# boma — the front door. `make help` lists every target.
#
# Variables (override on the command line):
#   VENV          virtualenv with the pinned tools (requirements.txt)
#   PLAYBOOK_BIN  ansible-playbook from the venv
#   INVENTORY     inventory for deploys (the real fleet)
#   VAULT_ARGS    how deploys unlock the vault (scripts/vault-password.sh reads rbw or a file)
#   ROLE          role for test-role
#   PLAYBOOK      playbook for deploy (file name under playbooks/)
#   LIMIT, TAGS   narrow a deploy
#   HOST          profile for test-integration (tests/integration/profiles/<HOST>.json)
#   CERTS         cert tier for test-integration: internal | le-staging | le-prod-wildcard
#   KEEP=1        keep the integration VM after the run
#   FROM=REF      day 2 (test-integration, -loop): apply git REF first, then the working tree on top
#   ALLOW_PROD_CERTS=1  required with CERTS=le-prod-wildcard (an accepted risk)
#   SANDBOX       auto | netns | none — how test-integration reaches libvirt (see below)

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON        ?= python3
VENV          ?= .venv
PLAYBOOK_BIN  ?= $(VENV)/bin/ansible-playbook
INVENTORY     ?= inventories/production
VAULT_ARGS    ?= --vault-id prod@scripts/vault-password.sh
ROLE          ?=
PLAYBOOK      ?=
LIMIT         ?=
TAGS          ?=
HOST          ?=
CERTS         ?=
KEEP          ?=
ALLOW_PROD_CERTS ?=
IT_FLAGS       = $(if $(CERTS),--certs $(CERTS)) $(if $(KEEP),--keep) $(if $(ALLOW_PROD_CERTS),--allow-prod-certs)
SANDBOX       ?= auto
ROLES         := $(notdir $(wildcard roles/*))
# Every shell script: shellcheck reads them in `make lint` (ruff.toml says which Python).
SHELL_SCRIPTS := .ci/run scripts/it-run scripts/it-leftovers scripts/docker-engine $(wildcard scripts/*.sh) \
                 $(wildcard roles/*/files/*.sh)
VENV_STAMP    := $(VENV)/.installed-$(shell sha256sum requirements.txt | cut -c1-12)
export PATH   := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: help venv lint test test-unit coverage test-role test-all new-role deploy docker-engine molecule-image \
        substrate test-integration test-integration-loop test-integration-red test-integration-control test-vm test-integration-clean \
        bench-integration integration-status integration-doctor test-report

help: ## List every target
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[1m%-24s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV_STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

venv: $(VENV_STAMP) ## Create .venv with the pinned tools (re-runs when requirements.txt changes)

lint: venv ## yamllint, ansible-lint (production profile), tag vocabulary, ruff (lint + format), shellcheck (all from the venv)
	$(VENV)/bin/yamllint -s .
	$(VENV)/bin/ansible-lint
	$(VENV)/bin/python scripts/check-tags.py
	$(VENV)/bin/ruff check
	$(VENV)/bin/ruff format --check
	$(VENV)/bin/shellcheck $(SHELL_SCRIPTS)

# Two workers per core: many tests spend their time waiting out a bound (a fake that
# never answers), and meanwhile a core runs another worker's test. worksteal: the last
# long tests do not wait behind one worker's queue.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) * 2 )))
# The tests write thousands of small files (a repo per test, the fakes' state and logs):
# on tmpfs when there is one with room (1 GiB free: a container's 64 MiB is not), and
# only a failed test's are kept.
TEST_TMPDIR ?= $(shell [ -w /dev/shm ] && [ "$$(df -Pk /dev/shm | awk 'NR==2 {print $$4}')" -gt 1048576 ] \
	&& echo /dev/shm || echo $${TMPDIR:-/tmp})
UNIT_PYTEST_ARGS = -q -n $(TEST_WORKERS) --dist worksteal -o tmp_path_retention_policy=failed tests
# Bytecode is kept even where PYTHONDONTWRITEBYTECODE is set (as on this machine kind), but
# in the venv, never in the tree: every worker otherwise re-does pytest's assertion
# rewrite of each test module, ~3 CPU-s of a run.
UNIT_TEST_ENV = TMPDIR=$(TEST_TMPDIR) PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(abspath $(VENV))/pycache

test-unit: venv ## pytest unit tests (no hypervisor, no Docker), two workers per core
	$(UNIT_TEST_ENV) $(VENV)/bin/pytest $(UNIT_PYTEST_ARGS)

test: test-unit lint ## Unit tests + lint: what CI and the README run first

test-report: venv ## report.html in headless Chromium (a fake pass and a fake red); screenshots in tests/integration/.run/report-screens/
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "test-report: needs Debian's chromium: sudo apt-get install chromium" >&2; exit 2; fi; }
	$(UNIT_TEST_ENV) $(VENV)/bin/pytest -q -s -m browser -p no:cacheprovider tests/test_report_browser.py

coverage: venv ## Unit tests under coverage.py (the driver's subprocesses too): total and per-file figures
	rm -f .coverage .coverage.*
	$(UNIT_TEST_ENV) COVERAGE_FILE=$(CURDIR)/.coverage $(VENV)/bin/coverage run -m pytest $(UNIT_PYTEST_ARGS)
	$(VENV)/bin/coverage combine -q
	$(VENV)/bin/coverage report

docker-engine: ## Make sure a Docker engine answers (installs docker.io as root, starts dockerd where there is no systemd)
	scripts/docker-engine

molecule-image: docker-engine ## Build the local systemd Debian 13 image Molecule runs roles in (no registry)
	scripts/build-molecule-image.sh

test-role: venv molecule-image ## Molecule default scenario for one role: make test-role ROLE=base
	@test -n "$(ROLE)" || { echo "usage: make test-role ROLE=<$(ROLES: =|)>" >&2; exit 2; }
	@test -d roles/$(ROLE) || { echo "test-role: no role roles/$(ROLE)" >&2; exit 2; }
	cd roles/$(ROLE) && molecule test

test-all: venv molecule-image ## Molecule default scenario for every role
	@set -e; for r in $(ROLES); do echo "=== molecule: $$r"; (cd roles/$$r && molecule test); done

new-role: ## Scaffold a role in house style: make new-role NAME=x
	@test -n "$(NAME)" || { echo "usage: make new-role NAME=<role_name>" >&2; exit 2; }
	$(PYTHON) scripts/new-role.py $(NAME)

deploy: venv ## Apply a playbook to the real fleet: make deploy PLAYBOOK=site.yml [LIMIT=..] [TAGS=..]
	@test -n "$(PLAYBOOK)" || { echo "usage: make deploy PLAYBOOK=<site.yml|offsite.yml|workstation.yml> [LIMIT=host] [TAGS=a,b]" >&2; exit 2; }
	@test -f playbooks/$(PLAYBOOK) || { echo "deploy: no playbook playbooks/$(PLAYBOOK)" >&2; exit 2; }
	$(PLAYBOOK_BIN) -i $(INVENTORY) $(VAULT_ARGS) playbooks/$(PLAYBOOK) \
	  $(if $(LIMIT),--limit $(LIMIT)) $(if $(TAGS),--tags $(TAGS))

# --- Local VM integration tests (ADR-025) ------------------------------------------
# scripts/it-run wraps the driver: it installs the substrate when it is missing and, on a
# machine without systemd (containers, CI sandboxes), runs libvirtd and the driver inside
# a network namespace the run creates and removes (SANDBOX=netns; auto picks it there).
IT_RUN = SANDBOX=$(SANDBOX) scripts/it-run

substrate: venv ## Install/start the libvirt substrate on this machine (integration_test role)
	$(IT_RUN) --substrate-only

test-integration: venv ## Boot a VM as HOST, apply, reboot, verify: make test-integration HOST=askari [CERTS=..] [KEEP=1]
	@test -n "$(HOST)" || { echo "usage: make test-integration HOST=<profile> [CERTS=internal|le-staging|le-prod-wildcard] [KEEP=1]" >&2; exit 2; }
	$(IT_RUN) cycle --host $(HOST) $(IT_FLAGS) $(if $(FROM),--from $(FROM))

test-integration-loop: venv ## Quick loop after an edit: onto the last loop's VM (else a checkpoint), apply what changed, one reboot, verify; VM stays up (NOT the gate). FRESH=1: from a checkpoint
	@test -n "$(HOST)" || { echo "usage: make test-integration-loop HOST=<profile> [CERTS=..] [FRESH=1] [FROM=ref]" >&2; exit 2; }
	$(IT_RUN) loop --host $(HOST) $(if $(CERTS),--certs $(CERTS)) $(if $(FROM),--from $(FROM)) $(if $(FRESH),--fresh)

test-integration-red: venv ## RED: HOST-regression (askari: no docker forward drop-in; ubongo: no harness-network drop-in) must FAIL verify (live, right after the applies) for the right reason
	@test -n "$(HOST)" || { echo "usage: make test-integration-red HOST=askari|ubongo" >&2; exit 2; }
	BOMA_IT_E2E_HOST=$(HOST) $(IT_RUN) exec -- $(CURDIR)/$(VENV)/bin/pytest -m vm -p no:cacheprovider \
	  $(if $(filter ubongo,$(HOST)),-k red tests/e2e/test_control_node_red_green.py,-k regression tests/e2e)

test-integration-control: venv ## The control node RED→GREEN in one pytest call: ubongo (base's firewall live, the harness network, a namespace guest) through both reboots, and ubongo-regression must fail at the guest
	$(IT_RUN) exec -- $(CURDIR)/$(VENV)/bin/pytest -m vm -p no:cacheprovider tests/e2e/test_control_node_red_green.py

test-integration-day2: venv ## Day 2 RED→GREEN: a change applied with --from HEAD to a running host (a clone; never the working tree)
	BOMA_IT_E2E_HOST=$(or $(HOST),askari) $(IT_RUN) exec -- $(CURDIR)/$(VENV)/bin/pytest -m vm -p no:cacheprovider tests/e2e/test_day2_red_green.py

test-integration-image: venv ## The golden image on a real VM: the provider's package list, its timers, its own GRUB, a kernel change that the next boot runs; and a RED only that image shows
	BOMA_IT_E2E_HOST=$(or $(HOST),askari) $(IT_RUN) exec -- $(CURDIR)/$(VENV)/bin/pytest -m vm -p no:cacheprovider tests/e2e/test_golden_image_vm.py tests/e2e/test_faithful_image_red_green.py

test-vm: venv ## RED and GREEN on real VMs in one pytest run (tests/e2e, marker vm; HOST=askari)
	BOMA_IT_E2E_HOST=$(or $(HOST),askari) $(IT_RUN) exec -- $(CURDIR)/$(VENV)/bin/pytest -m vm -p no:cacheprovider tests/e2e

test-integration-clean: venv ## Remove every VM, overlay, seed and run file the harness owns
	$(IT_RUN) prune

integration-status: venv ## List the harness's VMs, runs and golden images with their age
	$(IT_RUN) status

integration-doctor: venv ## Preflight: tools, libvirtd, accelerator, /dev/kvm, RAM, disk
	$(IT_RUN) doctor

bench-integration: venv ## Cold cycle (+ transport per call, linear vs Mitogen), quick loop and warm cycle after one role edit, side by side: make bench-integration HOST=askari
	@test -n "$(HOST)" || { echo "usage: make bench-integration HOST=<profile>" >&2; exit 2; }
	$(IT_RUN) bench --host $(HOST) $(IT_FLAGS)
