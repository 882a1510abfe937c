#!/bin/bash
# workspace-desktop: the browser desktop. TigerVNC's Xvnc on display :1 (TCP 5901, VNC password auth, never
# published on the host: Guacamole's guacd reaches it on the services network) running the user's desktop session
# (WORKSPACE_DESKTOP: kde, the default, or xfce). Run by supervisord as the user; exits when either half dies, so
# supervisord restarts both. X2Go sessions are separate (their own displays from :50, started over SSH).
set -euo pipefail

DISPLAY_NUM=1
PORT=5901
PASSWD=/run/train-server/vnc.passwd # made by the entrypoint from /run/secrets/vnc-password (0600, the user's)
GEOMETRY=${WORKSPACE_DESKTOP_GEOMETRY:-1920x1080}

die() { printf 'workspace-desktop: %s\n' "$*" >&2; exit 1; }

[[ -s $PASSWD ]] || die "$PASSWD is missing: the browser desktop needs the VNC password (mount /run/secrets/vnc-password)"
case ${WORKSPACE_DESKTOP:-kde} in
  kde) session=(startplasma-x11) ;;
  xfce) session=(startxfce4) ;;
  *) die "WORKSPACE_DESKTOP=${WORKSPACE_DESKTOP}: must be kde or xfce (stack config workspace.desktop)" ;;
esac

# a stale lock or socket of a killed server would keep Xvnc from starting on :1
rm -f "/tmp/.X${DISPLAY_NUM}-lock" "/tmp/.X11-unix/X${DISPLAY_NUM}"

Xvnc ":${DISPLAY_NUM}" -rfbport "$PORT" -rfbauth "$PASSWD" -SecurityTypes VncAuth -localhost=0 \
  -geometry "$GEOMETRY" -depth 24 -desktop "${USER:-workspace}" -AlwaysShared -nolisten tcp &
xvnc=$!
for _ in $(seq 1 100); do
  [[ -S /tmp/.X11-unix/X${DISPLAY_NUM} ]] && break
  kill -0 "$xvnc" 2>/dev/null || die "Xvnc exited before its display was up"
  sleep 0.1
done
[[ -S /tmp/.X11-unix/X${DISPLAY_NUM} ]] || die "Xvnc's display :${DISPLAY_NUM} did not come up in 10 s"

export DISPLAY=":${DISPLAY_NUM}" XDG_SESSION_TYPE=x11 XDG_RUNTIME_DIR=/run/user/${UID}
# the session's chatter goes where X sessions keep it (the user's ~/.xsession-errors), not into the container log
dbus-run-session -- "${session[@]}" >>"$HOME/.xsession-errors" 2>&1 &
desktop=$!
trap 'kill "$desktop" "$xvnc" 2>/dev/null || true' TERM INT EXIT
wait -n "$xvnc" "$desktop" || true
exit 1
