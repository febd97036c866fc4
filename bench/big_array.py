#!/usr/bin/env python3
"""Peak memory of one document with a very large array exploded into a child table.

Inserts into a fresh MongoDB database (BENCH_PREFIX_bigarray) a few ordinary documents and one
document whose `items` array has --elements elements ({u: user id}, plus with --element-text a
text of that many bytes: a fat document with fewer elements), then runs
`tidemark run` (the binary in --bin, default target/release/tidemark) with a small mapping that
explodes `items` into the child table `items` (key: parent id + ordinal; user_id references the
`users` entity, on_missing = "null"), into a fresh SQLite file and a fresh PostgreSQL database.
Prints, per target: the document's BSON size, peak RSS and user/system CPU seconds from
/usr/bin/time -v, and checks that the child table holds exactly --elements rows of that parent.
A control run (--elements 0: ordinary documents only) gives the baseline RSS.

    state/bench-venv/bin/python bench/big_array.py --elements 500000 [--runs 1] [--targets sqlite,pg]

Times are printed, never asserted.
"""
import argparse
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import bson
import psycopg
import pymongo

ROOT = Path(__file__).resolve().parent.parent
MONGO = os.environ.get("TIDEMARK__SOURCE__URI", "mongodb://127.0.0.1:27017")
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
PREFIX = os.environ.get("BENCH_PREFIX", "tm_bench")
T0 = 1_700_000_000

MAPPING = """
version = "big-array-1"

[entities.users]
collection = "users"
id_field = "id"
time_field = "t"
time_encoding = "epoch_seconds"
table = "users"
primary_key = ["id"]
windowed = false

[entities.users.columns]
id = { path = "id", type = "text", required = true }
name = { path = "name", type = "text" }

[entities.things]
collection = "things"
id_field = "id"
time_field = "t"
time_encoding = "epoch_seconds"
table = "things"
primary_key = ["id"]

[entities.things.columns]
id = { path = "id", type = "text", required = true }
title = { path = "title", type = "text" }
updated_at = { path = "t", type = "timestamptz", from = "epoch_seconds", required = true }

[entities.things.children.items]
path = "items"
table = "items"
primary_key = ["thing_id", "position"]

[entities.things.children.items.columns]
thing_id = { parent = "id", type = "text" }
position = { ordinal = true, type = "integer" }
user_id = { path = "u", type = "text", references = "users", on_missing = "null" }
body = { path = "s", type = "text" }
"""


def seed(db, elements, ordinary, text):
    c = pymongo.MongoClient(MONGO)
    c.drop_database(db)
    d = c[db]
    d.users.insert_many([{"id": f"user-{u:05d}", "name": f"User {u}", "t": T0} for u in range(1000)])
    d.things.insert_many([
        {"id": f"thing-{i:06d}", "title": f"Thing {i}", "t": T0 + i,
         "items": [{"u": f"user-{(i + j) % 1000:05d}"} for j in range(5)]}
        for i in range(ordinary)
    ])
    size = 0
    if elements:
        # A user id outside `users` every 1000 elements: the missing-reference policy nulls it.
        big = {"id": "thing-big", "title": "big", "t": T0 + ordinary + 1,
               "items": [dict({"u": f"user-{j % 1001:05d}"}, **({"s": "x" * text} if text else {}))
                         for j in range(elements)]}
        size = len(bson.encode(big))
        d.things.insert_one(big)
    c.close()
    return size


def run(binary, db, target, mapping):
    env = dict(os.environ,
               TIDEMARK__SOURCE__URI=MONGO, TIDEMARK__SOURCE__DATABASE=db,
               TIDEMARK__TARGET__URL=target, TIDEMARK__SYNC__MAPPING=str(mapping),
               TIDEMARK__SYNC__SETTLE="0s", TIDEMARK__SYNC__START="2023-01-01T00:00:00Z",
               TIDEMARK__LOG__FORMAT="json")
    p = subprocess.run(["/usr/bin/time", "-v", str(binary), "run"], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"tidemark failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    grab = lambda k: float(re.search(rf"{k}: ([\d.]+)", p.stderr).group(1))
    return grab("Maximum resident set size \\(kbytes\\)") / 1024, grab("User time \\(seconds\\)"), \
        grab("System time \\(seconds\\)")


def count_items(kind, where, parent):
    q = "SELECT count(*), count(DISTINCT position), count(user_id) FROM items WHERE thing_id = '%s'" % parent
    if kind == "sqlite":
        with sqlite3.connect(where) as c:
            return c.execute(q).fetchone()
    with psycopg.connect(where) as c:
        return c.execute(q).fetchone()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=500_000)
    ap.add_argument("--ordinary", type=int, default=2000)
    ap.add_argument("--element-text", type=int, default=0,
                    help="a text field of this many bytes in each element (a fat document)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--targets", default="sqlite,pg")
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "tidemark"))
    a = ap.parse_args()
    db = f"{PREFIX}_bigarray"
    size = seed(db, a.elements, a.ordinary, a.element_text)
    print(f"document: {a.elements} elements, BSON {size / 2**20:.1f} MiB; {a.ordinary} ordinary documents")
    with tempfile.TemporaryDirectory() as tmp:
        mapping = Path(tmp) / "big.toml"
        mapping.write_text(MAPPING)
        for r in range(a.runs):
            for kind in a.targets.split(","):
                if kind == "sqlite":
                    where = str(Path(tmp) / f"big{r}.db")
                    target = f"sqlite://{where}"
                else:
                    name = f"{db}_pg"
                    with psycopg.connect(f"{PG}/postgres", autocommit=True) as c:
                        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                        c.execute(f'CREATE DATABASE "{name}"')
                    where = target = f"{PG}/{name}"
                rss, user, sys_ = run(a.bin, db, target, mapping)
                rows = count_items(kind, where, "thing-big") if a.elements else "-"
                print(f"{kind:6} run {r}: peak RSS {rss:7.1f} MiB, user {user:6.2f} s, sys {sys_:5.2f} s, "
                      f"big parent's child rows (rows, positions, non-null users): {rows}", flush=True)
                if kind == "pg":
                    with psycopg.connect(f"{PG}/postgres", autocommit=True) as c:
                        c.execute(f'DROP DATABASE IF EXISTS "{db}_pg" WITH (FORCE)')
    pymongo.MongoClient(MONGO).drop_database(db)


if __name__ == "__main__":
    main()
