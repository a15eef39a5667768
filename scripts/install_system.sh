#!/usr/bin/env bash
# The Debian packages the tests need, called by scripts/setup.sh --dev:
# - browser tests (tests/test_web_page.py): chromium, and fonts for Devanagari and Tamil so that the
#   page's Hindi and Tamil render as letters in its screenshots;
# - namespace tests (tests/test_lan_netns.py, tests/netns_lab.py): iproute2 (`ip`);
# - NAT lab tests (tests/nat_lab.py, tests/test_nat_lab.py): iptables (and ip6tables), conntrack,
#   coturn (the TURN relay), and libnetfilter-queue-dev, which the netfilterqueue package compiles against.
# Checks before it calls apt-get, so it costs nothing when all is there. Never fails: without root or
# apt-get it says so in one line, and those tests then skip with the reason.
set -uo pipefail

chromium="${PEERINFER_CHROMIUM:-/usr/bin/chromium}"
nfqueue_header="${PEERINFER_NFQUEUE_HEADER:-/usr/include/libnetfilter_queue/libnetfilter_queue.h}"
want=()
purposes=()
need() { # need PURPOSE PACKAGE: PACKAGE is missing, for the PURPOSE tests
  want+=("$2")
  [[ " ${purposes[*]-} " == *" $1 "* ]] || purposes+=("$1")
}
have() { command -v "$1" >/dev/null 2>&1; }

[ -x "$chromium" ] || need browser chromium
[ -d /usr/share/fonts/truetype/lohit-devanagari ] || need browser fonts-lohit-deva
[ -d /usr/share/fonts/truetype/lohit-tamil ] || need browser fonts-lohit-taml
have ip || need namespace iproute2
{ have iptables && have ip6tables; } || need NAT-lab iptables
have conntrack || need NAT-lab conntrack
have turnserver || need NAT-lab coturn
[ -f "$nfqueue_header" ] || need NAT-lab libnetfilter-queue-dev
[ "${#want[@]}" -gt 0 ] || exit 0

# "the browser, namespace and NAT-lab tests"
tests="${purposes[0]}"
for ((i = 1; i < ${#purposes[@]}; i++)); do
  if ((i == ${#purposes[@]} - 1)); then tests+=" and ${purposes[i]}"; else tests+=", ${purposes[i]}"; fi
done
tests="the ${tests//NAT-lab/NAT lab} tests"

if [ "$(id -u)" != 0 ] || ! have apt-get; then
  echo "setup: not installing ${want[*]} (needs root and apt-get); $tests will be skipped" >&2
  exit 0
fi
log="${TMPDIR:-/tmp}/peerinfer-apt.log"
echo "setup: installing ${want[*]} with apt-get for $tests (log: $log)" >&2
turnservers() { have pgrep && pgrep -x turnserver; }
turnservers_before=$'\n'"$(turnservers)"$'\n'
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${want[@]}"; }
# A fresh machine may have no package lists yet: update only when the install needs it.
if ! { install || { apt-get update -q && install; }; } >"$log" 2>&1; then
  echo "setup: apt-get could not install ${want[*]} (see $log); $tests will be skipped" >&2
fi

# Debian enables coturn.service: on a machine that runs systemd the install starts a TURN relay
# listening on every address. The tests start their own, in a namespace; none may stay running here.
if [[ " ${want[*]} " == *" coturn "* ]]; then
  if [ -d /run/systemd/system ] && have systemctl; then
    systemctl disable --now coturn >>"$log" 2>&1
  fi
  for pid in $(turnservers); do
    [[ "$turnservers_before" == *$'\n'"$pid"$'\n'* ]] || kill "$pid" 2>/dev/null
  done
fi
exit 0
