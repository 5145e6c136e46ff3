#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (run as root):
# system packages (real Fashion-MNIST, Slurm with accounting, MariaDB, munge) and the project with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  dataset-fashion-mnist slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2 util-linux chromium >/dev/null
python3 -m pip install -q --disable-pip-version-check -e ".[dev,slurm,ray,detect,track]"
