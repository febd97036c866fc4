//! MongoDB reads: keyset-paged window streams with retry, the server clock,
//! index checks and bulk lookups by id.

use super::query::{invalid_time_filter, window_filter};
use crate::mapping::spec::TimeEncoding;
use crate::mapping::value::to_timestamp;
use crate::mapping::{lookup, Entity, SourceFormat};
use crate::reach::{Cause, Side, Unreachable};
use crate::secret::redact_uri;
use crate::settings::{ReadPref, SourceSettings};
use crate::span::Window;
use anyhow::{anyhow, Context, Result};
use backon::{BackoffBuilder, Retryable};
use bson::{doc, Bson, RawDocumentBuf};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::error::ErrorKind;
use mongodb::options::{ClientOptions, ReadPreference, SelectionCriteria};
use mongodb::{Client, Database};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// A keyset position: the last `(time_field value, _id)` read, in their stored BSON types.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub ts: Bson,
    pub id: Bson,
}

impl Position {
    /// Canonical extended JSON, which keeps BSON types exactly (for checkpoints).
    pub fn to_json(&self) -> (String, String) {
        (
            self.ts.clone().into_canonical_extjson().to_string(),
            self.id.clone().into_canonical_extjson().to_string(),
        )
    }

    pub fn from_json(ts: &str, id: &str) -> Result<Self> {
        let parse = |s: &str| -> Result<Bson> {
            let v: serde_json::Value = serde_json::from_str(s)?;
            Ok(Bson::try_from(v)?)
        };
        Ok(Position {
            ts: parse(ts).context("checkpoint last_ts")?,
            id: parse(id).context("checkpoint last_id")?,
        })
    }

    /// The position of a document, if it has both fields.
    pub fn of(doc: &RawDocumentBuf, time_path: &[String]) -> Option<Self> {
        let ts = lookup(doc, time_path).ok()??;
        let id = doc.get("_id").ok()??;
        Some(Position {
            ts: Bson::try_from(ts).ok()?,
            id: Bson::try_from(id).ok()?,
        })
    }
}

/// Sort documents fetched by key into `(time, _id)` order, as a window reads them: a page is
/// de-duplicated on the target key with the last version winning, so two source documents
/// for one key (a legacy data bug, but real) must come oldest first, while the server returns
/// an `$in` in index or natural order. Documents whose time does not decode sort first (they
/// become dead letters); `_id`s compare by their raw bytes (an ObjectId in creation order).
pub fn in_time_order(e: &Entity, docs: &mut [RawDocumentBuf]) {
    let path: Vec<String> = e.time_field.split('.').map(str::to_owned).collect();
    let format = Some(e.time_format());
    docs.sort_by_cached_key(|d| {
        let t = lookup(d, &path)
            .ok()
            .flatten()
            .and_then(|v| to_timestamp(&v, format).ok())
            .map(|t| t.timestamp_millis());
        let id: Vec<u8> = match d.get("_id") {
            Ok(Some(bson::raw::RawBsonRef::ObjectId(o))) => o.bytes().to_vec(),
            Ok(Some(bson::raw::RawBsonRef::String(s))) => s.as_bytes().to_vec(),
            Ok(Some(other)) => format!("{other:?}").into_bytes(),
            _ => Vec::new(),
        };
        (t, id)
    });
}

/// One page of documents read in `(time, _id)` order, and where it ended.
#[derive(Debug)]
pub struct Page {
    pub docs: Vec<RawDocumentBuf>,
    pub last: Position,
}

/// A connected source database.
#[derive(Clone)]
pub struct Source {
    pub db: Database,
    /// Round-trips issued (find, getMore, lookups, counts): lets tests and reports prove batching.
    pub queries: Arc<AtomicU64>,
    batch_size: usize,
    retry_attempts: u32,
    rate_limit: u64,
}

fn read_pref(p: ReadPref) -> ReadPreference {
    match p {
        ReadPref::Primary => ReadPreference::Primary,
        ReadPref::PrimaryPreferred => ReadPreference::PrimaryPreferred { options: None },
        ReadPref::Secondary => ReadPreference::Secondary { options: None },
        ReadPref::SecondaryPreferred => ReadPreference::SecondaryPreferred { options: None },
        ReadPref::Nearest => ReadPreference::Nearest { options: None },
    }
}

impl Source {
    /// Connect and ping. A failure is an [`Unreachable`] that says what happened and what to
    /// do (the driver's text goes to the debug log); a closed port is reported at once.
    pub async fn connect(s: &SourceSettings) -> Result<Self> {
        let mut opts = ClientOptions::parse(s.uri.expose()).await.map_err(|e| {
            let cause = super::reach::cause(&e, s.connect_timeout);
            if matches!(cause, Cause::HostUnknown) {
                // An SRV record that does not resolve.
                return anyhow::Error::new(Unreachable::new(
                    Side::Source,
                    cause,
                    &s.uri,
                    &e.to_string(),
                ));
            }
            anyhow!(
                "source.uri {} is invalid: {}",
                s.uri,
                redact_uri(&e.to_string())
            )
        })?;
        if let Some(addrs) = super::reach::all_refused(&opts.hosts, s.connect_timeout).await {
            let detail = format!("TCP connect to {}", addrs.join(", "));
            return Err(Unreachable::new(Side::Source, Cause::Refused, &s.uri, &detail).into());
        }
        opts.app_name = Some("tidemark".into());
        opts.connect_timeout = Some(s.connect_timeout);
        opts.server_selection_timeout = Some(s.connect_timeout);
        opts.selection_criteria = Some(SelectionCriteria::ReadPreference(read_pref(
            s.read_preference,
        )));
        let client = Client::with_options(opts)
            .map_err(|e| anyhow!("source: {}", redact_uri(&e.to_string())))?;
        let db = client.database(&s.database);
        db.run_command(doc! { "ping": 1 }).await.map_err(|e| {
            let detail = redact_uri(&e.to_string());
            debug!(error = %detail, "source ping failed");
            let cause = super::reach::cause(&e, s.connect_timeout);
            Unreachable::new(Side::Source, cause, &s.uri, &detail)
        })?;
        Ok(Source {
            db,
            queries: Arc::new(AtomicU64::new(0)),
            batch_size: s.batch_size,
            retry_attempts: s.retry_attempts,
            rate_limit: s.rate_limit,
        })
    }

    /// The server's clock (`hello.localTime`); windows never reach past it, whatever our clock says.
    pub async fn server_time(&self) -> Result<DateTime<Utc>> {
        let db = &self.db;
        let hello = self
            .retry("the server time (hello)", || {
                db.run_command(doc! { "hello": 1 }).into_future()
            })
            .await?;
        match hello.get_datetime("localTime") {
            Ok(t) => Ok(t.to_chrono()),
            Err(_) => {
                warn!("source server does not report localTime; using this host's clock");
                Ok(Utc::now())
            }
        }
    }

    /// A warning naming the index to create if `(time_field, _id)` is not indexed.
    pub async fn missing_index_warning(&self, e: &Entity) -> Result<Option<String>> {
        let coll = self.db.collection::<bson::Document>(&e.collection);
        let coll = &coll;
        let what = format!("the indexes of {} (listIndexes)", e.collection);
        let listed = self
            .retry(&what, || async move {
                match coll.list_indexes().await {
                    Ok(c) => c.try_collect::<Vec<_>>().await.map(Some),
                    // A collection that does not exist (yet): not an error.
                    Err(err) if matches!(*err.kind, ErrorKind::Command(ref c) if c.code == 26) => {
                        Ok(None)
                    }
                    Err(err) => Err(err),
                }
            })
            .await?;
        let Some(indexes) = listed else {
            // It reads as empty; say so rather than fail.
            return Ok(Some(format!(
                "collection {} does not exist in the source database; it reads as empty",
                e.collection
            )));
        };
        let ok = indexes.iter().any(|ix| {
            let keys: Vec<&String> = ix.keys.keys().collect();
            keys.len() >= 2 && keys[0] == &e.time_field && keys[1] == "_id"
        });
        Ok((!ok).then(|| {
            format!(
                "collection {} has no index on ({}, _id); window reads will scan the collection. Create it with: \
                 db.{}.createIndex({{\"{}\": 1, \"_id\": 1}})",
                e.collection, e.time_field, e.collection, e.time_field
            )
        }))
    }

    /// Stream a window as pages through a bounded channel. Read errors are retried from the last
    /// position read, with capped exponential backoff, before the stream reports the error.
    pub fn stream_window(
        &self,
        e: &Entity,
        w: Window,
        after: Option<Position>,
    ) -> mpsc::Receiver<Result<Page>> {
        let (tx, rx) = mpsc::channel(2);
        let this = self.clone();
        let e = e.clone();
        tokio::spawn(async move {
            if let Err(err) = this.pump(&e, w, after, &tx).await {
                let _ = tx.send(Err(err)).await;
            }
        });
        rx
    }

    async fn pump(
        &self,
        e: &Entity,
        w: Window,
        mut after: Option<Position>,
        tx: &mpsc::Sender<Result<Page>>,
    ) -> Result<()> {
        let time_path: Vec<String> = e.time_field.split('.').map(str::to_owned).collect();
        let coll = self.db.collection::<RawDocumentBuf>(&e.collection);
        let policy = crate::retry::source_reads(self.retry_attempts);
        let mut delays = policy.build();
        let mut failures = 0u32;
        let started = Instant::now();
        let mut sent = 0u64;
        let batch_size = e.batch_size.unwrap_or(self.batch_size);
        'reopen: loop {
            let filter = window_filter(
                &e.filter,
                &e.time_field,
                e.time_encoding,
                &w,
                after.as_ref(),
            );
            let cursor = coll
                .find(filter)
                .sort(doc! { &e.time_field: 1, "_id": 1 })
                .batch_size(batch_size as u32)
                .await;
            let mut cursor = match cursor {
                Ok(c) => c,
                Err(err) => {
                    self.backoff(&mut delays, &mut failures, &e.collection, &err)
                        .await?;
                    continue 'reopen;
                }
            };
            let mut page = Vec::with_capacity(batch_size);
            loop {
                match cursor.try_next().await {
                    Ok(Some(doc)) => {
                        page.push(doc);
                        if page.len() >= batch_size {
                            // A page leaves no earlier than the rate limit allows for every
                            // document up to and including it (the first page too).
                            sent += page.len() as u64;
                            self.throttle(sent, started).await;
                            if !self.send(&mut page, &time_path, &mut after, tx).await? {
                                return Ok(());
                            }
                            failures = 0;
                            delays = policy.build();
                        }
                    }
                    Ok(None) => {
                        if !page.is_empty() {
                            sent += page.len() as u64;
                            self.throttle(sent, started).await;
                            self.send(&mut page, &time_path, &mut after, tx).await?;
                        }
                        return Ok(());
                    }
                    Err(err) => {
                        // Documents of the partial page are re-read from `after` on reopen.
                        self.backoff(&mut delays, &mut failures, &e.collection, &err)
                            .await?;
                        continue 'reopen;
                    }
                }
            }
        }
    }

    async fn send(
        &self,
        page: &mut Vec<RawDocumentBuf>,
        time_path: &[String],
        after: &mut Option<Position>,
        tx: &mpsc::Sender<Result<Page>>,
    ) -> Result<bool> {
        let docs = std::mem::take(page);
        self.queries.fetch_add(1, Ordering::Relaxed);
        let last = docs
            .last()
            .and_then(|d| Position::of(d, time_path))
            .ok_or_else(|| anyhow!("a document in the window lacks its time field or _id"))?;
        *after = Some(last.clone());
        Ok(tx.send(Ok(Page { docs, last })).await.is_ok())
    }

    /// Run a metadata read (`hello`, `listIndexes`, the next-window probe, counts, lookups)
    /// and retry it with the source read policy ([`crate::retry::source_reads`]), but only
    /// while [`is_retriable_error`] says so: a command the server refuses fails at once.
    async fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = mongodb::error::Result<T>>,
    {
        let attempt = std::sync::atomic::AtomicU32::new(0);
        let result = op
            .retry(crate::retry::source_reads(self.retry_attempts))
            .when(is_retriable_error)
            .notify(|err, delay| {
                let n = attempt.fetch_add(1, Ordering::Relaxed) + 1;
                retrying(what, n, delay, err);
            })
            .await;
        result.map_err(|err| {
            let msg = redact_uri(&err.to_string());
            if is_retriable_error(&err) {
                exhausted(what, self.retry_attempts + 1, &msg)
            } else {
                anyhow!("reading {what} from the source failed: {msg}")
            }
        })
    }

    /// Wait before reopening a window's cursor: the next delay of `delays`, or the error once
    /// `source.retry_attempts` reads in a row have failed. Any error is retried here: the
    /// cursor is reopened from the last position read, which also cures cursor-level errors.
    async fn backoff(
        &self,
        delays: &mut crate::retry::Delays,
        failures: &mut u32,
        what: &str,
        err: &mongodb::error::Error,
    ) -> Result<()> {
        *failures += 1;
        let msg = redact_uri(&err.to_string());
        let Some(delay) = delays.next() else {
            return Err(exhausted(what, *failures, &msg));
        };
        retrying(what, *failures, delay, err);
        tokio::time::sleep(delay).await;
        Ok(())
    }

    async fn throttle(&self, sent: u64, started: Instant) {
        if self.rate_limit == 0 {
            return;
        }
        let due = Duration::from_secs_f64(sent as f64 / self.rate_limit as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            debug!(wait_ms = wait.as_millis() as u64, "rate limit");
            tokio::time::sleep(wait).await;
        }
    }

    /// The time of the first document in `[from, to)`, by one indexed query (None if empty).
    pub async fn next_time(
        &self,
        e: &Entity,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>> {
        let coll = self.db.collection::<RawDocumentBuf>(&e.collection);
        let filter = window_filter(
            &e.filter,
            &e.time_field,
            e.time_encoding,
            &Window::new(from, to),
            None,
        );
        let (coll, filter) = (&coll, &filter);
        let first = self
            .retry(&format!("{} (next-window probe)", e.collection), || {
                self.queries.fetch_add(1, Ordering::Relaxed);
                coll.find_one(filter.clone())
                    .sort(doc! { &e.time_field: 1, "_id": 1 })
                    .projection(doc! { &e.time_field: 1, "_id": 1 })
                    .into_future()
            })
            .await?;
        let path: Vec<String> = e.time_field.split('.').map(str::to_owned).collect();
        let format = match e.time_encoding {
            TimeEncoding::Date => SourceFormat::Date,
            TimeEncoding::EpochSeconds => SourceFormat::EpochSeconds,
            TimeEncoding::EpochMillis => SourceFormat::EpochMillis,
            TimeEncoding::Iso8601 => SourceFormat::Iso8601,
        };
        // A value that does not decode just disables the skip-ahead: the window still reads it.
        Ok(first.and_then(|d| {
            lookup(&d, &path)
                .ok()
                .flatten()
                .and_then(|v| to_timestamp(&v, Some(format)).ok())
                .or(Some(from))
        }))
    }

    /// Documents of `e` whose `field` is one of `values` (bulk `$in`, chunked), plus the entity's filter.
    pub async fn fetch_in(
        &self,
        e: &Entity,
        field: &str,
        values: Vec<Bson>,
    ) -> Result<Vec<RawDocumentBuf>> {
        let coll = self.db.collection::<RawDocumentBuf>(&e.collection);
        let mut out = Vec::new();
        for chunk in values.chunks(1000) {
            let by = doc! { field: { "$in": chunk.to_vec() } };
            let filter = if e.filter.is_empty() {
                by
            } else {
                doc! { "$and": [e.filter.clone(), by] }
            };
            let (coll, filter) = (&coll, &filter);
            let docs = self
                .retry(
                    &format!("{} (lookup by {field})", e.collection),
                    || async move {
                        self.queries.fetch_add(1, Ordering::Relaxed);
                        coll.find(filter.clone())
                            .batch_size(1000)
                            .await?
                            .try_collect::<Vec<_>>()
                            .await
                    },
                )
                .await?;
            out.extend(docs);
        }
        Ok(out)
    }

    /// Documents of `e` whose time field is missing or mistyped (at most `limit`).
    pub async fn invalid_time_docs(&self, e: &Entity, limit: i64) -> Result<Vec<RawDocumentBuf>> {
        let coll = self.db.collection::<RawDocumentBuf>(&e.collection);
        let filter = invalid_time_filter(&e.filter, &e.time_field, e.time_encoding);
        let (coll, filter) = (&coll, &filter);
        self.retry(
            &format!("{} (invalid-time scan)", e.collection),
            || async move {
                self.queries.fetch_add(1, Ordering::Relaxed);
                coll.find(filter.clone())
                    .limit(limit)
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            },
        )
        .await
    }

    /// Count documents in `e` at or after `from` (the backlog behind a watermark).
    pub async fn count_since(&self, e: &Entity, from: DateTime<Utc>) -> Result<u64> {
        let coll = self.db.collection::<RawDocumentBuf>(&e.collection);
        let far = Window::new(
            from,
            DateTime::<Utc>::MAX_UTC.min(from + chrono::TimeDelta::days(365 * 300)),
        );
        let filter = window_filter(&e.filter, &e.time_field, e.time_encoding, &far, None);
        let (coll, filter) = (&coll, &filter);
        self.retry(&format!("{} (count)", e.collection), || {
            coll.count_documents(filter.clone()).into_future()
        })
        .await
    }

    /// The number of documents in `e`'s collection as its metadata says (no scan; an
    /// estimate that may lag writes): an upper bound, guessed, on `e`'s documents in any
    /// range, which lets a backfill of a small collection skip counting.
    pub async fn estimated_count(&self, e: &Entity) -> Result<u64> {
        let coll = self.db.collection::<RawDocumentBuf>(&e.collection);
        let coll = &coll;
        self.retry(&format!("{} (estimated count)", e.collection), || {
            self.queries.fetch_add(1, Ordering::Relaxed);
            coll.estimated_document_count().into_future()
        })
        .await
    }

    /// Count documents of `e` in window `w` (its filter and time range, the same query
    /// document a window read sends), with the `(time, _id)` index: what backfill chunks are
    /// planned by. The `count` command, not `countDocuments`' aggregation: on SecantusDB it
    /// took 6.4 s where the aggregation took 8.8 s for 180k documents (BENCHMARKS.md,
    /// sixteenth round).
    pub async fn count_window(&self, e: &Entity, w: &Window) -> Result<u64> {
        let filter = window_filter(&e.filter, &e.time_field, e.time_encoding, w, None);
        let cmd = doc! { "count": &e.collection, "query": filter };
        let cmd = &cmd;
        let reply = self
            .retry(&format!("{} (count of {w})", e.collection), || async move {
                self.queries.fetch_add(1, Ordering::Relaxed);
                self.db.run_command(cmd.clone()).await
            })
            .await?;
        let n = match reply.get("n") {
            Some(Bson::Int32(n)) => *n as i64,
            Some(Bson::Int64(n)) => *n,
            Some(Bson::Double(n)) => *n as i64,
            other => {
                return Err(anyhow!(
                    "the source answered a count of {} without a number of documents ({other:?})",
                    e.collection
                ))
            }
        };
        Ok(n.max(0) as u64)
    }
}

/// Worth retrying: the network, server selection, a retryable label, or a server code that
/// means "not now" (the driver's own list of retryable read codes).
/// The log line of a source read about to be retried.
fn retrying(what: &str, attempt: u32, delay: Duration, err: &mongodb::error::Error) {
    let msg = redact_uri(&err.to_string());
    warn!(read = %what, attempt, delay_ms = delay.as_millis() as u64, error = %msg, "source read failed; retrying");
}

/// The error once a read has failed `failures` times in a row.
fn exhausted(what: &str, failures: u32, msg: &str) -> anyhow::Error {
    anyhow!(
        "reading {what} from the source failed {failures} times in a row; last error: {msg}. \
         Check the source server, then run again: the run resumes from its checkpoint"
    )
}

/// Whether a MongoDB error is worth retrying (network, server selection, a retryable label
/// or code): the one place that decides it for the source.
pub fn is_retriable_error(err: &mongodb::error::Error) -> bool {
    const RETRYABLE_CODES: [i32; 13] = [
        11600, 11602, 10107, 13435, 13436, 189, 91, 7, 6, 89, 9001, 134, 262,
    ];
    match &*err.kind {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. } => true,
        ErrorKind::Command(c) if RETRYABLE_CODES.contains(&c.code) => true,
        _ => {
            err.contains_label(mongodb::error::RETRYABLE_ERROR)
                || err.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
                || err.contains_label(mongodb::error::SYSTEM_OVERLOADED_ERROR)
        }
    }
}
