# Sourced by benchmarks/tinyworld_study.sh (and its test): wait_all PID... waits until every PID has exited and
# returns 0 only if all exited 0.
#
# A trapped signal interrupts bash's `wait` (status > 128), and a stop notice can come more than once (GNU timeout
# signals its child and then the child's whole process group, the study's trap forwards it again, a cluster may
# repeat its notice). Each PID is waited for until it is really gone, so the study never archives while a trainer
# is still writing its checkpoint (a single retry of `wait` gives up at the second notice). The trainers' side of
# the same rule: a repeated SIGTERM does not kill them (`TimeBox.stop_on_signals`); study call 9's first call lost
# a run's last 50 steps to that before it was fixed.
wait_all() {
  local pid rc status=0
  for pid in "$@"; do
    while :; do
      wait "$pid"; rc=$?
      if [ "$rc" -gt 128 ] && kill -0 "$pid" 2> /dev/null; then continue; fi
      break
    done
    [ "$rc" -eq 0 ] || status=1
  done
  return "$status"
}
