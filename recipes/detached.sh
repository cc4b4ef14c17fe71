#!/usr/bin/env bash
# Work longer than one command on a lent GPU machine (10 minutes a command): start it detached, then poll it from
# calls made back to back, each of which copies what is ready into its OUT.
#
#   recipes/detached.sh start NAME -- COMMAND [ARG ...]   # COMMAND runs detached in the current folder; its output
#                                                         # goes to runs/detached/NAME/log, its exit status to .../rc
#   recipes/detached.sh poll NAME [SECONDS] [FILE ...]    # wait up to SECONDS (default 540) for NAME to end, print
#                                                         # its state and the log's last lines, copy FILEs into $OUT
#                                                         # (quote a pattern, 'runs/x/*.part-*': it is expanded
#                                                         # after the wait, when the files may have been made)
#   recipes/detached.sh state NAME
#
# `start` makes every folder it needs (a fresh machine has no runs/) and does nothing when NAME was started before,
# so one line can serve every call: `recipes/detached.sh start N -- CMD; recipes/detached.sh poll N 540 F...`.
# poll exits 0 while NAME runs, with its status once it has ended, 1 when it is gone without one (killed, or the
# machine was not the one that started it).
set -u

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1 name=$2
shift 2
case "$name" in */* | .* | "") echo "detached.sh: NAME must be a plain name, not '$name'" >&2; exit 2 ;; esac
dir=runs/detached/$name

state() {
  if [ -f "$dir/rc" ]; then echo "ended, status $(cat "$dir/rc")"
  elif [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then echo "running"
  elif [ -f "$dir/pid" ]; then echo "gone without a status"
  else echo "not started"
  fi
}

case "$action" in
start)
  [ "${1:-}" = "--" ] && shift
  [ $# -gt 0 ] || { echo "detached.sh: no command to start" >&2; exit 2; }
  mkdir -p "$dir"
  if [ -f "$dir/pid" ]; then echo "$name: started before; $(state)"; exit 0; fi
  printf '%q ' "$@" > "$dir/command"
  date -u +%FT%TZ > "$dir/started"
  # the status is written by the detached shell itself, so it is there even when no poll is running
  setsid nohup bash -c 'd=$1; shift; "$@"; echo $? > "$d/rc"' _ "$dir" "$@" > "$dir/log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  echo "$name: started (pid $!); log $dir/log"
  ;;
poll)
  seconds=${1:-540}
  [ $# -gt 0 ] && shift
  case "$seconds" in '' | *[!0-9]*) echo "detached.sh: SECONDS must be a whole number, not '$seconds'" >&2; exit 2 ;; esac
  end=$((SECONDS + seconds))
  while [ "$(state)" = running ] && [ $SECONDS -lt "$end" ]; do sleep 2; done
  now=$(state)
  echo "$name: $now"
  [ -f "$dir/log" ] && tail -n 20 "$dir/log"
  if [ $# -gt 0 ]; then
    if [ -z "${OUT:-}" ]; then
      echo "detached.sh: OUT is not set; nothing copied" >&2
    else
      mkdir -p "$OUT"
      for pattern in "$@"; do  # a quoted pattern is expanded now, after the wait, not when the line was read
        found=0
        for f in $pattern; do
          if [ -f "$f" ]; then cp "$f" "$OUT/"; found=1; fi
        done
        [ $found = 1 ] || echo "detached.sh: $pattern: not there (yet)" >&2
      done
    fi
  fi
  case "$now" in
    running) exit 0 ;;
    "ended, status "*) exit "${now#ended, status }" ;;
    *) exit 1 ;;
  esac
  ;;
state)
  echo "$name: $(state)"
  ;;
*)
  usage
  ;;
esac
