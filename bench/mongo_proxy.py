#!/usr/bin/env python3
"""A counting TCP proxy for the MongoDB wire protocol (benchmark instrumentation only).

Forwards 127.0.0.1:LISTEN -> UPSTREAM unchanged and writes one JSON line per client command
(OP_MSG / OP_QUERY) to LOG, when its reply passes:
{"conn": n, "cmd": "find", "db": "...", "ms": <request to reply, as seen here>, "doc": "<command, truncated>"}.
bench.py points a tool at the proxy to count the source queries a run issues, independent of
what the server itself can report.

    mongo_proxy.py --listen 27117 --upstream 127.0.0.1:27017 --log FILE
"""
import argparse
import asyncio
import json
import struct
import sys
import time

import bson
from bson import json_util
from bson.codec_options import CodecOptions, DatetimeConversion

# Dates outside Python's range (tidemark's invalid-time scan uses the smallest BSON date).
CODEC = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)

OP_QUERY, OP_MSG, OP_COMPRESSED = 2004, 2013, 2012


def describe(op, body):
    """(command name, db, command document) of one client message, or None."""
    try:
        if op == OP_MSG:
            pos = 4  # flagBits
            while pos < len(body):
                kind = body[pos]
                pos += 1
                if kind == 0:
                    (n,) = struct.unpack_from("<i", body, pos)
                    doc = bson.decode(body[pos:pos + n], codec_options=CODEC)
                    break
                (n,) = struct.unpack_from("<i", body, pos)  # kind 1: document sequence
                pos += n
            else:
                return None
        elif op == OP_QUERY:
            end = body.index(b"\0", 4)
            ns = body[4:end].decode()
            pos = end + 1 + 8
            (n,) = struct.unpack_from("<i", body, pos)
            doc = bson.decode(body[pos:pos + n], codec_options=CODEC)
            doc.setdefault("$db", ns.split(".")[0])
        elif op == OP_COMPRESSED:
            return ("<compressed>", "", {})
        else:
            return (f"<op {op}>", "", {})
        name = next(iter(doc), "<empty>")
        return (name, doc.get("$db", ""), doc)
    except Exception as e:  # never break the stream because of the instrumentation
        return (f"<undecodable: {e}>", "", {})


async def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--upstream", default="127.0.0.1:27017")
    p.add_argument("--log", required=True)
    a = p.parse_args()
    up_host, up_port = a.upstream.rsplit(":", 1)
    log = open(a.log, "a", buffering=1)
    conns = 0

    pending = {}

    def emit(conn, name, db, text, ms):
        log.write(json.dumps({"conn": conn, "cmd": name, "db": db, "ms": ms, "doc": text[:2000]}) + "\n")

    async def pump_client(reader, writer, conn):
        try:
            while True:
                head = await reader.readexactly(16)
                length, rid, _to, op = struct.unpack("<iiii", head)
                body = await reader.readexactly(length - 16)
                d = describe(op, body)
                if d:
                    name, db, doc = d
                    pending[(conn, rid)] = (time.perf_counter(), name, db, json_util.dumps(doc))
                writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def pump_server(reader, writer, conn):
        try:
            while True:
                head = await reader.readexactly(16)
                length, _rid, to, _op = struct.unpack("<iiii", head)
                body = await reader.readexactly(length - 16)
                writer.write(head + body)
                await writer.drain()
                p = pending.pop((conn, to), None)
                if p:
                    emit(conn, p[1], p[2], p[3], round((time.perf_counter() - p[0]) * 1000, 3))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def handle(creader, cwriter):
        nonlocal conns
        conns += 1
        conn = conns
        sreader, swriter = await asyncio.open_connection(up_host, int(up_port))
        await asyncio.gather(pump_client(creader, swriter, conn), pump_server(sreader, cwriter, conn))

    server = await asyncio.start_server(handle, "127.0.0.1", a.listen)
    print(f"proxy listening on 127.0.0.1:{a.listen}", file=sys.stderr, flush=True)
    try:
        async with server:
            await server.serve_forever()
    finally:
        for (conn, _), p in pending.items():
            emit(conn, p[1], p[2], p[3], None)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
