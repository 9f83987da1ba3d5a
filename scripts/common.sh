# Shared by scripts/demo and scripts/test: checks for cargo and installs
# nats-server (Debian package) when it is missing. Source it; do not run it.

need_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is missing: install Rust with rustup (https://rustup.rs), then run this again." >&2
    exit 1
  fi
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_nats_server() {
  if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    echo "Installing nats-server (Debian package)..." >&2
    as_root apt-get update -qq
    as_root apt-get install -y -qq nats-server
  fi
}
