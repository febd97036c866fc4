//! Benchmark limit: read one time window of a collection with the Rust MongoDB driver, in
//! `(time_field, _id)` order, and discard it. Nothing is decoded beyond what the driver needs,
//! so this is how fast the source can hand the window to any client (see BENCHMARKS.md).
//!
//! ```text
//! cargo run --release --example read_limit -- --uri mongodb://127.0.0.1:27017 --db tm_bench \
//!     --collection documentInfo --time-field lastUpdatedTimestamp --from 1451606400 --to 1700000000 \
//!     [--filter-eq documentType=viz] [--batch-size 2000]
//! ```
//! `--from`/`--to` are epoch seconds (the demo's encoding); the window is `[from, to)`.
//! Prints one JSON line: `{"docs": N, "bytes": B, "secs": S}`.

use bson::{doc, Bson, Document, RawDocumentBuf};
use std::time::Instant;

struct Args {
    uri: String,
    db: String,
    collection: String,
    time_field: String,
    from: i64,
    to: i64,
    filter: Document,
    batch_size: u32,
}

fn usage() -> ! {
    eprintln!(
        "usage: read_limit --uri URI --db DB --collection C --time-field F --from SECS --to SECS \
         [--filter-eq FIELD=VALUE]... [--batch-size N]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        uri: "mongodb://127.0.0.1:27017".into(),
        db: String::new(),
        collection: String::new(),
        time_field: String::new(),
        from: i64::MIN,
        to: i64::MIN,
        filter: Document::new(),
        batch_size: 2000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--uri" => a.uri = v,
            "--db" => a.db = v,
            "--collection" => a.collection = v,
            "--time-field" => a.time_field = v,
            "--from" => a.from = v.parse().unwrap_or_else(|_| usage()),
            "--to" => a.to = v.parse().unwrap_or_else(|_| usage()),
            "--batch-size" => a.batch_size = v.parse().unwrap_or_else(|_| usage()),
            "--filter-eq" => {
                let (f, val) = v.split_once('=').unwrap_or_else(|| usage());
                a.filter.insert(f, Bson::String(val.to_owned()));
            }
            _ => usage(),
        }
    }
    if a.db.is_empty()
        || a.collection.is_empty()
        || a.time_field.is_empty()
        || a.from == i64::MIN
        || a.to == i64::MIN
    {
        usage()
    }
    a
}

#[tokio::main]
async fn main() -> mongodb::error::Result<()> {
    let a = parse_args();
    let started = Instant::now();
    let client = mongodb::Client::with_uri_str(&a.uri).await?;
    let coll = client
        .database(&a.db)
        .collection::<RawDocumentBuf>(&a.collection);
    let mut filter = a.filter.clone();
    filter.insert(a.time_field.clone(), doc! { "$gte": a.from, "$lt": a.to });
    let mut cursor = coll
        .find(filter)
        .sort(doc! { &a.time_field: 1, "_id": 1 })
        .batch_size(a.batch_size)
        .await?;
    let (mut docs, mut bytes) = (0u64, 0u64);
    while cursor.advance().await? {
        bytes += cursor.current().as_bytes().len() as u64;
        docs += 1;
    }
    println!(
        "{{\"docs\": {docs}, \"bytes\": {bytes}, \"secs\": {:.3}}}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
