#!/usr/bin/env bash
# GPU check of the running workspaces (needs an NVIDIA GPU; tests/run.sh runs it only where `nvidia-smi -L` works,
# and it is meant to be run by hand on the server after a deploy or a driver update):
#   bash tests/gpu/check.sh [-H docker-host] [workspace-<user>=<i,j|all> ...]
# For every running workspace container (name workspace-*), as its user:
#   - `nvidia-smi -L` lists exactly the configured GPUs: the host's GPUs of the container's /dev/nvidia<i> device
#     nodes (components/render/workspace-security.ts renders them from users[].gpus), matched by UUID with the
#     host's `nvidia-smi -L`; an argument workspace-alice=1 or =all asserts the configuration explicitly;
#   - a small CUDA matmul runs in PyTorch, TensorFlow and JAX (venvs /opt/venvs/{torch,tensorflow,jax}).
# Exit 0: all passed; 1: a check failed; 3: nothing checked (no GPU here, or no workspace running).
set -uo pipefail
DOCKER=(docker)
if [[ ${1:-} == -H ]]; then DOCKER+=(-H "$2"); shift 2; fi
declare -A want=()
for a in "$@"; do want[${a%%=*}]=${a#*=}; done

if ! host_list=$(nvidia-smi -L 2>/dev/null) || [[ -z $host_list ]]; then
  echo "gpu-check: NOT RUN: no NVIDIA GPU here (nvidia-smi -L fails)"; exit 3
fi
mapfile -t names < <("${DOCKER[@]}" ps --format '{{.Names}}' | grep '^workspace-' | sort)
if ((${#names[@]} == 0)); then echo "gpu-check: NOT RUN: no workspace container is running here"; exit 3; fi
host_uuid() { sed -n "s/^GPU $1: .*(UUID: \(GPU-[^)]*\)).*/\1/p" <<<"$host_list"; }
count=$(grep -c '^GPU ' <<<"$host_list")

failed=0 passed=0
ok() { echo "ok   $*"; passed=$((passed + 1)); }
bad() { echo "FAIL $*"; failed=$((failed + 1)); }

declare -A matmul=()
matmul[torch]='import torch; a=torch.randn(512,512,device="cuda"); b=(a@a.T).sum().item(); print("torch", torch.cuda.device_count(), b==b)'
matmul[tensorflow]='import tensorflow as tf; g=tf.config.list_physical_devices("GPU"); assert g, "no GPU"
with tf.device("/GPU:0"): a=tf.random.normal((512,512)); s=float(tf.reduce_sum(tf.matmul(a,a,transpose_b=True)))
print("tensorflow", len(g), s==s)'
matmul[jax]='import jax, jax.numpy as jnp; d=jax.devices(); assert d[0].platform=="gpu", d; a=jax.random.normal(jax.random.PRNGKey(0),(512,512)); print("jax", len(d), bool(jnp.isfinite(jnp.dot(a,a.T).sum())))'

for c in "${names[@]}"; do
  user=$("${DOCKER[@]}" inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$c" | sed -n 's/^WORKSPACE_USER=//p')
  # the configured GPUs: the /dev/nvidia<i> nodes the container was given (or the explicit argument)
  mapfile -t idx < <("${DOCKER[@]}" inspect -f '{{range .HostConfig.Devices}}{{println .PathInContainer}}{{end}}' "$c" | sed -n 's|^/dev/nvidia\([0-9]\+\)$|\1|p' | sort -n)
  if [[ -n ${want[$c]+x} ]]; then
    if [[ ${want[$c]} == all ]]; then mapfile -t exp < <(seq 0 $((count - 1))); else mapfile -t exp < <(tr ',' '\n' <<<"${want[$c]}" | sort -n); fi
    if [[ "${idx[*]}" == "${exp[*]}" ]]; then ok "$c: device nodes are GPUs ${exp[*]}"; else bad "$c: device nodes are GPUs '${idx[*]}', configured '${exp[*]}'"; fi
  fi
  if ((${#idx[@]} == 0)); then ok "$c ($user): no GPU configured, nothing more to check"; continue; fi
  expected=$(for i in "${idx[@]}"; do host_uuid "$i"; done | sort)
  seen=$("${DOCKER[@]}" exec -u "$user" "$c" nvidia-smi -L 2>&1 | sed -n 's/.*(UUID: \(GPU-[^)]*\)).*/\1/p' | sort)
  if [[ -n $seen && $seen == "$expected" ]]; then
    ok "$c ($user): nvidia-smi -L lists exactly GPUs ${idx[*]}"
  else
    bad "$c ($user): nvidia-smi -L lists [$(tr '\n' ' ' <<<"$seen")], expected GPUs ${idx[*]} [$(tr '\n' ' ' <<<"$expected")]"
  fi
  for fw in torch tensorflow jax; do
    out=$("${DOCKER[@]}" exec -u "$user" "$c" timeout 300 "/opt/venvs/$fw/bin/python" -c "${matmul[$fw]}" 2>&1 | tail -1)
    if [[ $out == "$fw ${#idx[@]} True" ]]; then ok "$c ($user): CUDA matmul in $fw on ${#idx[@]} GPU(s)"; else bad "$c ($user): $fw matmul: $out"; fi
  done
done
echo "$passed passed, $failed failed"
((failed == 0))
