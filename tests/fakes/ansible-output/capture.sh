#!/bin/bash
# Save ansible outputs of both strategies from one live VM (run inside the sandbox).
set -u
cd /work/main
R=tests/integration/.run/boma-it-askari-beaf101f
OUT=/work/notes/outputs; mkdir -p $OUT
SSH="ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=$R/known_hosts -o GlobalKnownHostsFile=/dev/null -o HostKeyAlias=boma-it-askari-beaf101f -o IdentitiesOnly=yes -i $R/id_ed25519 ansible@192.168.150.71"
D=".venv/bin/python scripts/integration-vm.py"
for s in default mitogen; do
  t0=$(date +%s.%N); $D assert --host askari --strategy $s > /dev/null 2>&1; echo "assert $s rc=$? $(echo "$(date +%s.%N) - $t0" | bc)s"
  cp $R/logs/verify.log $OUT/$s.verify-pass.txt
done
# break: drop the docker forward drop-in and reload the firewall -> verify fails
$SSH 'sudo rm -f /etc/nftables.d/10-docker-forward.nft && sudo systemctl reload nftables' ; echo broke $?
for s in default mitogen; do
  $D assert --host askari --strategy $s > /dev/null 2>&1; echo "assert-broken $s rc=$?"
  cp $R/logs/verify.log $OUT/$s.verify-fail.txt
  # apply with changes: re-apply offsite fixes the drop-in (changed), then break again for the next
  $D apply --host askari --strategy $s > /dev/null 2>&1; echo "apply $s rc=$?"
  cp $R/logs/apply-offsite.yml.log $OUT/$s.apply-changed.txt
  cp $R/logs/apply-site.yml.log $OUT/$s.apply-site.txt
  $SSH 'sudo rm -f /etc/nftables.d/10-docker-forward.nft && sudo systemctl reload nftables'
done
