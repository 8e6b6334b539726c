#!/usr/bin/env bash
# Ansible Vault password client for vault-id `prod` (Makefile: VAULT_ARGS =
# --vault-id prod@scripts/vault-password.sh). Prints the password on stdout:
#   1. from the file named by $BOMA_VAULT_PASSWORD_FILE, if set (CI, scripted runs);
#   2. else from the password manager: `rbw get boma-ansible-vault`;
#   3. else one clear line on stderr and exit 1.
# Tests never need it: they run with tests/vault/test-values.yml (docs/runbooks/vault.md).
set -euo pipefail

err() { echo "vault-password: $*" >&2; exit 1; }

if [ -n "${BOMA_VAULT_PASSWORD_FILE:-}" ]; then
  [ -r "$BOMA_VAULT_PASSWORD_FILE" ] || err "BOMA_VAULT_PASSWORD_FILE=$BOMA_VAULT_PASSWORD_FILE is not a readable file"
  password=$(head -n 1 "$BOMA_VAULT_PASSWORD_FILE")
  [ -n "$password" ] || err "BOMA_VAULT_PASSWORD_FILE=$BOMA_VAULT_PASSWORD_FILE is empty"
  printf '%s\n' "$password"
  exit 0
fi

if command -v rbw >/dev/null 2>&1; then
  password=$(rbw get boma-ansible-vault 2>/dev/null) \
    || err "'rbw get boma-ansible-vault' failed: run 'rbw unlock' (and check the entry exists), or set BOMA_VAULT_PASSWORD_FILE"
  [ -n "$password" ] || err "rbw entry boma-ansible-vault is empty"
  printf '%s\n' "$password"
  exit 0
fi

err "no vault password: set BOMA_VAULT_PASSWORD_FILE=<file> or install rbw with an entry 'boma-ansible-vault'"
