#!/usr/bin/env bash
# CI's SSH reach to the server. Both the remote commands (Go SSH client, connection from the stack config) and
# the Docker provider (system ssh + agent) dial host.address:host.sshPort exactly as the admin's machine does,
# so the connection inputs never differ between CI and a laptop (a differing connection would re-run every step).
#  - Self-hosted runner on the server's LAN (vars.PREVIEW_RUNNER): only the key and known_hosts are set up.
#  - Hosted runner, zero open ports: TRAIN_SERVER_SSH_HOSTNAME names an SSH route of the Cloudflare Tunnel
#    guarded by Access with a service token; `cloudflared access tcp` listens on host.address:sshPort (the address
#    is added to the loopback interface) and carries the connection through the tunnel.
#    The route, its Access application and its service token are the program's (stack config cloudflare.ciSsh;
#    `pulumi stack output --show-secrets ciSsh` gives the hostname and the token for the CF_ACCESS_CLIENT_* secrets).
# Inputs (env): SSH_KEY, SSH_KNOWN_HOSTS (for this script's own probe: the program pins host.hostKey itself), and
# for the tunnel: SSH_HOSTNAME, SSH_ADDRESS (host.address, an IP), SSH_PORT (host.sshPort), SSH_USER (host.sshUser:
# the probe logs in as the program does, not as the runner's account), CF_ACCESS_CLIENT_ID, CF_ACCESS_CLIENT_SECRET.
set -euo pipefail
: "${SSH_KEY:?set the TRAIN_SERVER_SSH_KEY secret}" "${SSH_KNOWN_HOSTS:?set the TRAIN_SERVER_KNOWN_HOSTS secret}"
mkdir -p ~/.ssh && chmod 700 ~/.ssh
printf '%s\n' "$SSH_KNOWN_HOSTS" >>~/.ssh/known_hosts
# the Docker provider uses the system ssh and its agent (it has no private-key argument)
eval "$(ssh-agent -s)"
ssh-add - <<<"$SSH_KEY"
{ echo "SSH_AUTH_SOCK=$SSH_AUTH_SOCK"; echo "SSH_AGENT_PID=$SSH_AGENT_PID"; } >>"$GITHUB_ENV"
[[ -n ${SSH_HOSTNAME:-} ]] || exit 0
: "${SSH_ADDRESS:?}" "${SSH_PORT:?}" "${SSH_USER:?set the TRAIN_SERVER_SSH_USER variable (host.sshUser)}"
: "${CF_ACCESS_CLIENT_ID:?}" "${CF_ACCESS_CLIENT_SECRET:?}"
curl -fsSL -o /tmp/cloudflared.deb https://github.com/cloudflare/cloudflared/releases/download/2024.10.1/cloudflared-linux-amd64.deb
sudo dpkg -i /tmp/cloudflared.deb
sudo ip addr add "$SSH_ADDRESS/32" dev lo
sudo -b cloudflared access tcp --hostname "$SSH_HOSTNAME" --url "$SSH_ADDRESS:$SSH_PORT" \
  --service-token-id "$CF_ACCESS_CLIENT_ID" --service-token-secret "$CF_ACCESS_CLIENT_SECRET" --loglevel warn
for _ in $(seq 30); do
  ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -p "$SSH_PORT" "$SSH_USER@$SSH_ADDRESS" true 2>/dev/null && exit 0
  sleep 1
done
echo "the server is not reachable through the tunnel at $SSH_USER@$SSH_ADDRESS:$SSH_PORT (route $SSH_HOSTNAME)" >&2
exit 1
