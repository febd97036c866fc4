#!/usr/bin/env python3
"""tidemark's benchmark driver (run it through bench/run.sh, which prepares the venv and the build).

Seeds the demo data set into a dedicated source database, picks one window over documentInfo,
then, alternating between tools, copies that window into fresh PostgreSQL databases (and SQLite
files) with tidemark (flat and full mapping), a hand-written baseline, dlt and the two limits,
checks that every tool copied exactly the window, and prints / writes a results table.
Then measures a run with nothing new and a one-day window as the collection grows.
Asserts nothing about time: figures are reported, wrong results are flagged.
"""
import argparse
import collections
import datetime as dt
import hashlib
import json
import marshal
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pymongo

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
STATE = ROOT / "state" / "bench"
LOGS = STATE / "logs"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
BIN = Path(os.environ.get("BENCH_TIDEMARK_BIN") or TARGET / "dist" / "tidemark")
READ_LIMIT = Path(os.environ.get("BENCH_READ_LIMIT_BIN") or TARGET / "dist" / "examples" / "read_limit")
PY = sys.executable
MONGO = os.environ.get("TIDEMARK__SOURCE__URI", "mongodb://127.0.0.1:27017")
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
# Every database the benchmark creates (source and targets) and drops is named PREFIX_*; give
# each concurrent benchmark on one server its own (BENCH_PREFIX), since leftovers are dropped.
PREFIX = os.environ.get("BENCH_PREFIX", "tm_bench")
TIME_FIELD = "lastUpdatedTimestamp"
FLAT_COLS = ["id", "owner", "title", "created_at", "updated_at", "forked_from", "doc"]
UPVOTES_LINE = 'upvotes_count = { expr = "size(doc.upvotes)", type = "integer" }\n'
# The day used for the "one-day window" measurement (inside the demo's 2016..2026 range).
ONE_DAY = dt.datetime(2024, 6, 3, tzinfo=dt.timezone.utc)
CLK = os.sysconf("SC_CLK_TCK")
REUSE_SOURCE = False
# Driver handshake and server monitoring, not counted as source queries.
HANDSHAKE = {"hello", "isMaster", "ismaster", "ping", "endSessions", "saslStart", "saslContinue", "buildInfo"}


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def iso(secs):
    return dt.datetime.fromtimestamp(secs, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pg_url(db):
    return f"{PG}/{db}"


def admin():
    return psycopg.connect(pg_url("postgres"), autocommit=True)


def create_db(name):
    with admin() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')


def settle_servers():
    """Every measured run starts from the same server state: PostgreSQL flushes what earlier
    runs left dirty (a CHECKPOINT) and the kernel writes back dirty pages, so no run pays for
    the WAL and writeback of the run before it (the first run after the warm-up did, ~1 s)."""
    try:
        with admin() as c:
            c.execute("CHECKPOINT")
    except Exception as e:  # not a superuser: measure anyway, and say so once
        if not getattr(settle_servers, "warned", False):
            log(f"CHECKPOINT before runs failed ({e}); runs may pay for earlier runs' writeback")
            settle_servers.warned = True
    os.sync()


def drop_db(name):
    with admin() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_leftover_dbs():
    with admin() as c:
        like = PREFIX.replace("_", "\\_") + "\\_%"
        names = [r[0] for r in c.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (like,))]
    for n in names:
        drop_db(n)
    if names:
        log(f"dropped {len(names)} leftover PostgreSQL database(s) of an earlier run")


# ---------------------------------------------------------------------------------------------
# CPU accounting of the two servers (what the databases spent while a tool ran)
# ---------------------------------------------------------------------------------------------
def _stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    # fields after comm: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17)
    return {"ppid": int(rest[1]), "u": int(rest[11]), "s": int(rest[12]), "cu": int(rest[13]), "cs": int(rest[14])}


def _comm(pid):
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _listener(port):
    """pid of the process listening on 127.0.0.1:port (several servers may run on this host)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f[9])
        except OSError:
            pass
    for pid in _pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return pid
        except OSError:
            continue
    return None


def server_pids():
    hostport = MONGO.split("://", 1)[1].split("/", 1)[0].split(",")[0]
    port = int(hostport.rsplit(":", 1)[1]) if ":" in hostport else 27017
    mongo, postmaster = _listener(port), None
    for pid in _pids():
        if _comm(pid) == "postgres":
            st = _stat(pid)
            if st and _comm(st["ppid"]) != "postgres":
                postmaster = pid
                break
    return mongo, postmaster


def cpu_snapshot(pids):
    mongo, pm = pids
    out = {"mongo": None, "pg": None}
    if mongo:
        st = _stat(mongo)
        out["mongo"] = (st["u"] + st["s"]) / CLK if st else None
    if pm:
        st = _stat(pm)
        if st:
            total = st["u"] + st["s"] + st["cu"] + st["cs"]
            for pid in _pids():
                c = _stat(pid)
                if c and c["ppid"] == pm:
                    total += c["u"] + c["s"]
            out["pg"] = total / CLK
    return out


# ---------------------------------------------------------------------------------------------
# Running one measured command
# ---------------------------------------------------------------------------------------------
def timed(name, cmd, env=None, stdin=None):
    """Run cmd under /usr/bin/time -v; return wall, peak RSS, CPU, server CPU, stdout, rc."""
    LOGS.mkdir(parents=True, exist_ok=True)
    tv = tempfile.NamedTemporaryFile(prefix="time-", suffix=".txt", dir=STATE, delete=False).name
    out_path, err_path = LOGS / f"{name}.out", LOGS / f"{name}.err"
    full_env = dict(os.environ)
    full_env.update(env or {})
    settle_servers()
    pids = server_pids()
    before = cpu_snapshot(pids)
    t0 = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        rc = subprocess.call(
            ["/usr/bin/time", "-v", "-o", tv, *map(str, cmd)],
            env=full_env, cwd=ROOT, stdout=out, stderr=err,
            stdin=open(stdin) if stdin else subprocess.DEVNULL,
        )
    wall = time.monotonic() - t0
    after = cpu_snapshot(pids)
    text = Path(tv).read_text()
    os.unlink(tv)

    def field(label, conv=float):
        m = re.search(re.escape(label) + r":\s*([0-9.]+)", text)
        return conv(m.group(1)) if m else None

    res = {
        "wall": wall,
        "rss_mb": (field("Maximum resident set size (kbytes)") or 0) / 1024,
        "cpu": (field("User time (seconds)") or 0) + (field("System time (seconds)") or 0),
        "mongo_cpu": None if before["mongo"] is None or after["mongo"] is None else after["mongo"] - before["mongo"],
        "pg_cpu": None if before["pg"] is None or after["pg"] is None else after["pg"] - before["pg"],
        "rc": rc,
        "stdout": out_path.read_text(),
        "stderr_path": str(err_path),
    }
    if rc != 0:
        log(f"{name}: exit code {rc}; see {err_path}")
        tail = err_path.read_text()[-2000:]
        if tail:
            log(tail)
    return res


# ---------------------------------------------------------------------------------------------
# Source data
# ---------------------------------------------------------------------------------------------
def demo_fingerprint():
    """Hash of the demo generator's sources (the command and its plan, documents and text)."""
    demo = ROOT / "src" / "commands"
    files = [demo / "demo.rs"] + sorted(p for p in (demo / "demo").glob("*.rs") if p.name != "tests.rs")
    h = hashlib.sha256()
    for p in files:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def ensure_source(db, vizzes, seed, reseed):
    client = pymongo.MongoClient(MONGO)
    meta = client[db]["_tm_bench_meta"].find_one({"_id": "seed"})
    want = {"vizzes": vizzes, "seed": seed, "demo": demo_fingerprint()}
    keys = ("vizzes", "seed") if REUSE_SOURCE else tuple(want)
    if not reseed and meta and all(meta.get(k) == want[k] for k in keys):
        log(f"source {db}: demo data set of {vizzes} vizzes (seed {seed}) already there"
            + (f" (generator {meta.get('demo')}, kept by --reuse-source)" if meta.get("demo") != want["demo"] else ""))
        return meta.get("seed_secs")
    log(f"seeding {vizzes} vizzes (seed {seed}) into {db} ...")
    t0 = time.monotonic()
    env = dict(os.environ, TIDEMARK__SOURCE__URI=MONGO, TIDEMARK__SOURCE__DATABASE=db)
    r = subprocess.run([str(BIN), "demo", "seed", "--vizzes", str(vizzes), "--seed", str(seed)],
                       env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"seeding {db} failed:\n{r.stderr}")
    secs = time.monotonic() - t0
    log(r.stdout.strip())
    client[db]["_tm_bench_meta"].replace_one({"_id": "seed"}, {**want, "seed_secs": secs}, upsert=True)
    return secs


def grow_source(src_db, db, n):
    """documentInfo only, n documents, made by cloning src_db's documentInfo (new _id and id, the
    same times and bodies) into a collection whose indexes exist before the inserts. Used by --big:
    a full demo seed at 1,000,000 vizzes is ~7 M documents, and SecantusDB builds an index on a
    filled collection slowly (one on 1 M documents ran > 12 min here)."""
    client = pymongo.MongoClient(MONGO)
    want = {"vizzes": n, "cloned_from": src_db, "demo": demo_fingerprint()}
    meta = client[db]["_tm_bench_meta"].find_one({"_id": "seed"})
    if meta and all(meta.get(k) == v for k, v in want.items()):
        log(f"source {db}: {n} cloned documentInfo documents already there")
        return meta.get("seed_secs")
    log(f"growing {db}.documentInfo to {n} documents by cloning {src_db}.documentInfo ...")
    t0 = time.monotonic()
    client.drop_database(db)
    coll = client[db]["documentInfo"]
    coll.create_index([(TIME_FIELD, 1), ("_id", 1)])
    coll.create_index([("id", 1)])
    coll.create_index([("owner", 1)])
    src = list(client[src_db]["documentInfo"].find().sort("_id", 1))
    done, copy = 0, 0
    from bson import ObjectId
    while done < n:
        batch = []
        for d in src:
            if done + len(batch) >= n:
                break
            d = dict(d)
            if copy:
                d["_id"] = ObjectId()
                if d.get("id"):
                    d["id"] = hashlib.md5(f"{d['id']}/{copy}".encode()).hexdigest()
            batch.append(d)
            if len(batch) == 5000:
                coll.insert_many(batch, ordered=False)
                done += len(batch)
                batch = []
        if batch:
            coll.insert_many(batch, ordered=False)
            done += len(batch)
        copy += 1
    secs = time.monotonic() - t0
    client[db]["_tm_bench_meta"].replace_one({"_id": "seed"}, {**want, "seed_secs": secs}, upsert=True)
    log(f"{db}: {done} documents in {secs:.0f}s")
    return secs


def pick_window(db):
    """[from, to): from = the earliest viz time, to = one second after the latest large tie
    (many documents sharing one second) below the 97th percentile, so the window covers most of
    the collection and ends right after a tie that the keyset paging must copy whole."""
    coll = pymongo.MongoClient(MONGO)[db]["documentInfo"]
    times = [d[TIME_FIELD] for d in coll.find(
        {"documentType": "viz", TIME_FIELD: {"$type": "number"}}, {TIME_FIELD: 1, "_id": 0})]
    times.sort()
    counts = collections.Counter(times)
    p97 = times[int(len(times) * 0.97)]
    big = max(10, len(times) // 1000)
    ties = [t for t, c in counts.items() if c >= big and t <= p97] or [t for t, c in counts.items() if c >= 2 and t <= p97]
    edge = int(max(ties))
    return int(times[0]), edge + 1, edge


def expected(db, lo, hi):
    """What a correct copy of [lo, hi) holds: id -> updated_at (ms) of the last version in
    (time, _id) order, plus the number of documents the window selects."""
    coll = pymongo.MongoClient(MONGO)[db]["documentInfo"]
    rows, docs = {}, 0
    cur = coll.find({"documentType": "viz", TIME_FIELD: {"$gte": lo, "$lt": hi}},
                    {"id": 1, TIME_FIELD: 1}).sort([(TIME_FIELD, 1), ("_id", 1)])
    for d in cur:
        docs += 1
        if d.get("id") is not None:
            rows[d["id"]] = round(d[TIME_FIELD] * 1000)
    return {"docs": docs, "rows": rows}


def pulled_references(db, found, rows):
    """Rows outside the window that the full mapping pulled on demand (a fork's parent):
    each must be a viz of the source holding its latest version. Returns (verified, bad)."""
    ids = [k for k in found if k not in rows]
    coll = pymongo.MongoClient(MONGO)[db]["documentInfo"]
    latest = {}
    for i in range(0, len(ids), 1000):
        for d in coll.find({"documentType": "viz", "id": {"$in": ids[i:i + 1000]}},
                           {"id": 1, TIME_FIELD: 1}).sort([(TIME_FIELD, 1), ("_id", 1)]):
            t = d.get(TIME_FIELD)
            if isinstance(t, (int, float)):
                latest[d["id"]] = round(t * 1000)
    verified = sum(1 for k in ids if latest.get(k) == found[k])
    return verified, len(ids) - verified


def compare(found, exp, edge_ms, pulled_from=None):
    rows = exp["rows"]
    missing = sum(1 for k in rows if k not in found)
    extra = sum(1 for k in found if k not in rows)
    pulled = 0
    if pulled_from and extra:
        pulled, extra = pulled_references(pulled_from, found, rows)
    wrong = sum(1 for k, v in found.items() if k in rows and rows[k] != v)
    edge_exp = sum(1 for v in rows.values() if v == edge_ms)
    edge_got = sum(1 for v in found.values() if v == edge_ms)
    ok = missing == 0 and extra == 0 and wrong == 0 and edge_exp == edge_got
    note = "" if ok else f"missing {missing}, extra {extra}, wrong time {wrong}, edge tie {edge_got}/{edge_exp}"
    if pulled:
        note = (note + "; " if note else "") + f"+{pulled} pulled references outside the window, each the source's latest version"
    return {"ok": ok, "rows": len(found), "edge": f"{edge_got}/{edge_exp}", "note": note}


def pg_rows(db, table="vizzes"):
    with psycopg.connect(pg_url(db)) as c:
        return {r[0]: int(r[1]) for r in c.execute(
            f"SELECT id, (extract(epoch FROM updated_at) * 1000)::bigint FROM {table}")}


def pg_counts(db):
    with psycopg.connect(pg_url(db)) as c:
        tables = [r[0] for r in c.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")]
        return {t: c.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


# Every foreign key of the database with its columns, to list rows that point at nothing.
FKS_SQL = """
SELECT con.conname, src.relname, dst.relname,
       array_agg(quote_ident(sa.attname) ORDER BY k.ord),
       array_agg(quote_ident(da.attname) ORDER BY k.ord)
FROM pg_constraint con
JOIN pg_class src ON src.oid = con.conrelid
JOIN pg_class dst ON dst.oid = con.confrelid
CROSS JOIN LATERAL unnest(con.conkey, con.confkey) WITH ORDINALITY AS k(s, d, ord)
JOIN pg_attribute sa ON sa.attrelid = con.conrelid AND sa.attnum = k.s
JOIN pg_attribute da ON da.attrelid = con.confrelid AND da.attnum = k.d
WHERE con.contype = 'f' GROUP BY 1, 2, 3"""


def pg_dangling(db):
    """Rows whose foreign key points at nothing, per constraint (checked after runs that left
    the checks to tidemark)."""
    out = {}
    with psycopg.connect(pg_url(db)) as c:
        for name, src, dst, mine, theirs in c.execute(FKS_SQL).fetchall():
            # NOT EXISTS (an anti-join): NOT IN over a subquery larger than work_mem is
            # re-scanned for every row.
            pairs = list(zip(mine, theirs))
            notnull = " AND ".join(f"s.{a} IS NOT NULL" for a, _ in pairs)
            same = " AND ".join(f"d.{b} = s.{a}" for a, b in pairs)
            n = c.execute(f"SELECT count(*) FROM {src} s WHERE {notnull} "
                          f"AND NOT EXISTS (SELECT 1 FROM {dst} d WHERE {same})").fetchone()[0]
            if n:
                out[name] = n
    return out


def sqlite_rows(path):
    c = sqlite3.connect(path)
    try:
        out = {}
        for i, u in c.execute("SELECT id, updated_at FROM vizzes"):
            t = dt.datetime.fromisoformat(u.replace("Z", "+00:00"))
            out[i] = round(t.timestamp() * 1000)
        return out
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# The tools
# ---------------------------------------------------------------------------------------------
class Ctx:
    pass


def tm_env(ctx, target, mapping, start=None, db=None, uri=None):
    env = {
        "TIDEMARK__SOURCE__URI": uri or MONGO,
        "TIDEMARK__SOURCE__DATABASE": db or ctx.db,
        "TIDEMARK__TARGET__URL": target,
        "TIDEMARK__SYNC__MAPPING": str(mapping),
        "TIDEMARK__SYNC__SETTLE": "0s",
        "TIDEMARK__SYNC__ERROR_BUDGET": "100000000",
        "TIDEMARK__LOG__FORMAT": "json",
    }
    if start is not None:
        env["TIDEMARK__SYNC__START"] = iso(start)
    return env


def tm_read(stdout):
    m = re.search(r"(\d+) documents read, (\d+) rows written", stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def run_tidemark(ctx, name, mapping, backend, binary=None, extra_env=None):
    if backend == "pg":
        db = f"{PREFIX}_{name}"
        create_db(db)
        target = pg_url(db)
    else:
        path = STATE / "tmp" / f"{name}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_sqlite(path)
        target = f"sqlite://{path}"
    r = timed(name, [binary or BIN, "run", "--until", iso(ctx.hi)],
              dict(tm_env(ctx, target, mapping, ctx.lo), **(extra_env or {})))
    read, written = tm_read(r["stdout"])
    r["docs"] = read
    try:
        found = pg_rows(db) if backend == "pg" else sqlite_rows(path)
        r.update(compare(found, ctx.exp, ctx.edge_ms, pulled_from=None if mapping == ctx.flat else ctx.db))
        if backend == "pg" and mapping != ctx.flat:
            r["tables"] = pg_counts(db)
        if backend == "pg" and (extra_env or {}).get("TIDEMARK__TARGET__FOREIGN_KEY_CHECKS") == "tidemark":
            bad = pg_dangling(db)
            if bad:
                r.update(ok=False, note=f"rows pointing at nothing: {bad}")
    except Exception as e:
        r.update(ok=False, note=f"verification failed: {e}")
    if r["rc"] != 0:
        r.update(ok=False, note=(r.get("note") or "") + f" exit {r['rc']}")
    if backend == "pg":
        drop_db(db)
    else:
        remove_sqlite(path)
    return r


def run_baseline(ctx, name, script="baseline.py"):
    db = f"{PREFIX}_{name}"
    create_db(db)
    cmd = [PY, BENCH / script, "--mongo", MONGO, "--db", ctx.db, "--pg", pg_url(db),
           "--from", ctx.lo, "--to", ctx.hi] + (["--upvotes-count"] if ctx.upvotes else [])
    r = timed(name, cmd)
    r["docs"] = ctx.exp["docs"]
    try:
        r.update(compare(pg_rows(db), ctx.exp, ctx.edge_ms))
    except Exception as e:
        r.update(ok=False, note=f"verification failed: {e}")
    if r["rc"] != 0:
        r.update(ok=False, note=f"exit {r['rc']}")
    drop_db(db)
    return r


def run_dlt(ctx, name):
    db = f"{PREFIX}_{name}"
    create_db(db)
    work = STATE / "tmp" / f"dlt-{name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = [PY, BENCH / "dlt_pipeline.py", "--mongo", MONGO, "--db", ctx.db, "--pg", pg_url(db),
           "--from", ctx.lo, "--to", ctx.hi, "--workdir", work] + (["--upvotes-count"] if ctx.upvotes else [])
    r = timed(name, cmd, {"RUNTIME__DLTHUB_TELEMETRY": "false"})
    r["docs"] = ctx.exp["docs"]
    try:
        r.update(compare(pg_rows(db, "bench.vizzes"), ctx.exp, ctx.edge_ms))
    except Exception as e:
        r.update(ok=False, note=f"verification failed: {e}")
    if r["rc"] != 0:
        r.update(ok=False, note=f"exit {r['rc']}")
    drop_db(db)
    shutil.rmtree(work, ignore_errors=True)
    return r


def run_read_limit(ctx, name):
    cmd = [READ_LIMIT, "--uri", MONGO, "--db", ctx.db, "--collection", "documentInfo",
           "--time-field", TIME_FIELD, "--from", ctx.lo, "--to", ctx.hi,
           "--filter-eq", "documentType=viz", "--batch-size", "2000"]
    r = timed(name, cmd)
    try:
        got = json.loads(r["stdout"].strip().splitlines()[-1])["docs"]
    except Exception:
        got = None
    r["docs"] = got
    r["rows"] = got
    r["ok"] = got == ctx.exp["docs"]
    r["edge"] = "-"
    r["note"] = "" if r["ok"] else f"read {got} documents, the window has {ctx.exp['docs']}"
    return r


def copy_table_sql(upvotes):
    extra = ", upvotes_count INTEGER" if upvotes else ""
    return ("CREATE TABLE vizzes (id TEXT NOT NULL PRIMARY KEY, owner TEXT, title TEXT, created_at TIMESTAMPTZ, "
            f"updated_at TIMESTAMPTZ, forked_from TEXT, doc JSONB{extra})")


def prepare_copy_file(ctx):
    """The flat rows of the window as a COPY file, made by one unmeasured baseline run
    (which also warms the source's cache for every tool alike)."""
    db = f"{PREFIX}_prep"
    create_db(db)
    cmd = [PY, BENCH / "baseline.py", "--mongo", MONGO, "--db", ctx.db, "--pg", pg_url(db),
           "--from", ctx.lo, "--to", ctx.hi] + (["--upvotes-count"] if ctx.upvotes else [])
    subprocess.run(list(map(str, cmd)), check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    cols = ", ".join(FLAT_COLS + (["upvotes_count"] if ctx.upvotes else []))
    path = STATE / "tmp" / "flat.copy"
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", pg_url(db), "-c",
                    f"\\copy (SELECT {cols} FROM vizzes) TO '{path}'"], check=True)
    drop_db(db)
    ctx.copy_file = path
    ctx.copy_cols = cols
    # The same rows for the SQLite limit, as tidemark writes them into SQLite (timestamps as
    # RFC 3339 text, JSON as text), ready to bind: parsing is not what that limit measures.
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(tuple(copy_field(v) for v in line.rstrip("\n").split("\t")))
    ts_cols = [i for i, c in enumerate(cols.split(", ")) if c in ("created_at", "updated_at")]
    int_cols = [i for i, c in enumerate(cols.split(", ")) if c == "upvotes_count"]
    for n, r in enumerate(rows):
        r = list(r)
        for i in ts_cols:
            if r[i] is not None:
                r[i] = dt.datetime.fromisoformat(r[i]).astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
        for i in int_cols:
            if r[i] is not None:
                r[i] = int(r[i])
        rows[n] = tuple(r)
    ctx.rows_file = STATE / "tmp" / "flat.rows.marshal"
    with open(ctx.rows_file, "wb") as f:
        marshal.dump(rows, f)


COPY_ESCAPES = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r", "\\b": "\b", "\\f": "\f", "\\v": "\v"}


def copy_field(v):
    """One field of PostgreSQL's COPY text format -> str or None (\\N)."""
    if v == "\\N":
        return None
    if "\\" not in v:
        return v
    return re.sub(r"\\[\\tnrbfv]", lambda m: COPY_ESCAPES[m.group(0)], v)


def run_copy_limit(ctx, name):
    db = f"{PREFIX}_{name}"
    create_db(db)
    cols = ctx.copy_cols
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols.split(", ") if c != "id")
    script = STATE / "tmp" / "copy_limit.sql"
    script.write_text(
        copy_table_sql(ctx.upvotes) + ";\n"
        "BEGIN;\n"
        "CREATE TEMP TABLE staging (LIKE vizzes) ON COMMIT DROP;\n"
        f"\\copy staging ({cols}) FROM '{ctx.copy_file}'\n"
        f"INSERT INTO vizzes ({cols}) SELECT {cols} FROM staging ON CONFLICT (id) DO UPDATE SET {updates};\n"
        "COMMIT;\n")
    r = timed(name, ["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", pg_url(db), "-f", script])
    r["docs"] = ctx.exp["docs"]
    try:
        r.update(compare(pg_rows(db), ctx.exp, ctx.edge_ms))
    except Exception as e:
        r.update(ok=False, note=f"verification failed: {e}")
    drop_db(db)
    return r


def run_copy_empty_limit(ctx, name):
    """The write limit of a first load: COPY the rows from a file straight into the empty
    table (primary key in place), one transaction."""
    db = f"{PREFIX}_{name}"
    create_db(db)
    script = STATE / "tmp" / "copy_empty_limit.sql"
    script.write_text(
        copy_table_sql(ctx.upvotes) + ";\n"
        "BEGIN;\n"
        f"\\copy vizzes ({ctx.copy_cols}) FROM '{ctx.copy_file}'\n"
        "COMMIT;\n")
    r = timed(name, ["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", pg_url(db), "-f", script])
    r["docs"] = ctx.exp["docs"]
    try:
        r.update(compare(pg_rows(db), ctx.exp, ctx.edge_ms))
    except Exception as e:
        r.update(ok=False, note=f"verification failed: {e}")
    drop_db(db)
    return r


def sqlite_table_sql(upvotes):
    """The flat table as tidemark creates it in SQLite (src/sink/ddl.rs, ColumnType::sqlite)."""
    extra = ", upvotes_count INTEGER" if upvotes else ""
    return ("CREATE TABLE vizzes (id TEXT NOT NULL, owner TEXT, title TEXT, created_at TEXT, "
            f"updated_at TEXT, forked_from TEXT, doc TEXT{extra}, PRIMARY KEY (id))")


def remove_sqlite(path):
    """A SQLite target and what lies beside it: -wal, -shm, and the `.lanes` folder of lock files."""
    for p in path.parent.glob(path.name + "*"):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def run_sqlite_limit(ctx, name):
    path = STATE / "tmp" / f"{name}.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_sqlite(path)
    cmd = [PY, BENCH / "sqlite_limit.py", "--rows-file", ctx.rows_file, "--db", path,
           "--ddl", sqlite_table_sql(ctx.upvotes), "--table", "vizzes",
           "--columns", len(ctx.copy_cols.split(", "))]
    r = timed(name, cmd)
    r["docs"] = ctx.exp["docs"]
    try:
        r.update(compare(sqlite_rows(path), ctx.exp, ctx.edge_ms))
    except Exception as e:
        r.update(ok=False, note=f"verification failed: {e}")
    if r["rc"] != 0:
        r.update(ok=False, note=f"exit {r['rc']}")
    remove_sqlite(path)
    return r


TOOLS = [
    # key, label, runner
    ("tm_flat", "tidemark, flat mapping → PostgreSQL", lambda c, n: run_tidemark(c, n, c.flat, "pg")),
    ("baseline", "careful hand-written baseline (pymongo batch 10k streamed into COPY to a stage, "
     "ON CONFLICT per 50k) → PostgreSQL", run_baseline),
    ("baseline_naive", "naive hand-written baseline (the weaker one used until session 15: chunk lists, "
     "default cursor batches, DISTINCT ON sort per chunk) → PostgreSQL",
     lambda c, n: run_baseline(c, n, "baseline_naive.py")),
    ("dlt", "dlt (incremental + merge) → PostgreSQL", run_dlt),
    ("tm_full", "tidemark, full VizHub mapping → PostgreSQL", lambda c, n: run_tidemark(c, n, c.full, "pg")),
    # The same with target.foreign_key_checks = "tidemark" (docs/DEPENDENCIES.md): PostgreSQL skips
    # the per-row foreign-key checks of tidemark's inserts and updates.
    ("tm_full_tmfk", "tidemark, full VizHub mapping → PostgreSQL, `foreign_key_checks = \"tidemark\"`",
     lambda c, n: run_tidemark(c, n, c.full, "pg", extra_env={"TIDEMARK__TARGET__FOREIGN_KEY_CHECKS": "tidemark"})),
    ("read_limit", "limit: read the window with the Rust driver, discard", run_read_limit),
    ("copy_limit", "limit: COPY to a stage + ON CONFLICT of the same rows from a file (psql)", run_copy_limit),
    ("copy_empty_limit", "limit: plain COPY of the same rows from a file into the empty table (psql)",
     run_copy_empty_limit),
    ("sqlite_limit", "limit: SQLite, the same rows as one prepared 100-row INSERT, one transaction, "
     "empty table (Python sqlite3, rows preloaded)", run_sqlite_limit),
    ("tm_flat_sqlite", "tidemark, flat mapping → SQLite", lambda c, n: run_tidemark(c, n, c.flat, "sqlite")),
    ("tm_full_sqlite", "tidemark, full VizHub mapping → SQLite", lambda c, n: run_tidemark(c, n, c.full, "sqlite")),
    # Only with --alt-bin: another tidemark build (e.g. a candidate change), same runs, alternating.
    ("tm_flat_alt", "ALT tidemark, flat mapping → PostgreSQL", lambda c, n: run_tidemark(c, n, c.flat, "pg", c.alt_bin)),
    ("tm_full_alt", "ALT tidemark, full VizHub mapping → PostgreSQL", lambda c, n: run_tidemark(c, n, c.full, "pg", c.alt_bin)),
]
DEFAULT_TOOLS = ("tm_flat,baseline,baseline_naive,dlt,tm_full,tm_full_tmfk,read_limit,copy_limit,copy_empty_limit,"
                 "tm_flat_sqlite,sqlite_limit,tm_full_sqlite")


# ---------------------------------------------------------------------------------------------
# Nothing new, one-day window, growth
# ---------------------------------------------------------------------------------------------
def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Proxy:
    """bench/mongo_proxy.py around one command: counts the commands sent to the source."""

    def __init__(self, name):
        self.port = free_port()
        self.log = LOGS / f"{name}.commands.jsonl"
        if self.log.exists():
            self.log.unlink()
        up = MONGO.split("://", 1)[1].split("/", 1)[0].split(",")[0]
        self.proc = subprocess.Popen([PY, BENCH / "mongo_proxy.py", "--listen", str(self.port),
                                      "--upstream", up, "--log", str(self.log)], stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        self.uri = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def close(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        cmds = collections.Counter()
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        for line in lines:
            cmds[json.loads(line)["cmd"]] += 1
        queries = sum(n for c, n in cmds.items() if c not in HANDSHAKE)
        return {"queries": queries, "commands": dict(cmds.most_common())}


def scaling(args, ctx, sizes):
    """For each collection size: full catch-up, then runs with nothing new and one-day windows,
    with tidemark (and --alt-bin, if given)."""
    bins = [("tidemark", BIN)] + ([(args.alt_label, Path(args.alt_bin))] if args.alt_bin else [])
    out = []
    for n in sizes:
        if n == args.big_vizzes and args.big:
            db = f"{PREFIX}_clone_{n}"
            seed_secs = grow_source(f"{PREFIX}_{args.vizzes}", db, n)
        else:
            db = f"{PREFIX}_{n}"
            seed_secs = ensure_source(db, n, args.seed, args.reseed)
        coll = pymongo.MongoClient(MONGO)[db]["documentInfo"]
        total = coll.estimated_document_count()
        exp = expected(db, 0, int(time.time()))
        row = {"vizzes": n, "cloned": db.startswith(f"{PREFIX}_clone_"), "documents": total, "seed_secs": seed_secs, "window_docs": exp["docs"], "by_bin": {}}
        # Full catch-up to now (flat mapping, one window: max_window = 100 years), so the target
        # is current; the runs after it find nothing new.
        target_db = f"{PREFIX}_nn_{n}"
        create_db(target_db)
        env = tm_env(ctx, pg_url(target_db), ctx.flat, db=db)
        env["TIDEMARK__SYNC__START"] = "2010-01-01T00:00:00Z"
        env.pop("TIDEMARK__SYNC__SETTLE")
        cenv = dict(env, TIDEMARK__SYNC__MAX_WINDOW="36500d")
        r = timed(f"catchup_{n}", [BIN, "run"], cenv)
        read, _ = tm_read(r["stdout"])
        rows = pg_rows(target_db)
        missing = sum(1 for k in exp["rows"] if k not in rows)
        row["catchup"] = {"wall": r["wall"], "rss_mb": r["rss_mb"], "docs": read,
                          "ok": r["rc"] == 0 and missing == 0 and len(rows) == len(exp["rows"]),
                          "note": f"{len(rows)} rows, {missing} missing of {len(exp['rows'])}"}
        log(f"{n}: catch-up {r['wall']:.1f}s, {read} docs; ok={row['catchup']['ok']}")
        lo = int(ONE_DAY.timestamp())
        hi = lo + 86400
        day_exp = expected(db, lo, hi)
        for label, binary in bins:
            tag = "alt" if binary != BIN else "tm"
            nn = []
            for i in range(args.runs):
                r = timed(f"nothing_new_{tag}_{n}_{i}", [binary, "run"], env)
                nn.append({"wall": r["wall"], "rss_mb": r["rss_mb"], "docs": tm_read(r["stdout"])[0], "rc": r["rc"]})
            p = Proxy(f"nothing_new_{tag}_{n}")
            r = timed(f"nothing_new_{tag}_{n}_proxy", [binary, "run"], dict(env, TIDEMARK__SOURCE__URI=p.uri))
            q = p.close()
            res = {"nothing_new": {"wall": statistics.median(x["wall"] for x in nn),
                                   "walls": [round(x["wall"], 3) for x in nn],
                                   "rss_mb": statistics.median(x["rss_mb"] for x in nn),
                                   "docs": nn[-1]["docs"], "ok": all(x["rc"] == 0 for x in nn), **q}}
            log(f"{n} [{label}]: nothing new {res['nothing_new']['wall']:.2f}s, {q['queries']} source queries")
            # One-day window [ONE_DAY, ONE_DAY + 1d) into a fresh target.
            walls, docs_read, ok, q = [], None, True, None
            for i in range(args.runs + 1):
                tdb = f"{PREFIX}_day_{n}"
                create_db(tdb)
                denv = tm_env(ctx, pg_url(tdb), ctx.flat, start=lo, db=db)
                proxy = Proxy(f"one_day_{tag}_{n}") if i == args.runs else None
                if proxy:
                    denv["TIDEMARK__SOURCE__URI"] = proxy.uri
                r = timed(f"one_day_{tag}_{n}_{i}", [binary, "run", "--until", iso(hi)], denv)
                try:
                    got = pg_rows(tdb)
                except Exception:
                    got = None
                ok &= r["rc"] == 0 and got == day_exp["rows"]
                drop_db(tdb)
                if proxy:
                    q = proxy.close()
                else:
                    walls.append(r["wall"])
                    docs_read = tm_read(r["stdout"])[0]
            res["one_day"] = {"wall": statistics.median(walls), "walls": [round(w, 3) for w in walls],
                              "docs": docs_read, "rows": len(day_exp["rows"]), "ok": ok, **q}
            log(f"{n} [{label}]: one-day window {res['one_day']['wall']:.2f}s for {docs_read} docs, "
                f"{q['queries']} source queries")
            row["by_bin"][label] = res
        drop_db(target_db)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def med(rs, k):
    vals = [r[k] for r in rs if r.get(k) is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec=",.0f", none="–"):
    return none if v is None else format(v, spec)


def summarize(ctx, results):
    summary = {}
    for key, label, _ in TOOLS:
        rs = results.get(key) or []
        if not rs:
            continue
        ok = all(r.get("ok") for r in rs)
        wall = med(rs, "wall")
        docs = med(rs, "docs")
        summary[key] = {
            "label": label, "runs": len(rs), "ok": ok, "wall": wall, "docs": docs,
            "docs_s": docs / wall if docs and wall else None,
            "rss_mb": med(rs, "rss_mb"), "cpu": med(rs, "cpu"),
            "mongo_cpu": med(rs, "mongo_cpu"), "pg_cpu": med(rs, "pg_cpu"),
            "rows": med(rs, "rows"), "edge": rs[-1].get("edge"),
            "notes": sorted({r["note"] for r in rs if r.get("note")}),
            "tables": rs[-1].get("tables"),
        }
    return summary


def ratio(s, a, b):
    if a in s and b in s and s[a]["docs_s"] and s[b]["docs_s"] and s[a]["ok"] and s[b]["ok"]:
        return s[a]["docs_s"] / s[b]["docs_s"]
    return None


def report(args, ctx, results, scale, meta):
    s = summarize(ctx, results)
    L = []
    L.append(f"# tidemark benchmark — {meta['when']}\n")
    L.append(f"`bench/run.sh {' '.join(meta['argv'])}` on {meta['host']}: {meta['cpus']} cores, "
             f"{meta['mem_gb']:.0f} GB; tidemark {meta['rev']}; source {meta['mongo']}; {meta['pg']}; "
             f"Python {meta['python']}, dlt {meta['dlt']}, pymongo {meta['pymongo']}, psycopg {meta['psycopg']}.\n")
    L.append(f"Source `{ctx.db}`: demo data set, {args.vizzes:,} vizzes (seed {args.seed}); "
             f"documentInfo holds {ctx.total:,} documents. Window `[{iso(ctx.lo)}, {iso(ctx.hi)})` on "
             f"`{TIME_FIELD}`: **{ctx.exp['docs']:,} documents → {len(ctx.exp['rows']):,} rows** "
             f"(same `id` twice = one row); it ends one second after a tie of "
             f"{sum(1 for v in ctx.exp['rows'].values() if v == ctx.edge_ms):,} documents sharing "
             f"{iso(ctx.edge)}. Flat table columns: {', '.join(FLAT_COLS + (['upvotes_count'] if ctx.upvotes else []))}"
             f"{'' if ctx.upvotes else ' (no upvotes_count: the mapping language of this build has no computed columns)'}.\n")
    if not s:
        L.append("(no tool comparison in this run)\n")
    L.append(f"Medians of {args.runs} runs per tool, tools alternating; every run into a fresh database. "
             "docs/s = documents of the window ÷ wall time of the whole process (start-up, schema, "
             "read, write, commit). Peak RSS of the tool's process (`/usr/bin/time -v`); CPU = the "
             "tool's user+sys; source/PG CPU = what the two servers spent meanwhile (includes anything else "
             "using them at the time). "
             "✔ = the target holds exactly the window's rows (every id, its last version's time, the "
             "whole tie at the edge).\n")
    L.append("| tool | docs/s | wall s | peak RSS MB | tool CPU s | source CPU s | PG CPU s | rows | edge tie | ok |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|:--:|")
    for key, label, _ in TOOLS:
        if key not in s:
            continue
        x = s[key]
        docs_note = "" if key not in ("tm_full", "tm_full_tmfk", "tm_full_sqlite") else f" ({fmt(x['docs'])} docs, all entities)"
        L.append(f"| {label}{docs_note} | {fmt(x['docs_s'])} | {fmt(x['wall'], '.2f')} | {fmt(x['rss_mb'], '.0f')} | "
                 f"{fmt(x['cpu'], '.2f')} | {fmt(x['mongo_cpu'], '.2f')} | {fmt(x['pg_cpu'], '.2f')} | "
                 f"{fmt(x['rows'])} | {x['edge'] or '–'} | {'✔' if x['ok'] else '✘ ' + '; '.join(x['notes'])} |")
    L.append("")
    L.append("**Ratios** (docs/s, medians; only from verified results):\n")
    for a, b, label, target in [
        ("tm_flat", "baseline", "tidemark flat ÷ careful baseline", "issue 27: ≈ 1.7"),
        ("tm_flat", "copy_empty_limit", "tidemark flat ÷ plain COPY into the empty table (limit)", "issue 27: ≥ 0.8"),
        ("tm_flat", "copy_limit", "tidemark flat ÷ COPY to a stage + ON CONFLICT (limit)", ""),
        ("tm_flat", "dlt", "tidemark flat ÷ dlt", "target ≥ 8"),
        ("tm_flat", "read_limit", "tidemark flat ÷ read limit", "≤ 1 by definition"),
        ("tm_flat", "baseline_naive", "tidemark flat ÷ naive baseline (the ratio BENCHMARKS.md reported until "
         "session 15)", "old target ≥ 2.0"),
        ("baseline", "baseline_naive", "careful baseline ÷ naive baseline", ""),
        ("baseline", "copy_empty_limit", "careful baseline ÷ plain COPY limit", ""),
        ("baseline", "dlt", "careful baseline ÷ dlt", ""),
        ("tm_full", "baseline", "tidemark full mapping ÷ careful flat baseline", "old target ≥ 1.0 (set against the naive one)"),
        ("tm_full_tmfk", "baseline", "tidemark full mapping, foreign keys checked by tidemark ÷ careful flat baseline",
         "old target ≥ 1.0 (set against the naive one)"),
        ("tm_flat_alt", "baseline", "[alt] tidemark flat ÷ careful baseline", ""),
        ("tm_flat_alt", "copy_empty_limit", "[alt] tidemark flat ÷ plain COPY limit", "issue 27: ≥ 0.8"),
        ("tm_flat_alt", "dlt", "[alt] tidemark flat ÷ dlt", "target ≥ 8"),
        ("tm_full_alt", "baseline", "[alt] tidemark full mapping ÷ careful flat baseline", ""),
        ("tm_flat_sqlite", "sqlite_limit", "tidemark flat into SQLite ÷ SQLite bulk-insert limit", "issue 27: ≥ 0.8"),
        ("tm_flat_sqlite", "tm_flat", "tidemark flat: SQLite ÷ PostgreSQL", ""),
        ("tm_flat_sqlite", "baseline", "tidemark flat into SQLite ÷ careful baseline (into PostgreSQL)", ""),
        ("tm_full_sqlite", "tm_full", "tidemark full mapping: SQLite ÷ PostgreSQL", "issue 27: ≥ 1"),
    ]:
        if a not in s or b not in s:
            continue
        r = ratio(s, a, b)
        L.append(f"- {label}: **{fmt(r, '.2f')}**" + (f" ({target})" if target else ""))
    if "tm_full" in s and s["tm_full"].get("tables"):
        L.append("\nFull mapping, rows per table (last PostgreSQL run): " +
                 ", ".join(f"{t} {n:,}" for t, n in s["tm_full"]["tables"].items() if not t.startswith("tidemark_")) +
                 "; dead letters " + fmt(s["tm_full"]["tables"].get("tidemark_dead_letters")) + ".")
    if scale:
        L.append("\n## Nothing new, and a one-day window as the collection grows\n")
        L.append("Per collection size, into PostgreSQL with the flat mapping: a full catch-up to now (one "
                 "window: `sync.max_window = 36500d`), then `tidemark run` again with nothing new "
                 f"({args.runs} runs, median; default settings, so the run re-reads the 1 h overlap and "
                 "scans for invalid time values), then a one-day window "
                 f"`[{ONE_DAY:%Y-%m-%d}, +1d)` into a fresh target ({args.runs} runs, median). "
                 "Source queries = commands other than the handshake and monitoring (hello/ping/endSessions) "
                 "that the run sent to the source, counted by a wire-protocol proxy (bench/mongo_proxy.py) on "
                 "one extra run; the documents of a one-day window grow with the collection, because the demo "
                 "generator spreads every size over the same ten years. A size marked (cloned) is documentInfo only, "
                 "made by cloning the --vizzes data set (see `grow_source`).\n")
        L.append("| vizzes | documentInfo docs | catch-up s (docs) | build | nothing new s | its source queries | one-day window s | its docs | its source queries | ok |")
        L.append("|---:|---:|---:|---|---:|---|---:|---:|---|:--:|")
        qs = lambda q: f"{q['queries']} ({', '.join(f'{k} {v}' for k, v in q['commands'].items() if k not in HANDSHAKE)})"
        for r in scale:
            cu = r["catchup"]
            for label, b in r["by_bin"].items():
                nn, od = b["nothing_new"], b["one_day"]
                ok = cu["ok"] and nn["ok"] and od["ok"]
                L.append(f"| {r['vizzes']:,}{' (cloned)' if r.get('cloned') else ''} | {r['documents']:,} | {cu['wall']:.1f} ({fmt(cu['docs'])}) | {label} | "
                         f"{nn['wall']:.2f} | {qs(nn)} | {od['wall']:.2f} | {fmt(od['docs'])} | {qs(od)} | "
                         f"{'✔' if ok else '✘ ' + cu['note']} |")
    L.append("\n<details><summary>Every run</summary>\n")
    L.append("| round | tool | wall s | docs | RSS MB | CPU s | source CPU s | PG CPU s | ok |")
    L.append("|---:|---|---:|---:|---:|---:|---:|---:|:--:|")
    for key, label, _ in TOOLS:
        for i, r in enumerate(results.get(key) or []):
            L.append(f"| {i + 1} | {key} | {r['wall']:.2f} | {fmt(r.get('docs'))} | {r['rss_mb']:.0f} | {r['cpu']:.2f} | "
                     f"{fmt(r.get('mongo_cpu'), '.2f')} | {fmt(r.get('pg_cpu'), '.2f')} | {'✔' if r.get('ok') else '✘ ' + (r.get('note') or '')} |")
    L.append("\n</details>\n")
    return "\n".join(L), s


def versions():
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return "?"
    rev = os.environ.get("BENCH_REV") or run(["git", "rev-parse", "--short", "HEAD"]) or "?"
    if not os.environ.get("BENCH_REV") and run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "Cargo.toml"]):
        rev += " + uncommitted changes"
    client = pymongo.MongoClient(MONGO)
    bi = client.admin.command("buildInfo")
    with admin() as c:
        pgv = c.execute("SHOW server_version").fetchone()[0]
    import dlt
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.machine(), "cpus": os.cpu_count(), "mem_gb": mem, "rev": rev,
        "mongo": f"{bi.get('version', '?')} wire protocol ({'SecantusDB' if 'secantus' in json.dumps(bi, default=str).lower() else 'server'})",
        "pg": f"PostgreSQL {pgv}", "python": platform.python_version(), "dlt": dlt.__version__,
        "pymongo": pymongo.version, "psycopg": psycopg.__version__,
    }


def main():
    global TOOLS
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vizzes", type=int, default=200_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--big", action="store_true",
                   help="also measure nothing-new / one-day windows on a 1,000,000-document documentInfo "
                        "(cloned from the --vizzes data set into tm_bench_clone_1000000)")
    p.add_argument("--big-vizzes", type=int, default=1_000_000)
    p.add_argument("--reseed", action="store_true", help="re-seed source databases even if they look current")
    p.add_argument("--reuse-source", action="store_true",
                   help="keep a source database of the right size and seed even if the demo generator (src/commands/demo*) changed since it was seeded")
    p.add_argument("--tools", default=DEFAULT_TOOLS,
                   help=f"comma-separated tools, of: {', '.join(k for k, _, _ in TOOLS)} (default: %(default)s)")
    p.add_argument("--alt-bin", help="a second tidemark binary, measured as tm_flat_alt / tm_full_alt")
    p.add_argument("--alt-label", default="candidate build", help="what --alt-bin is, for the table")
    p.add_argument("--no-scaling", action="store_true", help="skip nothing-new / one-day-window measurements")
    p.add_argument("--drop-source", action="store_true", help="drop the tm_bench* source databases at the end")
    p.add_argument("--out", default=str(BENCH / "results" / "latest.md"))
    p.add_argument("--argv", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    global REUSE_SOURCE
    REUSE_SOURCE = args.reuse_source
    STATE.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    drop_leftover_dbs()

    ctx = Ctx()
    ctx.db = f"{PREFIX}_{args.vizzes}"
    ctx.full = ROOT / "config" / "mappings" / "vizhub.toml"
    # The flat mapping, with upvotes_count when this build's mapping language accepts it.
    ctx.flat = BENCH / "flat.toml"
    probe = STATE / "flat_upvotes.toml"
    probe.write_text(ctx.flat.read_text().rstrip("\n") + "\n" + UPVOTES_LINE)
    chk = subprocess.run([str(BIN), "check-config"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, TIDEMARK__SYNC__MAPPING=str(probe)))
    ctx.upvotes = chk.returncode == 0
    if ctx.upvotes:
        ctx.flat = probe
        log("this build computes upvotes_count: the flat table gets it (baseline and dlt too)")
    else:
        log("this build's mapping language has no computed columns: flat table without upvotes_count")

    ensure_source(ctx.db, args.vizzes, args.seed, args.reseed)
    ctx.total = pymongo.MongoClient(MONGO)[ctx.db]["documentInfo"].estimated_document_count()
    ctx.lo, ctx.hi, ctx.edge = pick_window(ctx.db)
    ctx.edge_ms = ctx.edge * 1000
    ctx.exp = expected(ctx.db, ctx.lo, ctx.hi)
    log(f"window [{iso(ctx.lo)}, {iso(ctx.hi)}): {ctx.exp['docs']} documents, {len(ctx.exp['rows'])} rows; "
        f"edge tie at {iso(ctx.edge)}")

    keys = [k for k in args.tools.split(",") if k]
    ctx.alt_bin = args.alt_bin
    if args.alt_bin:
        keys += [k for k in ("tm_flat_alt", "tm_full_alt") if k not in keys and k.replace("_alt", "") in keys]
        TOOLS = [(k, l.replace("ALT", f"[{args.alt_label}]"), f) for k, l, f in TOOLS]
    tools = [t for t in TOOLS if t[0] in keys]
    results = {k: [] for k, _, _ in tools}
    if tools:
        log("warm-up: one unmeasured baseline run (also makes the COPY file for the COPY limit)")
        prepare_copy_file(ctx)
    for rnd in range(args.runs):
        for key, label, fn in tools:
            name = f"{key}_r{rnd + 1}"
            r = fn(ctx, name)
            results[key].append(r)
            log(f"round {rnd + 1} {key:<15} {r['wall']:7.2f}s  {fmt((r.get('docs') or 0) / r['wall'])} docs/s  "
                f"RSS {r['rss_mb']:.0f} MB  {'ok' if r.get('ok') else 'WRONG: ' + (r.get('note') or '')}")

    scale = None
    if not args.no_scaling:
        sizes = [max(args.vizzes // 10, 1000), args.vizzes] + ([args.big_vizzes] if args.big else [])
        scale = scaling(args, ctx, sizes)

    meta = versions()
    meta["argv"] = args.argv.split() if args.argv else sys.argv[1:]
    text, summary = report(args, ctx, results, scale, meta)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    raw = {"meta": meta, "window": {"from": ctx.lo, "to": ctx.hi, "edge": ctx.edge, "docs": ctx.exp["docs"],
                                    "rows": len(ctx.exp["rows"])},
           "summary": summary, "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "stdout"} for r in v]
                                        for k, v in results.items()}, "scaling": scale}
    Path(args.out).with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    log(f"wrote {args.out}")
    if args.drop_source:
        client = pymongo.MongoClient(MONGO)
        for name in client.list_database_names():
            if name.startswith(PREFIX):
                client.drop_database(name)
                log(f"dropped source database {name}")
    shutil.rmtree(STATE / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
