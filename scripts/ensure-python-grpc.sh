#!/usr/bin/env bash
# The Python tests (tests/tests/python.rs: a participant written only from the
# .proto; tests/tests/python_sdk.rs and sdk/python/tests: the Python SDK) run
# in a virtualenv with grpcio, grpcio-tools and pytest under
# ~/.cache/decree/venv (or $DECREE_VENV), made once; the SDK is installed into
# it from this checkout (`pip install ./sdk/python`) every time, so the tests
# run the SDK as it is here.
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

ready() { "$venv/bin/python" -c "import grpc, grpc_tools, pytest" >/dev/null 2>&1; }
root="$(cd "$(dirname "$0")/.." && pwd)"
install_sdk() {
  "$venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps "$root/sdk/python" ||
    { say "the Python SDK (sdk/python) did not install into $venv"; exit 1; }
}
can_make_venv() { "$python" -c "import venv, ensurepip" >/dev/null 2>&1; }

if [ "${1:-}" = "--check" ]; then
  if ready; then echo "ready"; exit 0; fi
  command -v "$python" >/dev/null 2>&1 || { echo "missing: $python"; exit 1; }
  can_make_venv || { echo "missing: $python's venv module (Debian: python3-venv)"; exit 1; }
  echo "can make it"
  exit 0
fi

if ready; then install_sdk; exit 0; fi
if ! command -v "$python" >/dev/null 2>&1; then
  apt_install "the Python participant test needs Python 3" python3 python3-venv ||
    { say "$python is missing (needed by the Python participant test); install Python 3 and run make again"; exit 1; }
fi
if ! can_make_venv; then
  apt_install "$python cannot make a virtualenv without it" python3-venv ||
    { say "$python cannot make a virtualenv (Debian/Ubuntu: sudo apt-get install python3-venv) and run make again"; exit 1; }
  can_make_venv || { say "python3-venv installed, but $python still cannot make a virtualenv; set DECREE_PYTHON"; exit 1; }
fi
say "installing grpcio, grpcio-tools and pytest into $venv (once)"
"$python" -m venv --clear "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check grpcio grpcio-tools pytest
ready || { say "grpcio was installed into $venv, but it does not import; remove $venv and run make again"; exit 1; }
install_sdk
