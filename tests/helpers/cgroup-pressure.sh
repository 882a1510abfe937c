#!/usr/bin/env bash
# Memory pressure on a cgroup v2 hierarchy shaped like the real host's, run as root inside the test VM
# (tests/host/workspace-memory.test.ts; the VM's own kernel, cgroup2 mounted here, a swap disk).
#
#   /sys/fs/cgroup/<slice>            memory.low = SLICE_LOW (0 in the control phases: today's system.slice)
#   ├── wsA.scope                     memory.low/max/swap.max = A_LOW/A_MAX/A_SWAP  (the protected workspace)
#   │   └── inner                     (phases with nested=1: the working set sits here, no memory.low of its own,
#   │                                  as a workspace's processes under its own init / nested containers do)
#   └── wsB.scope                     memory.low/max/swap.max = B_LOW/B_MAX/B_SWAP  (the noisy neighbour)
#
# A holds a working set of exactly A_LOW bytes (random data, touched once, then idle: the coldest memory of the
# machine, the first to go without protection); B allocates B_ALLOC_MB, past the VM's free RAM. A's
# memory.current is sampled every 0.2 s meanwhile. Prints key=value lines per phase: <phase>.<key>=<value>.
# Then the cpuset check: a child of a cgroup with cpuset.cpus=A_CPUSET cannot run outside it.
#
# Inputs: SWAP_DEV SLICE_LOW A_LOW A_MAX A_SWAP B_LOW B_MAX B_SWAP B_ALLOC_MB A_CPUSET
set -euo pipefail
: "${SWAP_DEV:?}" "${SLICE_LOW:?}" "${A_LOW:?}" "${A_MAX:?}" "${A_SWAP:?}" "${B_LOW:?}" "${B_MAX:?}" "${B_SWAP:?}" "${B_ALLOC_MB:?}" "${A_CPUSET:?}"
CG=/sys/fs/cgroup
log() { printf '[pressure] %s\n' "$*" >&2; }
out() { printf '%s=%s\n' "$1" "$2"; }

mountpoint -q "$CG" || mount -t cgroup2 -o memory_recursiveprot none "$CG"
mkswap -q "$SWAP_DEV" >/dev/null
swapon "$SWAP_DEV"
echo "+memory +cpuset" >"$CG/cgroup.subtree_control"
out vm.mem_total_kb "$(awk '/^MemTotal/ { print $2 }' /proc/meminfo)"
out vm.swap_total_kb "$(awk '/^SwapTotal/ { print $2 }' /proc/meminfo)"
out vm.zswap "$(cat /sys/module/zswap/parameters/enabled 2>/dev/null || echo absent)"

# recursiveprot 1|0: remount the hierarchy with or without memory_recursiveprot, and check it took
recursiveprot() {
  # the hierarchy's flags are those of its latest mount (libmount's remount re-passes the current options, so
  # clearing one takes a fresh mount of the same hierarchy beside it)
  mkdir -p /tmp/cg2-flags
  if (($1)); then mount -t cgroup2 -o memory_recursiveprot none /tmp/cg2-flags; else mount -t cgroup2 none /tmp/cg2-flags; fi
  umount /tmp/cg2-flags
  local have=0
  if findmnt -n -o OPTIONS "$CG" | tr , '\n' | grep -qx memory_recursiveprot; then have=1; fi
  ((have == $1)) || { log "memory_recursiveprot is $have, wanted $1"; exit 1; }
}

stat_of() { awk -v k="$2" '$1 == k { print $2 }' "$1/memory.stat"; }

# phase NAME SLICE_NAME SLICE_LOW RECURSIVEPROT NESTED
phase() {
  local name=$1 slice=$CG/$2 slice_low=$3 nested=$5 a b a_set a_pid b_pid cur min=-1 before t0 done_=0
  recursiveprot "$4"
  mkdir "$slice"
  echo "+memory" >"$slice/cgroup.subtree_control"
  echo "$slice_low" >"$slice/memory.low"
  a=$slice/wsA.scope b=$slice/wsB.scope
  mkdir "$a" "$b"
  echo "$A_LOW" >"$a/memory.low"; echo "$A_MAX" >"$a/memory.max"; echo "$A_SWAP" >"$a/memory.swap.max"
  echo "$B_LOW" >"$b/memory.low"; echo "$B_MAX" >"$b/memory.max"; echo "$B_SWAP" >"$b/memory.swap.max"
  a_set=$a
  if ((nested)); then
    echo "+memory" >"$a/cgroup.subtree_control"
    mkdir "$a/inner"
    a_set=$a/inner
  fi

  # A: exactly A_LOW bytes of random data, then idle
  rm -f /tmp/a.ready /tmp/b.done
  bash -c 'echo $$ >"$1/cgroup.procs"; exec perl -e '\''
    open(my $f, "<", "/dev/urandom") or die; my $x = ""; my $n = $ARGV[0];
    while (length($x) < $n) { my $r = sysread($f, $x, $n - length($x) > 4194304 ? 4194304 : $n - length($x), length($x)); die "read" unless $r; }
    open(my $o, ">", "/tmp/a.ready"); close $o; sleep 100000;'\'' "$2"' _ "$a_set" "$A_LOW" &
  a_pid=$!
  for _ in $(seq 600); do [[ -e /tmp/a.ready ]] && break; sleep 0.2; done
  [[ -e /tmp/a.ready ]] || { log "$name: A never got its working set"; exit 1; }
  sleep 1
  before=$(cat "$a/memory.current")

  # B: B_ALLOC_MB in 8 MiB chunks, touched, kept
  bash -c 'echo $$ >"$1/cgroup.procs"; exec perl -e '\''
    open(my $f, "<", "/dev/zero") or die; my @keep; my $c = 8 * 1048576;
    for (1 .. $ARGV[0] / 8) { my $x = ""; sysread($f, $x, $c) == $c or die "read"; substr($x, $_ * 4096, 1) = "b" for 0 .. $c / 4096 - 1; push @keep, $x; }
    open(my $o, ">", "/tmp/b.done"); close $o; sleep 100000;'\'' "$2"' _ "$b" "$B_ALLOC_MB" &
  b_pid=$!
  t0=$SECONDS
  while ((SECONDS - t0 < 300)); do
    cur=$(cat "$a/memory.current")
    if ((min < 0 || cur < min)); then min=$cur; fi
    if [[ -e /tmp/b.done ]]; then done_=1; break; fi
    kill -0 "$b_pid" 2>/dev/null || break
    sleep 0.2
  done
  for _ in 1 2 3 4 5; do
    cur=$(cat "$a/memory.current")
    if ((cur < min)); then min=$cur; fi
    sleep 0.4
  done
  out "$name.slice" "${slice##*/}"
  out "$name.slice_low" "$(cat "$slice/memory.low")"
  out "$name.recursiveprot" "$4"
  out "$name.nested" "$nested"
  out "$name.a_low" "$(cat "$a/memory.low")"
  out "$name.a_max" "$(cat "$a/memory.max")"
  out "$name.a_before" "$before"
  out "$name.a_min" "$min"
  out "$name.a_after" "$(cat "$a/memory.current")"
  out "$name.a_anon" "$(stat_of "$a" anon)"
  out "$name.a_swap" "$(cat "$a/memory.swap.current")"
  out "$name.a_low_events" "$(awk '$1 == "low" { print $2 }' "$a/memory.events")"
  out "$name.b_low" "$(cat "$b/memory.low")"
  out "$name.b_max" "$(cat "$b/memory.max")"
  out "$name.b_done" "$done_"
  out "$name.b_current" "$(cat "$b/memory.current")"
  out "$name.b_swap" "$(cat "$b/memory.swap.current")"
  out "$name.b_oom_kill" "$(awk '$1 == "oom_kill" { print $2 }' "$b/memory.events")"
  out "$name.slice_current" "$(cat "$slice/memory.current")"
  out "$name.seconds" "$((SECONDS - t0))"
  kill "$a_pid" "$b_pid" 2>/dev/null || true
  wait "$a_pid" "$b_pid" 2>/dev/null || true
  if ((nested)); then rmdir "$a/inner"; fi
  rmdir "$a" "$b" "$slice"
}

for p in ${PHASES:-guarded control nested-guarded nested-unguarded}; do
  case $p in
    guarded) phase guarded trainws.slice "$SLICE_LOW" 1 0 ;;           # the rendered slice, Ubuntu's mount options
    control) phase control system.slice 0 1 0 ;;                        # today: protection on the scope only
    nested-guarded) phase nested-guarded trainws.slice "$SLICE_LOW" 1 1 ;;
    nested-unguarded) phase nested-unguarded trainws.slice "$SLICE_LOW" 0 1 ;; # without memory_recursiveprot
  esac
done

# cpuset: a child cgroup (a nested container) cannot widen its parent's CPUs
c=$CG/trainws.slice
mkdir "$c" && echo "+cpuset" >"$c/cgroup.subtree_control"
mkdir "$c/wsA.scope" && echo "$A_CPUSET" >"$c/wsA.scope/cpuset.cpus"
echo "+cpuset" >"$c/wsA.scope/cgroup.subtree_control"
mkdir "$c/wsA.scope/nested"
all=$(cat "$CG/cpuset.cpus.effective")
echo "$all" >"$c/wsA.scope/nested/cpuset.cpus"
out cpuset.host "$all"
out cpuset.workspace "$(cat "$c/wsA.scope/cpuset.cpus.effective")"
out cpuset.nested_asked "$(cat "$c/wsA.scope/nested/cpuset.cpus")"
out cpuset.nested_effective "$(cat "$c/wsA.scope/nested/cpuset.cpus.effective")"
# a process in the nested cgroup: its affinity, and whether it may move itself onto CPU 0
# shellcheck disable=SC2016 # expanded by the inner bash
out cpuset.nested_affinity "$(bash -c 'echo $$ >"$1/cgroup.procs"; taskset -cp $$ | sed "s/.*: //"' _ "$c/wsA.scope/nested")"
# shellcheck disable=SC2016
if bash -c 'echo $$ >"$1/cgroup.procs"; taskset -cp 0 $$' _ "$c/wsA.scope/nested" >/dev/null 2>&1; then
  out cpuset.nested_move_to_0 allowed
else
  out cpuset.nested_move_to_0 refused
fi
rmdir "$c/wsA.scope/nested" "$c/wsA.scope" "$c"
swapoff "$SWAP_DEV"
