#!/usr/bin/env python3
"""The NAIVE hand-written baseline of the benchmark (until session 15 the only one; the weaker one):
what an engineer writes in an afternoon without measuring. bench/baseline.py is the careful one.

pymongo cursor over the window sorted on (time field, _id) -> rows -> every 50,000 rows:
psycopg COPY into a staging table, then one INSERT ... SELECT ... ON CONFLICT (id) DO UPDATE
into the target table, one transaction per chunk. Copies documentInfo into the same flat table
as bench/flat.toml (id, owner, title, created_at, updated_at, forked_from, doc as jsonb).

    baseline_naive.py --mongo URI --db DB --pg DSN --from EPOCH_S --to EPOCH_S [--chunk 50000] [--upvotes-count]
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
    p.add_argument("--upvotes-count", action="store_true")
    a = p.parse_args()
    cols = COLUMNS + (["upvotes_count"] if a.upvotes_count else [])

    started = time.monotonic()
    coll = pymongo.MongoClient(a.mongo)[a.db]["documentInfo"]
    cursor = coll.find(
        {"documentType": "viz", "lastUpdatedTimestamp": {"$gte": a.lo, "$lt": a.hi}}
    ).sort([("lastUpdatedTimestamp", 1), ("_id", 1)])

    with psycopg.connect(a.pg) as conn:
        extra = ", upvotes_count INTEGER" if a.upvotes_count else ""
        conn.execute(
            "CREATE TABLE IF NOT EXISTS vizzes (id TEXT NOT NULL PRIMARY KEY, owner TEXT, title TEXT, "
            "created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ, forked_from TEXT, doc JSONB" + extra + ")"
        )
        conn.execute(
            "CREATE TEMP TABLE staging (LIKE vizzes INCLUDING DEFAULTS, seq BIGINT) ON COMMIT DELETE ROWS"
        )
        conn.commit()
        collist = ", ".join(cols)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c != "id")
        # The same id may appear twice in a chunk: keep its last version (cursor order).
        upsert = (
            f"INSERT INTO vizzes ({collist}) SELECT DISTINCT ON (id) {collist} FROM staging "
            f"ORDER BY id, seq DESC ON CONFLICT (id) DO UPDATE SET {updates}"
        )

        read = written = seq = 0
        chunk = []

        def flush():
            nonlocal written
            if not chunk:
                return
            with conn.cursor() as cur:
                with cur.copy(f"COPY staging ({collist}, seq) FROM STDIN") as cp:
                    for row in chunk:
                        cp.write_row(row)
                cur.execute(upsert)
                written += cur.rowcount
            conn.commit()
            chunk.clear()

        for d in cursor:
            read += 1
            seq += 1
            if d.get("id") is None:
                continue
            row = [
                d.get("id"),
                d.get("owner"),
                d.get("title"),
                ts(d.get("createdTimestamp")),
                ts(d.get("lastUpdatedTimestamp")),
                d.get("forkedFrom"),
                json.dumps(d, default=str),
            ]
            if a.upvotes_count:
                row.append(len(d.get("upvotes") or []))
            row.append(seq)
            chunk.append(row)
            if len(chunk) >= a.chunk:
                flush()
        flush()

    secs = time.monotonic() - started
    print(json.dumps({"read": read, "written": written, "secs": round(secs, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
