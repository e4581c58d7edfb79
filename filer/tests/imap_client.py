"""IMAP through Python's imaplib against the filer: the proxy's trusted login, then append,
search, fetch, flag, copy, move, expunge and folder commands. Exits non-zero on any surprise.

usage: imap_client.py HOST PORT USER PRINCIPAL SECRET
"""
import imaplib
import re
import sys

host, port, user, principal, secret = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]


def check(cond, what):
    if not cond:
        print("FAILED:", what)
        sys.exit(1)


def ok(resp, what):
    typ, data = resp
    check(typ == "OK", f"{what}: {typ} {data}")
    return data


m = imaplib.IMAP4(host, port, timeout=10)
caps = m.capabilities
for c in ("IMAP4REV1", "IDLE", "UIDPLUS", "MOVE", "LITERAL+", "NAMESPACE", "ID", "ENABLE", "UNSELECT",
          "CHILDREN", "SPECIAL-USE", "SASL-IR", "QUOTA", "CONDSTORE", "AUTH=PLAIN"):
    check(c in caps, f"capability {c} in {caps}")

# LOGIN is refused on the filer; only the proxy's trusted login works.
try:
    m.login(user, "password")
    check(False, "LOGIN accepted")
except imaplib.IMAP4.error as e:
    check("PRIVACYREQUIRED" in str(e) or "not available" in str(e), f"LOGIN refusal {e}")
try:
    m.authenticate("PLAIN", lambda _: f"{user}\0{principal}\0wrong-secret".encode())
    check(False, "wrong secret accepted")
except imaplib.IMAP4.error as e:
    check("AUTHENTICATIONFAILED" in str(e), f"bad secret {e}")
ok(m.authenticate("PLAIN", lambda _: f"{user}\0{principal}\0{secret}".encode()), "trusted login")

# Folders: the special-use ones exist.
listing = ok(m.list(), "LIST")
text = b"\n".join(listing).decode()
for name, attr in (("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Junk", "\\Junk"), ("Trash", "\\Trash")):
    check(re.search(r"\(.*" + re.escape(attr) + r".*\) \"/\" \"?" + name, text), f"{name} {attr} in {text}")
check('"/" INBOX' in text or '"/" "INBOX"' in text, f"INBOX listed: {text}")
ok(m.create("Archive"), "CREATE")
ok(m.create("Archive/2024"), "CREATE child")
typ, _ = m.create("Archive")
check(typ == "NO", "CREATE existing")
text = b"\n".join(ok(m.list('""', "Archive*"), "LIST pattern")).decode()
check("\\HasChildren" in text and "Archive/2024" in text, f"children: {text}")
ok(m.create("Entw\u00fcrfe".encode("utf-7").decode().replace("+", "&").replace("/", ",")), "CREATE utf7")
text = b"\n".join(ok(m.list('""', "%"), "LIST %")).decode()
check("Entw&APw-rfe" in text and "Archive/2024" not in text, f"LIST %: {text}")

msg = lambda subject, body, frm="Alice <alice@example.org>": (
    f"From: {frm}\r\nTo: {user}\r\nSubject: {subject}\r\nDate: Mon, 7 Feb 1994 21:52:25 -0800\r\n"
    f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n\r\n{body}\r\n").encode()
data = ok(m.append("INBOX", "(\\Seen)", imaplib.Time2Internaldate(1700000000), msg("first note", "hello world")), "APPEND")
check(b"APPENDUID" in data[0], f"APPENDUID {data}")
ok(m.append("INBOX", None, None, msg("second note", "the quick brown fox", "Bob <bob@example.net>")), "APPEND 2")
ok(m.append("INBOX", "(\\Flagged $Important)", None, msg("third", "x" * 5000)), "APPEND 3")
typ, _ = m.append("NoSuchBox", None, None, msg("x", "y"))
check(typ == "NO", "APPEND to a missing mailbox")

typ, data = m.select("INBOX")
check(typ == "OK" and data[0] == b"3", f"SELECT {data}")
check(m.untagged_responses.get("UIDVALIDITY"), "UIDVALIDITY")

def search(*crit):
    return ok(m.search(None, *crit), f"SEARCH {crit}")[0].split()

check(search("ALL") == [b"1", b"2", b"3"], "SEARCH ALL")
check(search("UNSEEN") == [b"2", b"3"], f"SEARCH UNSEEN {search('UNSEEN')}")
check(search("SUBJECT", "second") == [b"2"], "SEARCH SUBJECT")
check(search("FROM", "bob") == [b"2"], "SEARCH FROM")
check(search("BODY", "brown") == [b"2"], "SEARCH BODY")
check(search("TEXT", "alice") == [b"1", b"3"], f"SEARCH TEXT {search('TEXT', 'alice')}")
check(search("HEADER", "Message-ID", "third") == [b"3"], "SEARCH HEADER")
check(search("LARGER", "2000") == [b"3"], "SEARCH LARGER")
check(search("OR", "FLAGGED", "SEEN") == [b"1", b"3"], "SEARCH OR")
check(search("NOT", "SEEN") == [b"2", b"3"], "SEARCH NOT")
check(search("KEYWORD", "$Important") == [b"3"], "SEARCH KEYWORD")
check(search("SINCE", "1-Jan-2020") == [b"1", b"2", b"3"], "SEARCH SINCE")
check(search("SENTBEFORE", "1-Jan-2000") == [b"1", b"2", b"3"], "SEARCH SENTBEFORE")
check(search("2:*") == [b"2", b"3"], "SEARCH seq")
uids = ok(m.uid("SEARCH", None, "ALL"), "UID SEARCH")[0].split()
check(len(uids) == 3, f"UID SEARCH {uids}")

data = ok(m.fetch("1:3", "(FLAGS UID RFC822.SIZE INTERNALDATE)"), "FETCH fast")
check(len(data) == 3 and b"RFC822.SIZE" in data[0] and b"17:13:20 +0000" in data[0] or b"14-Nov-2023" in data[0], f"FETCH {data}")
data = ok(m.fetch("2", "(ENVELOPE)"), "FETCH ENVELOPE")
check(b'"second note"' in data[0] and b'("bob" nil "bob" "example.net")' in data[0].lower(), f"ENVELOPE {data}")
data = ok(m.fetch("2", "(BODYSTRUCTURE)"), "FETCH BODYSTRUCTURE")
check(b'"TEXT" "PLAIN"' in data[0].upper(), f"BODYSTRUCTURE {data}")
data = ok(m.fetch("2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"), "FETCH HEADER.FIELDS")
check(data[0][1].strip() == b"Subject: second note", f"HEADER.FIELDS {data}")
data = ok(m.fetch("2", "(BODY.PEEK[TEXT]<4.5>)"), "FETCH partial")
check(data[0][1] == b"quick", f"partial {data}")
check(search("UNSEEN") == [b"2", b"3"], "PEEK kept \\Seen off")
data = ok(m.fetch("2", "(BODY[])"), "FETCH BODY[]")
check(data[0][1].startswith(b"From: Bob") and b"\\Seen" in data[0][0] + (data[1] if len(data) > 1 and isinstance(data[1], bytes) else b""), f"BODY[] sets Seen {data}")
check(search("UNSEEN") == [b"3"], "BODY[] set \\Seen")

data = ok(m.store("1", "+FLAGS", "(\\Deleted)"), "STORE")
check(b"\\Deleted" in data[0], f"STORE reply {data}")
ok(m.store("2", "+FLAGS.SILENT", "(\\Answered)"), "STORE SILENT")
check(search("ANSWERED") == [b"2"], "ANSWERED")
ok(m.store("2", "-FLAGS", "(\\Answered)"), "STORE -FLAGS")

typ, data = m.uid("COPY", uids[1].decode(), "Archive")
check(typ == "OK", f"UID COPY {data}")
typ, data = m.uid("MOVE", uids[2].decode(), "Archive/2024")
check(typ == "OK", f"UID MOVE {typ} {data}")
check(m.untagged_responses.get("COPYUID"), f"MOVE sends COPYUID in an untagged OK: {m.untagged_responses}")
check(search("ALL") == [b"1", b"2"], f"after MOVE {search('ALL')}")
ok(m.expunge(), "EXPUNGE")
check(search("ALL") == [b"1"], f"after EXPUNGE {search('ALL')}")
st = ok(m.status("Archive", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN)"), "STATUS")[0]
check(b"MESSAGES 1" in st, f"STATUS {st}")
st = ok(m.status("Archive/2024", "(MESSAGES)"), "STATUS child")[0]
check(b"MESSAGES 1" in st, f"STATUS child {st}")
ok(m.select("Archive/2024", readonly=True), "EXAMINE")
typ, _ = m.store("1", "+FLAGS", "(\\Seen)")
check(typ == "NO", "STORE in a read-only mailbox")
ok(m.select("INBOX"), "SELECT again")
ok(m.rename("Archive", "Old"), "RENAME")
text = b"\n".join(ok(m.list('""', "*"), "LIST *")).decode()
check("Old/2024" in text and "Archive" not in text, f"after RENAME {text}")
ok(m.delete("Old/2024"), "DELETE")
typ, _ = m.delete("INBOX")
check(typ == "NO", "DELETE INBOX refused")
ok(m.subscribe("Old"), "SUBSCRIBE")
text = b"\n".join(ok(m.lsub('""', "*"), "LSUB")).decode()
check("Old" in text, f"LSUB {text}")
q = ok(m.getquotaroot("INBOX"), "GETQUOTAROOT")
check(q, f"quota {q}")
ok(m.logout(), "LOGOUT") if False else m.logout()
print("ok")
