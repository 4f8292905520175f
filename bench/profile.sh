#!/usr/bin/env bash
# Profile netferry's fast path: one TCP throughput run through host-switch and vm-switch
# under py-spy (twice: a speedscope JSON, then a flamegraph SVG, per process), saved in
# bench/results/profile-<ts>-{hostd,vm-switch}-<dir>-mtu<N>.{speedscope.json,svg}.
#
#   sudo bench/profile.sh                      # guest→host, MTU 1500, 10 s
#   sudo bench/profile.sh --profile-direction h2g --profile-mtu 65520 --profile-seconds 20
#
# Needs root and py-spy in .venv (.venv/bin/pip install py-spy).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/run.py --profile "$@"
