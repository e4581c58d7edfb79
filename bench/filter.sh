#!/usr/bin/env bash
# The filter benchmark of M7: our whole filter chain vs SpamAssassin on the held-out corpus.
#
#   bench/filter.sh [options]
#     --corpus DIR     the laid-out corpus (bench/spam-corpus.sh DIR lays it out; default data/corpus)
#     --out DIR        where the results go (default data/filter-bench); JSON per run + summary.md
#     --runs N         runs of the held-out set through our chain (default 3)
#     --conns N        concurrent SMTP connections to the filter (default 4)
#     --no-sa          skip SpamAssassin
#     --sa-sample N    SpamAssassin scores only a seeded random sample of N held-out messages
#                      (default 0: all 2796, 6 min here); our chain then also runs once on the
#                      same sample
#     --sa-conns N     concurrent spamc clients (default 4); spamd has 2 children
#     --seed S         the sample's seed (default 7)
#     --keep           keep the scratch directory (configs, logs, model, Bayes DB)
#
# Needs: a release build (cargo build --release --bin mailctl), python3; for the comparison the
# Debian packages spamassassin, spamd, spamc (apt-get install spamassassin).
#
# What it does (every process on loopback, every port picked free):
#  1. bench/spam-corpus.sh lays out the corpus (nothing when already there). Training groups:
#     spam-1, easy-ham-1, hard-ham-1; held out: spam-2, easy-ham-2 (never trained or tuned on).
#  2. Ours: a filter-only `mailctl up` (no spool, filers, access or relay; [filter] with
#     network_checks = false and every other setting at its default: tag_score 5.0, all checks),
#     the model trained with `mailctl -c CONFIG filter train` on the training groups, reinjecting
#     into bench/filter_sink.py, which records each message's X-Spam-Flag/Score/Status. The
#     sender (bench/filter_bench.py smtp) sends each held-out message (line ends made CRLF, as a
#     spool stores them) with `XFORWARD ADDR=192.0.2.1 HELO=client.test`, MAIL FROM
#     bench@client.test, RCPT TO m<index>@example.test, over N persistent connections; the
#     filter answers 250 only after the sink's 250. FP = ham tagged, FN = spam not tagged.
#     msgs/s = messages / wall time of the whole set; CPU = the mailctl process's utime+stime.
#  3. SpamAssassin (Debian's 4.0.1, rules as packaged in /usr/share/spamassassin, no sa-update,
#     Debian's /etc/spamassassin site config incl. sa-compile's compiled body rules) with
#     network tests off (-L), Bayes on, auto-learn off, a private Bayes DB trained with sa-learn
#     on the same training groups; spamd -L with 2 children, spamc -c per message (raw file),
#     spam = score >= required_score 5.0. CPU = spamd's parent and children.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CORPUS=data/corpus
OUT=data/filter-bench
RUNS=3
CONNS=4
SA=1
SA_SAMPLE=0
SA_CONNS=4
SEED=7
KEEP=0
while [ $# -gt 0 ]; do
    case $1 in
        --corpus) CORPUS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --conns) CONNS=$2; shift 2 ;;
        --no-sa) SA=0; shift ;;
        --sa-sample) SA_SAMPLE=$2; shift 2 ;;
        --sa-conns) SA_CONNS=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        *) sed -n '2,18p' "$0" >&2; exit 2 ;;
    esac
done

MAILCTL=${MAILCTL:-$ROOT/target/release/mailctl}
BENCH="python3 $ROOT/bench/filter_bench.py"
[ -x "$MAILCTL" ] || { echo "no $MAILCTL: cargo build --release --bin mailctl" >&2; exit 1; }
if [ "$SA" = 1 ]; then
    for c in spamd spamc sa-learn; do
        command -v $c >/dev/null || { echo "no $c: apt-get install spamassassin (or --no-sa)" >&2; exit 1; }
    done
fi

"$ROOT/bench/spam-corpus.sh" "$CORPUS"
CORPUS=$(realpath "$CORPUS")
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
W=$(mktemp -d /tmp/filter-bench.XXXXXX)
chmod 755 "$W" # spamd's children run as nobody
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # give each a moment to exit (spamd stops its children first)
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
    if [ "$KEEP" = 1 ]; then echo "scratch kept: $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
say() { echo "== $*" >&2; }

{
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "commit: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- . ':!bench' 2>/dev/null || echo ' (with uncommitted changes outside bench/)')"
    echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(free -g | awk '/^Mem:/{print $2}') GiB RAM, kernel $(uname -r)"
    echo "mailctl: $MAILCTL ($(stat -c %y "$MAILCTL" | cut -d. -f1))"
    [ "$SA" = 1 ] && echo "spamassassin: $(dpkg-query -W -f '${Version}' spamassassin 2>/dev/null)"
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/environment.txt"

# The message lists: the whole held-out set, the sample, and a warm-up list from the training
# groups (its indices start at 90000, so they never mix with held-out ones at the sink).
$BENCH list "$CORPUS" "$OUT/heldout.tsv"
LIST_SA=$OUT/heldout.tsv
if [ "$SA" = 1 ] && [ "$SA_SAMPLE" -gt 0 ]; then
    $BENCH list "$CORPUS" "$OUT/sample.tsv" --sample "$SA_SAMPLE" --seed "$SEED"
    LIST_SA=$OUT/sample.tsv
fi
i=90000
: >"$W/warm.tsv"
for g in spam-1 easy-ham-1; do
    for f in $(ls "$CORPUS/$g" | head -25); do
        printf '%d\twarm\t%s\t%s\n' $i $g "$CORPUS/$g/$f" >>"$W/warm.tsv"
        i=$((i + 1))
    done
done

# ---- ours ----
FPORT=$(free_port)
SPORT=$(free_port)
mkdir -p "$W/ours"
cat >"$W/ours/filter.toml" <<EOF
filers = []

[platform]
data_dir = "$W/ours/data"

[spool]
enabled = false

[access]
enabled = false

[relay]
enabled = false

[filter]
enabled = true
listen = "127.0.0.1:$FPORT"
reinject = "127.0.0.1:$SPORT"
network_checks = false
EOF
say "ours: training the model on spam-1, easy-ham-1, hard-ham-1"
start=$EPOCHREALTIME
"$MAILCTL" -c "$W/ours/filter.toml" filter train --spam "$CORPUS/spam-1" \
    --ham "$CORPUS/easy-ham-1" --ham "$CORPUS/hard-ham-1" --json | tee "$OUT/ours-train.json"
echo "train_wall_s $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')" | tee -a "$OUT/environment.txt"

# Create the (unused) location database before `up`: `up` and a concurrent first `status`
# both run its schema migration and `up` can die with "table domains already exists".
"$MAILCTL" -c "$W/ours/filter.toml" status --json >/dev/null 2>&1 || true
python3 "$ROOT/bench/filter_sink.py" "127.0.0.1:$SPORT" "$W/ours/sink.jsonl" 2>"$W/ours/sink.log" &
SINK=$!
PIDS+=("$SINK")
"$MAILCTL" -c "$W/ours/filter.toml" up >"$W/ours/up.log" 2>&1 &
UP=$!
PIDS+=("$UP")
for _ in $(seq 300); do
    if "$MAILCTL" -c "$W/ours/filter.toml" status --json 2>/dev/null | grep -q "\"pid\": $UP"; then break; fi
    kill -0 "$UP" || { cat "$W/ours/up.log" >&2; exit 1; }
    sleep 0.1
done
"$MAILCTL" -c "$W/ours/filter.toml" status --json | grep -q '"reachable": true' || { cat "$W/ours/up.log" >&2; exit 1; }
say "ours: warm-up (50 training messages)"
$BENCH smtp "127.0.0.1:$FPORT" "$W/warm.tsv" "$W/ours/warm.json" --conns "$CONNS" --pid "$UP" --also "$SINK"

ours_run() { # NAME LIST
    : >"$W/ours/sink.jsonl"
    say "ours: $1 ($(wc -l <"$2") messages, $CONNS connections)"
    $BENCH smtp "127.0.0.1:$FPORT" "$2" "$W/ours/$1-send.json" --conns "$CONNS" --pid "$UP" --also "$SINK"
    $BENCH join "$2" "$W/ours/$1-send.json" "$W/ours/sink.jsonl" "$OUT/$1.json"
}
TABLE=()
for r in $(seq "$RUNS"); do
    ours_run "ours-heldout-$r" "$OUT/heldout.tsv"
    TABLE+=("ours, held-out, run $r=$OUT/ours-heldout-$r.json")
done
if [ "$LIST_SA" != "$OUT/heldout.tsv" ]; then
    ours_run ours-sample "$LIST_SA"
    TABLE+=("ours, sample=$OUT/ours-sample.json")
fi
$BENCH reasons "$OUT/ours-heldout-1.json" | tee "$OUT/ours-reasons.txt"
cp "$W/ours/up.log" "$OUT/ours-up.log"
if grep -qE ' (WARN|ERROR) ' "$OUT/ours-up.log"; then
    say "ours: warnings or errors in the log:"
    grep -E ' (WARN|ERROR) ' "$OUT/ours-up.log" | head -20 >&2
fi
kill "$UP" "$SINK"
wait "$UP" "$SINK" || true

# ---- SpamAssassin ----
if [ "$SA" = 1 ]; then
    mkdir -p "$W/sa/home" "$W/sa/bayes"
    chmod 777 "$W/sa/bayes" "$W/sa/home"
    export HOME=$W/sa/home # sa-learn's and spamd's ~/.spamassassin: private
    CF=(--cf='use_bayes 1' --cf='bayes_auto_learn 0' --cf="bayes_path $W/sa/bayes/bayes"
        --cf='bayes_file_mode 0777')
    say "SpamAssassin: sa-learn on spam-1, easy-ham-1, hard-ham-1"
    start=$EPOCHREALTIME
    sa-learn -L "${CF[@]}" --spam "$CORPUS/spam-1"
    sa-learn -L "${CF[@]}" --ham "$CORPUS/easy-ham-1" "$CORPUS/hard-ham-1"
    echo "sa_learn_wall_s $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')" | tee -a "$OUT/environment.txt"
    sa-learn -L "${CF[@]}" --dump magic | grep -E 'nspam|nham|ntokens' | tee "$OUT/sa-bayes.txt"
    chmod -R a+rwX "$W/sa/bayes"
    APORT=$(free_port)
    spamd -L -x -u nobody -H "$W/sa/home" -m 2 --min-children 2 --min-spare 1 --max-spare 2 \
        --listen "127.0.0.1:$APORT" -s "$W/sa/spamd.log" -r "$W/sa/spamd.pid" "${CF[@]}" \
        >"$W/sa/spamd.out" 2>&1 &
    SPAMD=$!
    PIDS+=("$SPAMD")
    for _ in $(seq 600); do
        spamc -d 127.0.0.1 -p "$APORT" -K >/dev/null 2>&1 && break
        kill -0 "$SPAMD" || { cat "$W/sa/spamd.out" >&2; exit 1; }
        sleep 0.2
    done
    say "SpamAssassin: warm-up (50 training messages)"
    $BENCH spamc "$APORT" "$W/warm.tsv" "$W/sa/warm.json" --conns "$SA_CONNS" --pid "$SPAMD"
    say "SpamAssassin: $(wc -l <"$LIST_SA") messages, $SA_CONNS spamc clients, 2 spamd children"
    $BENCH spamc "$APORT" "$LIST_SA" "$OUT/sa.json" --conns "$SA_CONNS" --pid "$SPAMD"
    TABLE+=("SpamAssassin$([ "$LIST_SA" = "$OUT/heldout.tsv" ] && echo ', held-out' || echo ', sample')=$OUT/sa.json")
    cp "$W/sa/spamd.log" "$OUT/sa-spamd.log"
    kill "$SPAMD"
    wait "$SPAMD" || true
fi

$BENCH table "${TABLE[@]}" | tee "$OUT/summary.md"
echo "results: $OUT"
