#!/bin/bash
# A one-node Slurm on this machine, for the Slurm tests and for trying the sbatch scripts without a cluster:
# installs Debian's Slurm and munge when missing (root only), declares stand-in GPUs so jobs may ask for
# --gpus-per-node (their ranks then run on CPU), writes the config under /etc/slurm, starts munged, slurmctld and
# slurmd, and waits until the node takes jobs. Idempotent: a second run leaves a working Slurm alone.
#   sudo slurm/local/start.sh            # then: sinfo; CONFIG=configs/tiny_cpu.yaml sbatch ... slurm/stage2_vit_e.sh
set -euo pipefail
GPUS=${LOCAL_SLURM_GPUS:-8}
CPUS=${LOCAL_SLURM_CPUS:-8}   # declared CPUs; more than the machine has is allowed (config_overrides) so that
                              # tests can ask for the headers' shapes; the ranks then share the real cores
if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "local Slurm already running: $(sinfo -h -o '%N %T %G')"; exit 0
fi
if [ "$(id -u)" != 0 ]; then echo "slurm/local/start.sh must run as root (it installs and starts daemons)" >&2; exit 1; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "installing Debian's slurmctld slurmd slurm-client munge ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; }
fi
HOST=$(hostname -s)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
for ((i = 0; i < GPUS; i++)); do [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done  # like /dev/null
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge
cat > /etc/slurm/slurm.conf <<CONF
# Written by slurm/local/start.sh: one node, stand-in GPUs, requeue allowed.
ClusterName=local
SlurmctldHost=$HOST
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
JobRequeue=1
KillWait=30
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
echo "Name=gpu File=/dev/fakegpu[0-$((GPUS - 1))]" > /etc/slurm/gres.conf
rm -f /etc/slurm/cgroup.conf  # none: proctrack/linuxproc needs no cgroups (containers often lack them)
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
chown -R slurm:slurm /var/spool/slurmctld /var/log/slurm 2>/dev/null || true
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged" 2>/dev/null || munged --force
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        echo "local Slurm up: $(sinfo -h -o '%P %N %T cpus=%c gres=%G')"; exit 0
    fi
    sleep 1
done
echo "local Slurm did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
