#!/usr/bin/env bash
# The foreign-language participant test (tests/tests/python.rs) runs a Python
# participant with grpcio. This makes a virtualenv with grpcio and grpcio-tools
# under ~/.cache/decree/venv (or $DECREE_VENV), once.
#
#   scripts/ensure-python-grpc.sh           make the venv if it is not ready
#   scripts/ensure-python-grpc.sh --check   only look: "ready", "can make it",
#                                           or "missing: WHAT" (exit 1)
#
# $DECREE_PYTHON names the interpreter (default python3). Making a venv needs
# its venv and ensurepip modules (Debian ships them apart, in python3-venv).
set -euo pipefail
venv="${DECREE_VENV:-$HOME/.cache/decree/venv}"
python="${DECREE_PYTHON:-python3}"
. "$(dirname "$0")/lib.sh"

ready() { "$venv/bin/python" -c "import grpc, grpc_tools" >/dev/null 2>&1; }
can_make_venv() { "$python" -c "import venv, ensurepip" >/dev/null 2>&1; }

if [ "${1:-}" = "--check" ]; then
  if ready; then echo "ready"; exit 0; fi
  command -v "$python" >/dev/null 2>&1 || { echo "missing: $python"; exit 1; }
  can_make_venv || { echo "missing: $python's venv module (Debian: python3-venv)"; exit 1; }
  echo "can make it"
  exit 0
fi

ready && exit 0
if ! command -v "$python" >/dev/null 2>&1; then
  apt_install "the Python participant test needs Python 3" python3 python3-venv ||
    { say "$python is missing (needed by the Python participant test); install Python 3 and run make again"; exit 1; }
fi
if ! can_make_venv; then
  apt_install "$python cannot make a virtualenv without it" python3-venv ||
    { say "$python cannot make a virtualenv (Debian/Ubuntu: sudo apt-get install python3-venv) and run make again"; exit 1; }
  can_make_venv || { say "python3-venv installed, but $python still cannot make a virtualenv; set DECREE_PYTHON"; exit 1; }
fi
say "installing grpcio and grpcio-tools into $venv (once)"
"$python" -m venv --clear "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check grpcio grpcio-tools
ready || { say "grpcio was installed into $venv, but it does not import; remove $venv and run make again"; exit 1; }
