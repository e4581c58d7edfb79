"""POP3 through Python's poplib against the filer: the proxy's trusted login issued as a raw
command, then STAT/LIST/UIDL/TOP/RETR/DELE/QUIT. Exits non-zero with a message on any surprise.

usage: pop3_client.py HOST PORT USER PRINCIPAL SECRET
"""
import base64
import poplib
import socket
import sys

host, port, user, principal, secret = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]


def check(cond, what):
    if not cond:
        print("FAILED:", what)
        sys.exit(1)


def token(authz, authc, pw):
    return base64.b64encode(f"{authz}\0{authc}\0{pw}".encode()).decode()


def login(p):
    return p._shortcmd("AUTH PLAIN " + token(user, principal, secret))


p = poplib.POP3(host, port, timeout=10)
caps = p.capa()
check("UIDL" in caps and "TOP" in caps and "RESP-CODES" in caps, f"capabilities {caps}")
check(caps.get("SASL") == ["PLAIN"], f"SASL {caps}")
check("USER" not in caps, "USER must not be offered")

# Plain USER/PASS is refused on the filer.
try:
    p.user(user)
    check(False, "USER accepted")
except poplib.error_proto as e:
    check(b"[AUTH]" in e.args[0], f"USER reply {e}")

# A wrong secret, a wrong principal, and a user acting as the principal are refused.
for bad in (token(user, principal, secret + "x"), token(user, "someone", secret), token(principal, user, secret)):
    try:
        p._shortcmd("AUTH PLAIN " + bad)
        check(False, "bad trusted login accepted")
    except poplib.error_proto as e:
        check(e.args[0].startswith(b"-ERR [AUTH]"), f"bad login reply {e}")
p.sock.close()

p = poplib.POP3(host, port, timeout=10)
check(login(p).startswith(b"+OK"), "trusted login")

# A second session on the same mailbox is refused while this one holds it.
q = poplib.POP3(host, port, timeout=10)
try:
    login(q)
    check(False, "second session got the lock")
except poplib.error_proto as e:
    check(e.args[0].startswith(b"-ERR [IN-USE]"), f"second session {e}")
q.sock.close()

count, size = p.stat()
check(count == 2, f"STAT {count} {size}")
_, listing, _ = p.list()
check(len(listing) == 2 and sum(int(l.split()[1]) for l in listing) == size, f"LIST {listing}")
_, uidls, _ = p.uidl()
uids = [l.split()[1] for l in uidls]
check(len(set(uids)) == 2, f"UIDL {uidls}")
_, top, _ = p.top(1, 0)
check(top[-1] == b"" and any(l.startswith(b"Subject: first") for l in top), f"TOP 1 0 {top}")
check(not any(l.startswith(b"line") for l in top), f"TOP 1 0 sent body lines {top}")
_, top1, _ = p.top(2, 1)
check(top1[-1] == b"..starts with a dot" or top1[-1] == b".starts with a dot", f"TOP 2 1 {top1}")
_, lines, octets = p.retr(2)
check(b".starts with a dot" in lines and lines[-1] == b"last line", f"RETR {lines}")
check(p.dele(1).startswith(b"+OK"), "DELE")
try:
    p.retr(1)
    check(False, "RETR of a deleted message")
except poplib.error_proto:
    pass
check(p.stat()[0] == 1, "STAT after DELE")
# Dropping the connection without QUIT deletes nothing.
p.sock.close()

p = poplib.POP3(host, port, timeout=10)
login(p)
check(p.stat()[0] == 2, "a dropped connection deleted something")
_, again, _ = p.uidl()
check([l.split()[1] for l in again] == uids, "UIDL changed between sessions")
p.dele(1)
p.quit()

p = poplib.POP3(host, port, timeout=10)
login(p)
count, _ = p.stat()
check(count == 1, f"QUIT did not delete: {count}")
_, last, _ = p.uidl()
check(last[0].split()[1] == uids[1], f"the remaining message kept its UIDL: {last} {uids}")
p.quit()
print("ok")
