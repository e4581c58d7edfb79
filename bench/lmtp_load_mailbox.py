#!/usr/bin/env python3
"""Fills ONE mailbox over LMTP, for the large-mailbox IMAP benchmark ([M3]).

mailbench cannot vary the Subject, so this loader does: message n (1-based) has
Subject "bench message n", and every --needle-every-th message (n % 100 == 0 by default) has
Subject "bench needle message n", so `UID SEARCH HEADER Subject needle` has COUNT/100 hits.
Each message is exactly --size bytes as stored (CRLF line ends, before dot-stuffing).

--sessions parallel LMTP connections (processes), each sending its share back to back:
LHLO once, then MAIL / RCPT / DATA / message / '.' per message; every reply must be 250
(354 for DATA), else it exits non-zero. Prints one JSON line (count, seconds, msg/s).

usage: lmtp_load_mailbox.py HOST:PORT RCPT [--count 100000] [--size 4096] [--sessions 8]
                            [--needle-every 100]
"""
import argparse
import json
import multiprocessing as mp
import socket
import sys
import time


def message(n, size, needle_every, rcpt):
    subj = "bench needle message %d" % n if n % needle_every == 0 else "bench message %d" % n
    head = (
        "From: <loader@example.net>\r\n"
        "To: <%s>\r\n"
        "Subject: %s\r\n"
        "Date: Fri, 27 Nov 2026 08:00:00 +0000\r\n"
        "Message-ID: <load.%d@loader.example.net>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n" % (rcpt, subj, n)
    ).encode()
    left = size - len(head)
    assert left >= 2, "size too small"
    lines = []
    line = b"x" * 74 + b"\r\n"  # 76 bytes per line
    while left >= len(line) + 2:
        lines.append(line)
        left -= len(line)
    lines.append(b"y" * (left - 2) + b"\r\n")
    body = b"".join(lines)
    msg = head + body
    assert len(msg) == size, (len(msg), size)
    return msg


class Conn:
    def __init__(self, host, port):
        self.s = socket.create_connection((host, port), timeout=120)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.s.makefile("rb")

    def reply(self):
        lines = []
        while True:
            l = self.f.readline()
            if not l:
                raise SystemExit("connection closed")
            lines.append(l)
            if len(l) < 4 or l[3:4] != b"-":
                return int(l[:3]), b"".join(lines)

    def expect(self, code, what):
        c, text = self.reply()
        if c != code:
            raise SystemExit("%s: expected %d, got %r" % (what, code, text))


def worker(args):
    host, port, rcpt, ns, size, needle_every = args
    c = Conn(host, port)
    c.expect(220, "greeting")
    c.s.sendall(b"LHLO loader.example.net\r\n")
    c.expect(250, "LHLO")
    for n in ns:
        c.s.sendall(b"MAIL FROM:<loader@example.net>\r\n")
        c.expect(250, "MAIL")
        c.s.sendall(b"RCPT TO:<" + rcpt.encode() + b">\r\n")
        c.expect(250, "RCPT")
        c.s.sendall(b"DATA\r\n")
        c.expect(354, "DATA")
        m = message(n, size, needle_every, rcpt)  # no line starts with '.': no stuffing
        c.s.sendall(m + b".\r\n")
        c.expect(250, "EOM %d" % n)
    c.s.sendall(b"QUIT\r\n")
    try:
        c.reply()
    except (SystemExit, OSError):
        pass
    return len(ns)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("rcpt")
    ap.add_argument("--count", type=int, default=100000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--needle-every", type=int, default=100)
    a = ap.parse_args()
    host, port = a.target.rsplit(":", 1)
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("loopback targets only")
    jobs = [
        (host, int(port), a.rcpt, list(range(1 + i, a.count + 1, a.sessions)), a.size, a.needle_every)
        for i in range(a.sessions)
    ]
    t0 = time.time()
    with mp.Pool(a.sessions) as pool:
        sent = sum(pool.map(worker, jobs))
    dt = time.time() - t0
    print(json.dumps({"count": sent, "needles": a.count // a.needle_every, "seconds": round(dt, 1),
                      "msg_per_s": round(sent / dt, 1)}))


if __name__ == "__main__":
    main()
