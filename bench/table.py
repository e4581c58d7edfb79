#!/usr/bin/env python3
"""bench/run's table: reads the mailbench results (one JSON line per run, with `bench` and
`system` = ours|ref), prints one markdown table and writes the whole as one JSON document.

    table.py RESULTS.jsonl OUT.json --machine M --commit C --params P
"""
import argparse
import datetime
import json


def get(r, *keys):
    """The first of these keys that the result has (mailbench's names differ per mode)."""
    for k in keys:
        v = r.get(k) if r else None
        if v is not None:
            return v
    return None


def pair(r, a, b):
    x, y = get(r, a), get(r, b)
    return None if x is None or y is None else (x, y)


# label, bench, value of a result, "higher" or "lower" is better
ROWS = [
    ("Inbound SMTP → fsynced in a Maildir, msg/s", "inbound",
     lambda r: get(r, "delivered_per_s"), "higher"),
    ("Inbound: SMTP accepted, msg/s", "inbound", lambda r: get(r, "msgs_per_s"), "higher"),
    ("Inbound without our filter (vs the reference, which has none), msg/s", "inbound-nofilter",
     lambda r: get(r, "delivered_per_s"), "higher"),
    ("Inbound: end of DATA → 250, p50 / p99 ms", "inbound",
     lambda r: pair(r, "lat_ms_p50", "lat_ms_p99"), "lower"),
    ("Inbound: server CPU ms/msg", "inbound", lambda r: get(r, "server_cpu_ms_per_op"), "lower"),
    ("LMTP into the store, msg/s", "lmtp", lambda r: get(r, "msgs_per_s"), "higher"),
    ("LMTP: server CPU ms/msg", "lmtp", lambda r: get(r, "server_cpu_ms_per_op"), "lower"),
    ("IMAP direct, sessions/s", "imap-direct", lambda r: get(r, "sessions_per_s"), "higher"),
    ("IMAP via the proxy, sessions/s", "imap-proxy", lambda r: get(r, "sessions_per_s"), "higher"),
    ("IMAP via the proxy, session p50 / p99 ms", "imap-proxy",
     lambda r: pair(r, "session_ms_p50", "session_ms_p99"), "lower"),
    ("IMAP via the proxy, server CPU ms/session", "imap-proxy",
     lambda r: get(r, "server_cpu_ms_per_op"), "lower"),
    ("POP3 direct, sessions/s", "pop3-direct", lambda r: get(r, "sessions_per_s"), "higher"),
    ("POP3 via the proxy, sessions/s", "pop3-proxy", lambda r: get(r, "sessions_per_s"), "higher"),
    ("POP3 via the proxy, server CPU ms/session", "pop3-proxy",
     lambda r: get(r, "server_cpu_ms_per_op"), "lower"),
    ("NOOP via the proxy, p50 / p99 µs", "noop",
     lambda r: pair(r, "rtt_us_p50", "rtt_us_p99"), "lower"),
    ("Proxy memory per idle IMAP connection, KiB RSS", "idle",
     lambda r: get((r or {}).get("trees", [{}])[0] if r and r.get("trees") else None, "rss_kib_per_conn"),
     "lower"),
    ("Proxy memory per further idle IMAP connection (CONNS vs CONNS/4), KiB RSS", "idle",
     None, "lower"),
    ("Submission (AUTH PLAIN), msg/s", "submit", lambda r: get(r, "msgs_per_s"), "higher"),
]


def tree(r):
    return r["trees"][0] if r and r.get("trees") else None


def marginal(runs, system):
    """KiB per connection between the idle runs with CONNS and CONNS/4 connections."""
    full, quarter = runs.get(("idle", system)), runs.get(("idle-quarter", system))
    a, b = tree(full), tree(quarter)
    if not a or not b or full["idling"] <= quarter["idling"]:
        return None
    grow = lambda t: t["rss_kib_after"] - t["rss_kib_before"]
    return (grow(a) - grow(b)) / (full["idling"] - quarter["idling"])


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, tuple):
        return " / ".join(fmt(x) for x in v)
    if isinstance(v, float):
        if v >= 100:
            return f"{v:.0f}"
        if v >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)


def ratio(ours, ref):
    """ours / ref of the first figure; None when either is missing or zero."""
    if isinstance(ours, tuple):
        ours = ours[0]
    if isinstance(ref, tuple):
        ref = ref[0]
    if not ours or not ref:
        return None
    return ours / ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("out")
    ap.add_argument("--machine", default="")
    ap.add_argument("--commit", default="")
    ap.add_argument("--params", default="")
    a = ap.parse_args()
    runs = {}
    with open(a.results) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                runs[(r["bench"], r["system"])] = r
    have_ref = any(s == "ref" for (_, s) in runs)
    rows = []
    for label, bench, value, better in ROWS:
        if value is None:
            ours, ref = marginal(runs, "ours"), marginal(runs, "ref")
        else:
            ours = value(runs.get((bench, "ours")))
            ref = value(runs.get((bench, "ref")) or runs.get((bench.replace("-nofilter", ""), "ref")))
        q = ratio(ours, ref)
        rows.append(dict(row=label, ours=ours, ref=ref, ratio=q, better=better,
                         ahead=None if q is None else (q >= 1 if better == "higher" else q <= 1)))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"Performance, {when}; commit {a.commit}; {a.machine}; {a.params}")
    print()
    print("| workload | ours | Postfix+Dovecot | ours / reference |")
    print("|---|---|---|---|")
    for r in rows:
        q = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        if r["ahead"] is not None:
            q += " ✓" if r["ahead"] else " ✗"
        print(f"| {r['row']} ({r['better']} is better) | {fmt(r['ours'])} | {fmt(r['ref'])} | {q} |")
    print()
    if not have_ref:
        print("The reference was not running: start it with ../shared/anchors/setup.sh and start.sh.")
    else:
        print("✓: ours is ahead; ✗: the reference is ahead (on its first figure).")
    failed = [f"{b}/{s}" for (b, s), r in runs.items()
              if r.get("error") or get(r, "sessions_failed", "messages_failed", "noops_failed", "failed")]
    if failed:
        print(f"Runs with failures (see results.json): {', '.join(sorted(failed))}")
    with open(a.out, "w") as f:
        json.dump(dict(date=when, commit=a.commit, machine=a.machine, params=a.params,
                       rows=[{**r, "ours": r["ours"], "ref": r["ref"]} for r in rows],
                       runs=list(runs.values())), f, indent=1, default=list)


if __name__ == "__main__":
    main()
