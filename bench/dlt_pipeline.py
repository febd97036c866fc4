#!/usr/bin/env python3
"""dlt for the benchmark: documentInfo -> the flat `vizzes` table, the way dlt's docs suggest.

A `@dlt.resource` reading the window with pymongo, `dlt.sources.incremental` on the time field
(`updated_at`, the document's lastUpdatedTimestamp) bounded by initial_value/end_value (a
`[from, to)` backfill), `write_disposition="merge"` on primary key `id`, destination postgres.
The whole document goes into a json column (`doc`), as in bench/flat.toml.

    dlt_pipeline.py --mongo URI --db DB --pg DSN --from EPOCH_S --to EPOCH_S --workdir DIR [--upvotes-count]
"""
import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")

import dlt  # noqa: E402
import pymongo  # noqa: E402


def ts(v):
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
    p.add_argument("--workdir", required=True, help="dlt's pipelines_dir (use a fresh one per run)")
    p.add_argument("--dataset", default="bench")
    p.add_argument("--upvotes-count", action="store_true")
    a = p.parse_args()

    started = time.monotonic()
    coll = pymongo.MongoClient(a.mongo)[a.db]["documentInfo"]
    stats = {"read": 0}

    @dlt.resource(
        name="vizzes",
        primary_key="id",
        write_disposition="merge",
        columns={"doc": {"data_type": "json"}, "updated_at": {"dedup_sort": "desc"}},
    )
    def vizzes(
        updated_at=dlt.sources.incremental(
            "updated_at",
            initial_value=datetime.fromtimestamp(a.lo, tz=timezone.utc),
            end_value=datetime.fromtimestamp(a.hi, tz=timezone.utc),
        ),
    ):
        lo = int(updated_at.start_value.timestamp())
        hi = int(updated_at.end_value.timestamp())
        cursor = coll.find(
            {"documentType": "viz", "lastUpdatedTimestamp": {"$gte": lo, "$lt": hi}}
        ).sort([("lastUpdatedTimestamp", 1), ("_id", 1)])
        for d in cursor:
            stats["read"] += 1
            if d.get("id") is None:
                continue
            d["_id"] = str(d["_id"])
            row = {
                "id": d.get("id"),
                "owner": d.get("owner"),
                "title": d.get("title"),
                "created_at": ts(d.get("createdTimestamp")),
                "updated_at": ts(d.get("lastUpdatedTimestamp")),
                "forked_from": d.get("forkedFrom"),
                "doc": d,
            }
            if a.upvotes_count:
                row["upvotes_count"] = len(d.get("upvotes") or [])
            yield row

    # dlt insists on a password; with trust authentication any placeholder does.
    pg = a.pg
    parts = urlsplit(pg)
    if parts.username and parts.password is None:
        pg = urlunsplit(parts._replace(netloc=f"{parts.username}:unused@{parts.hostname}:{parts.port or 5432}"))
    pipeline = dlt.pipeline(
        pipeline_name="tm_bench",
        pipelines_dir=a.workdir,
        destination=dlt.destinations.postgres(credentials=pg),
        dataset_name=a.dataset,
    )
    info = pipeline.run(vizzes())
    if info.has_failed_jobs:
        print(info, file=sys.stderr)
        return 1
    secs = time.monotonic() - started
    print(json.dumps({"read": stats["read"], "secs": round(secs, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
