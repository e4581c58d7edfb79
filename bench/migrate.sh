#!/usr/bin/env bash
# Online migration ([M8]): how long a mailbox of N messages is `moving` (deliveries held, logins
# refused) when `mailctl migrate` moves it between two filers, and the whole run.
#
#   N=10000 SIZE=4096 TTL=5s bench/migrate.sh      # TTL: the lookup cache TTL (the hold waits 2 TTLs)
#
# A fresh platform in a temporary directory: two filers, spool/proxy/relay/filter off; one
# mailbox filled over LMTP with `mailbench lmtp`; then `mailctl migrate --json`, twice (filer1 ->
# filer2 -> filer1 after a purge), printing each summary. Needs the release build:
#   cargo build --release -p integration --bin mailctl --bin mailbench
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-10000}
SIZE=${SIZE:-4096}
TTL=${TTL:-5s}
M="$ROOT/target/release/mailctl"
B="$ROOT/target/release/mailbench"
DIR=$(mktemp -d /var/tmp/migrate-bench.XXXXXX)
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
L1=$(free_port); I1=$(free_port); P1=$(free_port); L2=$(free_port); I2=$(free_port); P2=$(free_port)
cat > "$DIR/mail.toml" <<CONF
[platform]
data_dir = "$DIR/data"
[database]
cache_ttl = "$TTL"
[spool]
enabled = false
[access]
enabled = false
[relay]
enabled = false
[filter]
enabled = false
[[filers]]
name = "filer1"
lmtp = "127.0.0.1:$L1"
imap = "127.0.0.1:$I1"
pop3 = "127.0.0.1:$P1"
[[filers]]
name = "filer2"
lmtp = "127.0.0.1:$L2"
imap = "127.0.0.1:$I2"
pop3 = "127.0.0.1:$P2"
CONF
cd "$DIR"
"$M" -c mail.toml domain add example.test >/dev/null
printf 'pw\n' | "$M" -c mail.toml user add user0001@example.test --filer filer1 >/dev/null
RUST_LOG=warn "$M" -c mail.toml up > up.log 2>&1 &
PID=$!
for _ in $(seq 1 100); do "$M" -c mail.toml status >/dev/null 2>&1 && break; sleep 0.1; done
"$B" lmtp "127.0.0.1:$L1" --messages "$N" --sessions 4 --size "$SIZE" --user-count 1 > fill.json
echo "filled: $N messages of $SIZE bytes into filer1"
echo "--- filer1 -> filer2"
"$M" -c mail.toml migrate user0001@example.test --to filer2 --json | tee run1.json
"$M" -c mail.toml migrate purge user0001@example.test
echo "--- filer2 -> filer1 (after purging filer1's copy)"
"$M" -c mail.toml migrate user0001@example.test --to filer1 --json | tee run2.json
