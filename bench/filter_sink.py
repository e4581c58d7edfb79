#!/usr/bin/env python3
"""A reinjection sink for bench/filter.sh: an SMTP server on loopback that accepts every
message and records, per message, the filter's verdict headers.

    filter_sink.py 127.0.0.1:PORT OUT.jsonl

For each message it appends one JSON line to OUT.jsonl before answering 250 (the filter answers
its client only after that 250, so a message the sender saw accepted is already recorded):
    {"rcpt": [...], "from": "...", "flag": true|false, "score": 7.3, "status": "Yes, score=..."}
"flag" is whether the header section holds `X-Spam-Flag: YES`. Speaks EHLO/HELO, MAIL, RCPT,
DATA, RSET, NOOP, QUIT, with PIPELINING. Stops on SIGTERM/SIGINT.
"""

import asyncio
import json
import re
import signal
import sys

LIMIT = 256 << 20


def verdict(message: bytes) -> dict:
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    # Unfold, then look at the fields.
    head = re.sub(rb"\r\n[ \t]+", b" ", head)
    flag, score, status = False, None, None
    for line in head.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        value = value.strip().decode("utf-8", "replace")
        if name == b"x-spam-flag" and value.upper() == "YES":
            flag = True
        elif name == b"x-spam-score" and score is None:
            try:
                score = float(value)
            except ValueError:
                pass
        elif name == b"x-spam-status" and status is None:
            status = value
    return {"flag": flag, "score": score, "status": status}


def address(arg: bytes) -> str:
    arg = arg.strip()
    if arg.startswith(b"<"):
        arg = arg[1:].split(b">", 1)[0]
    else:
        arg = arg.split(b" ", 1)[0]
    return arg.decode("utf-8", "replace")


async def session(reader, writer, out):
    writer.write(b"220 sink.test ESMTP bench sink\r\n")
    mail_from, rcpts = None, []
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            upper = line[:10].upper()
            if upper.startswith(b"EHLO"):
                writer.write(
                    b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                    b"250-ENHANCEDSTATUSCODES\r\n250 SIZE 268435456\r\n"
                )
            elif upper.startswith(b"HELO"):
                writer.write(b"250 sink.test\r\n")
            elif upper.startswith(b"MAIL FROM:"):
                mail_from, rcpts = address(line[10:]), []
                writer.write(b"250 2.1.0 ok\r\n")
            elif upper.startswith(b"RCPT TO:"):
                if mail_from is None:
                    writer.write(b"503 5.5.1 MAIL first\r\n")
                else:
                    rcpts.append(address(line[8:]))
                    writer.write(b"250 2.1.5 ok\r\n")
            elif upper.startswith(b"DATA"):
                if mail_from is None or not rcpts:
                    writer.write(b"503 5.5.1 MAIL and RCPT first\r\n")
                    continue
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                data = await reader.readuntil(b"\r\n.\r\n")
                record = verdict(data)
                record["rcpt"] = rcpts
                record["from"] = mail_from
                record["size"] = len(data) - 3
                out.write(json.dumps(record) + "\n")
                out.flush()
                mail_from, rcpts = None, []
                writer.write(b"250 2.0.0 recorded\r\n")
            elif upper.startswith(b"RSET"):
                mail_from, rcpts = None, []
                writer.write(b"250 2.0.0 ok\r\n")
            elif upper.startswith(b"NOOP"):
                writer.write(b"250 2.0.0 ok\r\n")
            elif upper.startswith(b"QUIT"):
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"502 5.5.1 not implemented\r\n")
            # Pipelined commands: answer them together.
            if not reader._buffer:  # noqa: SLF001 - asyncio has no public "buffered" query
                await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        print(f"filter_sink: session error: {e!r}", file=sys.stderr)
    finally:
        writer.close()


async def main():
    host, port = sys.argv[1].rsplit(":", 1)
    if host not in ("127.0.0.1", "::1", "localhost"):
        sys.exit("filter_sink: loopback only")
    out = open(sys.argv[2], "a", encoding="utf-8")
    server = await asyncio.start_server(
        lambda r, w: session(r, w, out), host, int(port), limit=LIMIT, backlog=512
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"filter_sink: listening on {host}:{port}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()
    out.close()


if __name__ == "__main__":
    asyncio.run(main())
