# Shared by the scripts/ensure-*.sh checks. Source it; it defines:
#
#   apt_install WHY PKG...   installs Debian packages when this user may (root,
#                            or passwordless sudo), saying what and why first;
#                            returns 1 (installing nothing) when it may not
#   say TEXT                 one line on stderr, prefixed "decree: "
#   report_found FIND ROOT   for --check: runs FIND ROOT (a function printing a
#                            path, or nothing) and prints "found PATH" (status 0)
#                            or "missing" (status 1)

say() { printf 'decree: %s\n' "$*" >&2; }

apt_install() {
  local why=$1
  shift
  local -a sudo=()
  if ! command -v apt-get >/dev/null 2>&1; then
    return 1
  elif [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || return 1
    sudo=(sudo)
  fi
  say "installing $* ($why)"
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

report_found() {
  local found
  found=$("$1" "${2:-}")
  if [ -n "$found" ]; then
    echo "found $found"
    return 0
  fi
  echo "missing"
  return 1
}
