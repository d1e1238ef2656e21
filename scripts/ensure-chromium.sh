#!/usr/bin/env bash
# The console's browser test (tests/tests/console.rs) drives headless Chromium
# through ChromeDriver (WebDriver). This makes sure both are there: Debian's
# chromium and chromium-driver, installed when missing and this user may.
#
#   scripts/ensure-chromium.sh           check, install them if missing
#   scripts/ensure-chromium.sh --check [ROOT]
#                                        only look (under ROOT, default /):
#                                        "found PATH" (exit 0) or "missing" (exit 1)
#
# It looks where the test does: $DECREE_CHROMEDRIVER (and $DECREE_CHROMIUM), else
# chromedriver and chromium under /usr/bin; both must be there.
set -euo pipefail

find_chromium() {
  local root=${1%/}
  local driver=${DECREE_CHROMEDRIVER:-/usr/bin/chromedriver} browser=${DECREE_CHROMIUM:-/usr/bin/chromium}
  [ -x "$root$driver" ] && [ -x "$root$browser" ] && printf '%s\n' "$root$driver"
  return 0
}

. "$(dirname "$0")/lib.sh"
if [ "${1:-}" = "--check" ]; then
  report_found find_chromium "${2:-}"
  exit $?
fi
[ -n "$(find_chromium "")" ] && exit 0
apt_install "the console's browser test needs headless Chromium and ChromeDriver" chromium chromium-driver ||
  { say "chromium and chromium-driver are missing (Debian: sudo apt-get install chromium chromium-driver), needed by the console's browser test"; exit 1; }
[ -n "$(find_chromium "")" ] || { say "chromium-driver installed, but no chromedriver at ${DECREE_CHROMEDRIVER:-/usr/bin/chromedriver}"; exit 1; }
