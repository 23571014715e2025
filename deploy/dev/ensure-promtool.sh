#!/usr/bin/env bash
# Make sure `promtool` (Debian's prometheus package) is installed: the test suite checks and unit-tests
# the alert rules in deploy/prometheus with it (tests/operations/test_prometheus_rules.py).
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then echo "promtool: $(command -v promtool)"; exit 0; fi
echo "promtool: not installed; installing Debian's prometheus package"
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null 2>&1 || { echo "promtool: still missing after installing prometheus" >&2; exit 1; }
