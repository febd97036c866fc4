#!/usr/bin/env python3
"""Benchmark limit for SQLite: the window's flat rows bulk-inserted into an empty table.

The rows come ready-made (a `marshal` file of tuples, written unmeasured by bench.py from the
same rows as the PostgreSQL COPY limit), so what this measures is SQLite's side: one
transaction, one prepared multi-row `INSERT` (ROWS rows per statement, bound again and again),
into a fresh table with the primary key tidemark gives it, in a database opened the way
tidemark opens its SQLite targets (WAL, `synchronous = NORMAL`, default page size and cache).
Python only loads the file and hands the tuples over; the inserts run in SQLite's C code.

    sqlite_limit.py --rows-file FILE --db PATH --ddl SQL --table NAME --columns N [--rows 100]
"""
import argparse
import itertools
import json
import marshal
import sqlite3
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows-file", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--ddl", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--columns", type=int, required=True)
    p.add_argument("--rows", type=int, default=100, help="rows per INSERT statement")
    a = p.parse_args()
    started = time.monotonic()
    with open(a.rows_file, "rb") as f:
        rows = marshal.load(f)
    db = sqlite3.connect(a.db, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(a.ddl)
    one = "(" + ", ".join("?" * a.columns) + ")"
    full = f"INSERT INTO {a.table} VALUES " + ", ".join([one] * a.rows)
    db.execute("BEGIN")
    n = len(rows) - len(rows) % a.rows
    # executemany re-binds one prepared statement for every group of a.rows rows.
    db.executemany(
        full,
        (tuple(itertools.chain.from_iterable(rows[i:i + a.rows])) for i in range(0, n, a.rows)),
    )
    if n < len(rows):
        rest = rows[n:]
        db.execute(f"INSERT INTO {a.table} VALUES " + ", ".join([one] * len(rest)),
                   tuple(itertools.chain.from_iterable(rest)))
    db.execute("COMMIT")
    db.close()
    print(json.dumps({"rows": len(rows), "secs": round(time.monotonic() - started, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
