#!/usr/bin/env python3
"""Times IMAP operations on one large mailbox, the same way against any server.

Logs in with AUTHENTICATE PLAIN as `user` authorised by `principal`/`secret` (the proxy's
trusted login on our filer; Dovecot's master-user login takes the same form), then times:
  select      SELECT INBOX
  fetch_flags FETCH 1:* (FLAGS UID RFC822.SIZE)
  search      UID SEARCH HEADER Subject <string>
  fetch_1000  FETCH of 1000 full bodies (BODY.PEEK[]), in one command
Each time is from sending the command to reading its tagged reply, over a raw socket (the
client does no parsing beyond finding the tag, so it measures the server). Prints one JSON
line.

usage: imap_mailbox.py HOST:PORT USER PRINCIPAL SECRET [--search STRING] [--runs N]
"""
import argparse
import base64
import json
import socket
import statistics
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("user")
    ap.add_argument("principal")
    ap.add_argument("secret")
    ap.add_argument("--search", default="needle")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    host, port = a.target.rsplit(":", 1)
    results = {}
    for run in range(a.runs):
        s = socket.create_connection((host, int(port)), timeout=600)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()

        def until(tag):
            nonlocal buf
            marker = b"\r\n" + tag + b" "
            while True:
                i = buf.find(marker)
                if i >= 0:
                    j = buf.find(b"\r\n", i + 2)
                    if j >= 0:
                        line = bytes(buf[i + 2 : j])
                        body = bytes(buf[:i])
                        buf = buf[j + 2 :]
                        return line, body
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise SystemExit("connection closed")
                buf += chunk

        def cmd(tag, text):
            t0 = time.perf_counter()
            s.sendall(tag + b" " + text + b"\r\n")
            line, body = until(tag)
            dt = time.perf_counter() - t0
            if not line.startswith(tag + b" OK"):
                raise SystemExit(f"{text!r}: {line!r}")
            return dt, body

        while b"\r\n" not in buf:  # the greeting
            buf += s.recv(4096)
        # Keep what followed the greeting; a leading CRLF lets the first tag be found.
        buf = bytearray(b"\r\n") + buf[buf.find(b"\r\n") + 2 :]
        tok = base64.b64encode(f"{a.user}\0{a.principal}\0{a.secret}".encode())
        cmd(b"L", b"AUTHENTICATE PLAIN " + tok)
        t, body = cmd(b"S", b"SELECT INBOX")
        exists = [int(l.split()[1]) for l in body.split(b"\r\n") if l.endswith(b" EXISTS")]
        n = exists[-1] if exists else 0
        times = {"select": t}
        times["fetch_flags"], _ = cmd(b"F", b"FETCH 1:* (FLAGS UID RFC822.SIZE)")
        times["search"], body = cmd(b"U", b'UID SEARCH HEADER Subject "' + a.search.encode() + b'"')
        hits = len(body.split(b"SEARCH")[-1].split())
        last = min(n, 1000)
        times["fetch_1000"], body = cmd(b"B", b"FETCH 1:%d (BODY.PEEK[])" % last)
        times["fetch_1000_bytes"] = len(body)
        s.sendall(b"O LOGOUT\r\n")
        s.close()
        for k, v in times.items():
            results.setdefault(k, []).append(v)
        results["messages"] = n
        results["search_hits"] = hits
    out = {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in results.items()}
    out["runs"] = {k: v for k, v in results.items() if isinstance(v, list)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
