#!/usr/bin/env bash
# Installs what the real-cluster tests (pytest -m "slurm or ray") need on a fresh Debian machine, as root:
# Slurm 22.05 with accounting (slurmctld, slurmd, clients, munge, slurmdbd, MariaDB) and Ray with Ray Train, and
# ip, nsenter, unshare, mount and hostname for the two-node clusters' network namespaces.
# The tests start and stop their own private daemons; the packages' services are never started here.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2 util-linux mount hostname >/dev/null
# The interpreter that runs the tests (not Debian's python3-* packages); ray[train] does not pull in torch.
"${PYTHON:-python3}" -m pip install -q --disable-pip-version-check "ray[default,train]"
