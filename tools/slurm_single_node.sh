#!/usr/bin/env bash
# A throw-away single-node Slurm cluster on 127.0.0.1, everything under one directory (no
# systemd, nothing in /etc touched): its own munge key and socket, slurm.conf, state, spool,
# logs and pid files.
#
#   tools/slurm_single_node.sh start DIR   # then: export SLURM_CONF=DIR/slurm.conf
#   tools/slurm_single_node.sh stop DIR    # kills slurmd, slurmctld, munged by their pid files
#
# `start` returns once the node reports idle (or fails, printing the daemons' logs, after 60 s).
# Ports: SLURM_TEST_PORT (default 16817) and the next one. Runs the daemons as root (the test
# machine's user); needs tools/install_slurm.sh's packages.
set -euo pipefail
cmd=${1:?usage: slurm_single_node.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: slurm_single_node.sh start|stop DIR}" && cd "$2" && pwd)

stop() {
  for d in slurmd slurmctld munged; do
    if [ -s "$dir/$d.pid" ]; then
      pid=$(cat "$dir/$d.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/$d.pid"
    fi
  done
}

case "$cmd" in
stop) stop; exit 0 ;;
start) ;;
*) echo "usage: slurm_single_node.sh start|stop DIR" >&2; exit 2 ;;
esac

port=${SLURM_TEST_PORT:-16817}
host=$(hostname -s)
mkdir -p "$dir/state" "$dir/spool"
if [ ! -s "$dir/munge.key" ]; then
  dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge.key"
fi
cat > "$dir/slurm.conf" <<CONF
ClusterName=fisherstein
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
AuthInfo=socket=$dir/munge.sock
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
KillWait=10
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
munged --force --socket="$dir/munge.sock" --key-file="$dir/munge.key" \
  --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
slurmctld -f "$SLURM_CONF" -i
slurmd -f "$SLURM_CONF"
for _ in $(seq 600); do
  state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
  if [ "$state" = idle ]; then
    echo "slurm_single_node: node $host idle; export SLURM_CONF=$SLURM_CONF" >&2
    exit 0
  fi
  sleep 0.1
done
echo "slurm_single_node: node $host not idle after 60 s (state: ${state:-none})" >&2
tail -n 20 "$dir"/*.log >&2 || true
stop
exit 1
