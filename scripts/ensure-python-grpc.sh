#!/usr/bin/env bash
# The foreign-language participant test (tests/tests/python.rs) runs a Python
# participant with grpcio. This makes a virtualenv with grpcio and grpcio-tools
# under ~/.cache/decree/venv (or $DECREE_VENV), once.
set -euo pipefail
venv="${DECREE_VENV:-$HOME/.cache/decree/venv}"
if "$venv/bin/python" -c "import grpc, grpc_tools" >/dev/null 2>&1; then
    exit 0
fi
command -v python3 >/dev/null 2>&1 || { echo "decree: python3 is missing (needed by the Python participant test)" >&2; exit 1; }
echo "decree: installing grpcio and grpcio-tools into $venv" >&2
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check grpcio grpcio-tools
