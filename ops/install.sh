#!/usr/bin/env bash
# Installs a flowproxy node on a Debian (bookworm) host, from this checkout or a wheel:
#   sudo bash ops/install.sh [path/to/flowproxy-X.Y.Z-py3-none-any.whl]
# It creates the system user `flowproxy`, a venv in /opt/flowproxy/venv with the wheel, the three systemd
# units, the tmpfiles entry, /etc/flowproxy/flowproxy.env and /etc/consul.d/flowproxy.json (the config
# folders' watches), without overwriting a file that exists (but the whole-prefix watch of versions before
# the sharded route watches, which it replaces and keeps as flowproxy.json.old). It installs HAProxy (bookworm) and socat with apt, and
# Consul 1.8.7 from Debian's bullseye suite only if no `consul` is on the PATH (a host usually has its own).
# Then: fill in the REPLACE-WITH-... values (README, "Run it in production") and start the units.
# FLOWPROXY_ROOT=/some/folder installs under that folder instead of / (no apt, no user, no systemctl).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root="${FLOWPROXY_ROOT:-}"
wheel="${1:-}"

if [ -z "$root" ]; then
  [ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }
  if ! command -v consul >/dev/null 2>&1; then
    bash "$here/.ci/install" --system-only
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy socat python3-venv >/dev/null
  id flowproxy >/dev/null 2>&1 || useradd --system --home-dir /var/lib/flowproxy --shell /usr/sbin/nologin flowproxy
fi
group=flowproxy
getent group "$group" >/dev/null 2>&1 || group=$(id -gn)

if [ -z "$wheel" ]; then
  build=$(mktemp -d)
  python3 -m pip wheel --disable-pip-version-check -q --no-deps -w "$build" "$here"
  wheel=$(ls "$build"/flowproxy-*.whl)
fi
python3 -m venv "$root/opt/flowproxy/venv"
"$root/opt/flowproxy/venv/bin/pip" install --disable-pip-version-check -q --upgrade "$wheel"

install -d -m 0755 "$root/etc/systemd/system" "$root/etc/tmpfiles.d" "$root/etc/consul.d" "$root/etc/flowproxy"
install -m 0644 "$here"/ops/systemd/*.service "$root/etc/systemd/system/"
install -m 0644 "$here/ops/tmpfiles.d/flowproxy.conf" "$root/etc/tmpfiles.d/flowproxy.conf"
keep() {  # install a config file only where none exists: operators edit these
  [ -e "$3" ] || install -m "$1" -g "$group" "$2" "$3"
}
keep 0640 "$here/ops/flowproxy.env" "$root/etc/flowproxy/flowproxy.env"
watch="$root/etc/consul.d/flowproxy.json"
if [ -e "$watch" ] && grep -q '"prefix": "flowproxy/"' "$watch" && [ "$(grep -c '"type"' "$watch")" -eq 1 ]; then
  mv "$watch" "$watch.old"  # the node now keeps the routes' watches itself, split by name: see the README
fi
keep 0640 "$here/ops/consul.d/flowproxy.json" "$root/etc/consul.d/flowproxy.json"
keep 0640 "$here/ops/consul.d/agent.json" "$root/etc/consul.d/agent.json"

if [ -z "$root" ]; then
  systemd-tmpfiles --create /etc/tmpfiles.d/flowproxy.conf
  systemctl daemon-reload || true  # no systemd running (a container): the files are in place anyway
fi
echo "flowproxy $("$root/opt/flowproxy/venv/bin/flowproxy" --version | awk '{print $NF}') installed."
echo "Next: the REPLACE-WITH-... values in /etc/consul.d/agent.json and /etc/flowproxy/flowproxy.env, the node"
echo "token in /etc/flowproxy/consul-token, then: systemctl enable --now flowproxy-consul flowproxy-haproxy flowproxy"
