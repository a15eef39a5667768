#!/usr/bin/env bash
# The browser tests' Debian packages (tests/test_web_page.py): chromium, and fonts for Devanagari and
# Tamil so that the page's Hindi and Tamil render as letters in its screenshots; and iproute2 (`ip`),
# which the network-namespace tests (tests/test_lan_netns.py) need. Called by
# scripts/setup.sh --dev. Never fails: without root or apt-get it says so in one line, and the
# browser tests then skip with the reason.
set -uo pipefail

chromium="${PEERINFER_CHROMIUM:-/usr/bin/chromium}"
want=()
[ -x "$chromium" ] || want+=(chromium)
[ -d /usr/share/fonts/truetype/lohit-devanagari ] || want+=(fonts-lohit-deva)
[ -d /usr/share/fonts/truetype/lohit-tamil ] || want+=(fonts-lohit-taml)
command -v ip >/dev/null 2>&1 || want+=(iproute2)
[ "${#want[@]}" -gt 0 ] || exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: not installing ${want[*]} (needs root and apt-get); the browser tests will be skipped" >&2
  exit 0
fi
log="${TMPDIR:-/tmp}/peerinfer-apt.log"
echo "setup: installing ${want[*]} with apt-get for the browser tests (log: $log)" >&2
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${want[@]}"; }
# A fresh machine may have no package lists yet: update only when the install needs it.
if ! { install || { apt-get update -q && install; }; } >"$log" 2>&1; then
  echo "setup: apt-get could not install ${want[*]} (see $log); the browser tests will be skipped" >&2
fi
exit 0
