#!/usr/bin/env python3
"""The hand-written baseline of the benchmark: what a careful engineer writes and measures.

The cursor over the window, sorted on (time field, _id), fetches 10,000 documents per round
trip and is streamed straight into psycopg `COPY` to a temporary stage table; every 50,000 rows
the COPY ends and one `INSERT ... SELECT ... ON CONFLICT (id) DO UPDATE` moves the stage into
the target, one transaction per chunk (the stage empties itself on commit). No chunk is held
as a Python list. The same id twice in a chunk is rare: the script remembers the chunk's ids
and only a chunk that holds a duplicate pays for `DISTINCT ON (id) ... ORDER BY id, seq DESC`
(the last version in cursor order wins); the others go in as they are, without a sort.

Copies documentInfo into the same flat table as bench/flat.toml (id, owner, title, created_at,
updated_at, forked_from, doc as jsonb). bench/baseline_naive.py is the weaker script the
benchmark used until session 15.

    baseline.py --mongo URI --db DB --pg DSN --from EPOCH_S --to EPOCH_S [--chunk 50000]
                [--batch-size 10000] [--upvotes-count]
"""
import argparse
import json
import sys
import time
from datetime import datetime, timezone

import psycopg
import pymongo

COLUMNS = ["id", "owner", "title", "created_at", "updated_at", "forked_from", "doc"]


def ts(v):
    """Epoch seconds (int32, int64 or double) -> aware datetime; anything else -> None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return datetime.fromtimestamp(v, tz=timezone.utc)
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mongo", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--pg", required=True)
    p.add_argument("--from", dest="lo", type=int, required=True)
    p.add_argument("--to", dest="hi", type=int, required=True)
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--upvotes-count", action="store_true")
    a = p.parse_args()
    cols = COLUMNS + (["upvotes_count"] if a.upvotes_count else [])

    started = time.monotonic()
    coll = pymongo.MongoClient(a.mongo)[a.db]["documentInfo"]
    cursor = (
        coll.find({"documentType": "viz", "lastUpdatedTimestamp": {"$gte": a.lo, "$lt": a.hi}})
        .sort([("lastUpdatedTimestamp", 1), ("_id", 1)])
        .batch_size(a.batch_size)
    )
    docs = iter(cursor)

    with psycopg.connect(a.pg) as conn:
        extra = ", upvotes_count INTEGER" if a.upvotes_count else ""
        conn.execute(
            "CREATE TABLE IF NOT EXISTS vizzes (id TEXT NOT NULL PRIMARY KEY, owner TEXT, title TEXT, "
            "created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ, forked_from TEXT, doc JSONB" + extra + ")"
        )
        conn.execute(
            "CREATE TEMP TABLE stage (LIKE vizzes INCLUDING DEFAULTS, seq BIGINT) ON COMMIT DELETE ROWS"
        )
        conn.commit()
        collist = ", ".join(cols)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c != "id")
        conflict = f"ON CONFLICT (id) DO UPDATE SET {updates}"
        plain = f"INSERT INTO vizzes ({collist}) SELECT {collist} FROM stage {conflict}"
        dedup = (
            f"INSERT INTO vizzes ({collist}) SELECT DISTINCT ON (id) {collist} FROM stage "
            f"ORDER BY id, seq DESC {conflict}"
        )

        read = written = seq = 0
        exhausted = False
        while not exhausted:
            ids = set()
            dup = False
            rows = 0
            with conn.cursor() as cur:
                with cur.copy(f"COPY stage ({collist}, seq) FROM STDIN") as cp:
                    for d in docs:
                        read += 1
                        seq += 1
                        key = d.get("id")
                        if key is None:
                            continue
                        if key in ids:
                            dup = True
                        else:
                            ids.add(key)
                        row = (
                            key,
                            d.get("owner"),
                            d.get("title"),
                            ts(d.get("createdTimestamp")),
                            ts(d.get("lastUpdatedTimestamp")),
                            d.get("forkedFrom"),
                            json.dumps(d, default=str),
                        )
                        if a.upvotes_count:
                            row += (len(d.get("upvotes") or []),)
                        cp.write_row(row + (seq,))
                        rows += 1
                        if rows >= a.chunk:
                            break
                    else:
                        exhausted = True
                if rows:
                    cur.execute(dedup if dup else plain)
                    written += cur.rowcount
            conn.commit()

    secs = time.monotonic() - started
    print(json.dumps({"read": read, "written": written, "secs": round(secs, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
