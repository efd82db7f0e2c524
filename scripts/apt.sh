# Sourced by the installers of Debian packages the tests need (install_browser.sh, install_postgres.sh).
SUDO=()

# need_root NAME PACKAGE: run what follows as root, through sudo when not root; exit 1 when neither works.
need_root() {
  [ "$(id -u)" -eq 0 ] && return 0
  command -v sudo >/dev/null || { echo "$1: not root and no sudo; install the $2 package by hand" >&2; exit 1; }
  SUDO=(sudo)
}

# apt_install NAME [apt-get install options] PACKAGE: on failure prints the tail of apt's output and exits 1.
apt_install() {
  local name=$1 log
  shift
  need_root "$name" "${*: -1}"
  log=$(mktemp)
  if ! { "${SUDO[@]}" apt-get update -qq &&
         "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    rm -f "$log"
    echo "$name: apt-get install ${*: -1} failed (see above)" >&2
    exit 1
  fi
  rm -f "$log"
}
