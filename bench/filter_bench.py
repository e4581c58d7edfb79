#!/usr/bin/env python3
"""The driver of bench/filter.sh: picks the messages, sends them through our filter chain (SMTP
with XFORWARD) or through spamd (spamc), measures wall and CPU time, and reports FP/FN.

    filter_bench.py list  CORPUS OUT.tsv [--sample N --seed S]   held-out list (idx class group path)
    filter_bench.py smtp  HOST:PORT LIST.tsv OUT.json --conns N --pid PID   through the filter
    filter_bench.py spamc PORT LIST.tsv OUT.json --conns N --pid PID        through spamd
    filter_bench.py join  LIST.tsv SEND.json SINK.jsonl OUT.json   the filter's verdicts from the sink
    filter_bench.py table NAME=RESULT.json...                      the summary table (markdown)
    filter_bench.py reasons RESULT.json                            our chain: tests fired per class

CPU time: utime+stime of PID and every live descendant, plus PID's cutime+cstime (children it
reaped: spamd replaces a child after --max-conn-per-child connections), read from /proc before
and after the timed section. Wall time: from releasing the senders to the last reply.
Only loopback targets are accepted.
"""

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import resource
import smtplib
import subprocess
import sys
import time

HELD_OUT = [("spam-2", "spam"), ("easy-ham-2", "ham")]
TICK = os.sysconf("SC_CLK_TCK")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def stat(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        s = f.read()
    fields = s[s.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14, stime 15, cutime 16, cstime 17; ppid 4.
    return int(fields[1]), [int(x) for x in fields[11:15]]


def tree_cpu(root):
    """CPU seconds of root (with the children it reaped) and its live descendants."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid, _ = stat(int(name))
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    total, todo, first = 0, [root], True
    while todo:
        pid = todo.pop()
        try:
            _, (ut, st, cut, cst) = stat(pid)
        except OSError:
            continue
        total += ut + st + ((cut + cst) if first else 0)
        first = False
        todo.extend(children.get(pid, []))
    return total / TICK


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def cmd_list(a):
    rows = []
    for group, cls in HELD_OUT:
        d = os.path.join(a.corpus, group)
        for name in sorted(os.listdir(d)):
            if not name.startswith("."):
                rows.append((cls, group, os.path.join(d, name)))
    if a.sample and a.sample < len(rows):
        rows = sorted(random.Random(a.seed).sample(rows, a.sample), key=lambda r: r[2])
    with open(a.out, "w") as f:
        for i, (cls, group, path) in enumerate(rows):
            f.write(f"{i}\t{cls}\t{group}\t{path}\n")
    spam = sum(1 for r in rows if r[0] == "spam")
    print(f"{len(rows)} messages ({spam} spam, {len(rows) - spam} ham) -> {a.out}")


def read_list(path):
    out = []
    with open(path) as f:
        for line in f:
            i, cls, group, p = line.rstrip("\n").split("\t")
            out.append((int(i), cls, group, p))
    return out


def rcpt(i):
    return f"m{i:05d}@example.test"


def smtp_worker(target, items, go, results):
    host, port = target
    done = {}
    s = None
    go.wait()
    for i, data in items:
        for attempt in (1, 2):
            try:
                if s is None:
                    s = smtplib.SMTP(host, port, local_hostname="spool.bench.test", timeout=300)
                    s.ehlo()
                code, msg = s.docmd("XFORWARD", "ADDR=192.0.2.1 HELO=client.test")
                if code != 250:
                    raise smtplib.SMTPResponseException(code, msg)
                s.sendmail("bench@client.test", [rcpt(i)], data)
                done[i] = {"ok": True}
                break
            except smtplib.SMTPServerDisconnected as e:
                s = None
                done[i] = {"ok": False, "error": f"disconnected: {e}"}
            except (smtplib.SMTPException, OSError) as e:
                done[i] = {"ok": False, "error": repr(e)}
                try:
                    s.rset()
                except Exception:  # noqa: BLE001
                    s = None
                break
    if s is not None:
        try:
            s.quit()
        except Exception:  # noqa: BLE001
            pass
    results.put(done)


def spamc_worker(port, items, go, results):
    done = {}
    go.wait()
    for i, data in items:
        p = subprocess.run(
            ["spamc", "-d", "127.0.0.1", "-p", str(port), "-c", "-x"],
            input=data,
            capture_output=True,
        )
        out = p.stdout.decode(errors="replace").strip()
        if p.returncode in (0, 1) and "/" in out:
            score, required = out.split("/", 1)
            done[i] = {"ok": True, "flag": p.returncode == 1, "score": float(score),
                       "required": float(required)}
        else:
            done[i] = {"ok": False, "error": f"exit {p.returncode}: {out} {p.stderr!r}"}
    results.put(done)


def run(a, worker, target, normalize):
    rows = read_list(a.list)
    items = []
    size = 0
    for i, _, _, path in rows:
        with open(path, "rb") as f:
            data = f.read()
        if normalize:
            # CRLF line ends, as a spool stores them (smtplib dot-stuffs but keeps bare LF,
            # and our DATA decoder does not unstuff after a bare line break).
            data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
        size += len(data)
        items.append((i, data))
    ctx = mp.get_context("fork")
    go = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(target, items[k :: a.conns], go, results))
        for k in range(a.conns)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)
    load0 = loadavg()
    cpu0 = tree_cpu(a.pid)
    also0 = tree_cpu(a.also) if a.also else 0.0
    t0 = time.monotonic()
    go.set()
    done = {}
    for _ in procs:
        done.update(results.get())
    t1 = time.monotonic()
    cpu1 = tree_cpu(a.pid)
    also1 = tree_cpu(a.also) if a.also else 0.0
    for p in procs:
        p.join()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = t1 - t0
    ok = sum(1 for r in done.values() if r["ok"])
    out = {
        "list": os.path.abspath(a.list),
        "messages": len(items),
        "bytes": size,
        "ok": ok,
        "errors": len(items) - ok,
        "conns": a.conns,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu1 - cpu0, 3),
        "msgs_per_s": round(len(items) / wall, 1),
        "cpu_ms_per_msg": round((cpu1 - cpu0) * 1000 / len(items), 3),
        "sink_cpu_s": round(also1 - also0, 3),
        "clients_cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        "loadavg_before": load0,
        "loadavg_after": loadavg(),
        "results": {str(k): v for k, v in sorted(done.items())},
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    errs = [f"{k}: {v['error']}" for k, v in sorted(done.items()) if not v["ok"]]
    print(
        f"{len(items)} messages ({size / 1e6:.1f} MB), {a.conns} connections: "
        f"{wall:.1f} s wall ({out['msgs_per_s']} msgs/s), {cpu1 - cpu0:.2f} s CPU "
        f"({out['cpu_ms_per_msg']} ms/msg); clients {out['clients_cpu_s']} s CPU, "
        f"sink {out['sink_cpu_s']} s CPU; {len(errs)} errors; load {load0} -> {loadavg()}"
    )
    for e in errs[:20]:
        print("  error", e)


def loopback(host):
    if host not in LOOPBACK:
        sys.exit(f"{host}: loopback targets only")


def cmd_smtp(a):
    host, port = a.target.rsplit(":", 1)
    loopback(host)
    run(a, smtp_worker, (host, int(port)), True)


def cmd_spamc(a):
    run(a, spamc_worker, a.port, False)


def cmd_join(a):
    rows = read_list(a.list)
    with open(a.send) as f:
        send = json.load(f)
    seen = {}
    with open(a.sink) as f:
        for line in f:
            r = json.loads(line)
            for to in r["rcpt"]:
                m = re.fullmatch(r"m(\d+)@example\.test", to.lower())
                if m:
                    seen.setdefault(int(m.group(1)), []).append(r)
    results = {}
    for i, _, _, _ in rows:
        s = send["results"].get(str(i), {"ok": False, "error": "not sent"})
        got = seen.get(i, [])
        if s["ok"] and len(got) == 1:
            g = got[0]
            results[str(i)] = {"ok": True, "flag": g["flag"], "score": g["score"],
                               "status": g["status"]}
        else:
            results[str(i)] = {"ok": False, "error": s.get("error") or f"{len(got)} at the sink"}
    send["results"] = results
    send["ok"] = sum(1 for r in results.values() if r["ok"])
    send["errors"] = len(rows) - send["ok"]
    with open(a.out, "w") as f:
        json.dump(send, f, indent=1)


def summarize(path):
    with open(path) as f:
        r = json.load(f)
    cls = {i: c for i, c, _, _ in read_list(r["list"])}
    n = {"spam": 0, "ham": 0}
    fp = fn = 0
    for k, v in r["results"].items():
        c = cls[int(k)]
        n[c] += 1
        if not v["ok"]:
            continue
        if c == "ham" and v["flag"]:
            fp += 1
        if c == "spam" and not v["flag"]:
            fn += 1
    return r, n, fp, fn


def cmd_table(a):
    print("| | messages (spam / ham) | false positives (ham tagged) | false negatives (spam "
          "not tagged) | errors | wall s | msgs/s | CPU s | CPU ms/msg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in a.results:
        name, path = spec.split("=", 1)
        r, n, fp, fn = summarize(path)
        print(
            f"| {name} | {n['spam'] + n['ham']} ({n['spam']} / {n['ham']}) | "
            f"{fp} ({100 * fp / max(n['ham'], 1):.2f} %) | {fn} ({100 * fn / max(n['spam'], 1):.2f} %) | "
            f"{r['errors']} | {r['wall_s']:.1f} | {r['msgs_per_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['cpu_ms_per_msg']:.2f} |"
        )


def cmd_reasons(a):
    """Our chain only: how often each test fired, per class, and the scores near the threshold."""
    r, n, fp, fn = summarize(a.result)
    cls = {i: c for i, c, _, _ in read_list(r["list"])}
    counts = {}
    near = {"spam": 0, "ham": 0}
    for k, v in r["results"].items():
        if not v["ok"]:
            continue
        c = cls[int(k)]
        tests = (v.get("status") or "").partition("tests=")[2]
        for t in tests.split(","):
            name = t.strip().split("=")[0]
            if name and name != "none":
                counts.setdefault(name, {"spam": 0, "ham": 0})[c] += 1
        if v["score"] is not None and 4.0 <= v["score"] < 5.0:
            near[c] += 1
    print(f"tests fired (of {n['spam']} spam / {n['ham']} ham):")
    for name, c in sorted(counts.items(), key=lambda x: -(x[1]["spam"] + x[1]["ham"])):
        print(f"  {name:24} spam {c['spam']:5}  ham {c['ham']:5}")
    print(f"scores in [4, 5) (within 1 below tag_score 5): spam {near['spam']}, ham {near['ham']}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("list")
    s.add_argument("corpus")
    s.add_argument("out")
    s.add_argument("--sample", type=int, default=0)
    s.add_argument("--seed", type=int, default=7)
    for name in ("smtp", "spamc"):
        s = sub.add_parser(name)
        s.add_argument("target" if name == "smtp" else "port")
        s.add_argument("list")
        s.add_argument("out")
        s.add_argument("--conns", type=int, default=4)
        s.add_argument("--pid", type=int, required=True, help="the server: mailctl up, spamd")
        s.add_argument("--also", type=int, default=0, help="another process measured: the sink")
    s = sub.add_parser("join")
    s.add_argument("list")
    s.add_argument("send")
    s.add_argument("sink")
    s.add_argument("out")
    s = sub.add_parser("table")
    s.add_argument("results", nargs="+", help="NAME=RESULT.json")
    s = sub.add_parser("reasons")
    s.add_argument("result")
    a = p.parse_args()
    {"list": cmd_list, "smtp": cmd_smtp, "spamc": cmd_spamc, "join": cmd_join,
     "table": cmd_table, "reasons": cmd_reasons}[a.cmd](a)


if __name__ == "__main__":
    main()
