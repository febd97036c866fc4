//! `tidemark demo touch`: a night of application writes on the demo data set, so the next
//! run has an increment to carry (demos, and the retention measurements in
//! docs/OPERATIONS.md). A share of the vizzes, chosen with a seed, get a new title and an
//! edited first file, with their time stamps set to now.

use anyhow::{bail, Context, Result};
use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::fmt;

/// What [`touch`] changed.
#[derive(Debug, Clone, Default)]
pub struct TouchReport {
    pub vizzes: u64,
    pub contents: u64,
    pub of: u64,
}

impl fmt::Display for TouchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "touched {} of {} vizzes (documentInfo) and {} contents (documentContent); the next run carries them",
            self.vizzes, self.of, self.contents
        )
    }
}

/// Change `percent` % of the vizzes with an `id` (at least one), chosen by `seed`.
pub async fn touch(db: &mongodb::Database, percent: f64, seed: u64) -> Result<TouchReport> {
    if !(percent > 0.0 && percent <= 100.0) {
        return Err(crate::exit::Failure::Config(anyhow::anyhow!(
            "--percent {percent} is out of range; give a share above 0 and at most 100"
        ))
        .into());
    }
    let info = db.collection::<Document>("documentInfo");
    let ids: Vec<String> = info
        .find(doc! { "id": { "$type": "string" } })
        .projection(doc! { "id": 1, "_id": 0 })
        .await
        .context("reading documentInfo ids")?
        .try_collect::<Vec<Document>>()
        .await?
        .into_iter()
        .filter_map(|d| d.get_str("id").ok().map(str::to_owned))
        .collect();
    if ids.is_empty() {
        bail!(
            "{} holds no vizzes (documentInfo with an id); run `tidemark demo seed` first",
            db.name()
        );
    }
    let n = ((ids.len() as f64 * percent / 100.0).ceil() as usize).clamp(1, ids.len());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let now = chrono::Utc::now().timestamp();
    let mut rep = TouchReport {
        of: ids.len() as u64,
        ..Default::default()
    };
    for i in rand::seq::index::sample(&mut rng, ids.len(), n) {
        let id = &ids[i];
        let title = format!("Edited viz {id} at {now}");
        rep.vizzes += info
            .update_many(
                doc! { "id": id },
                doc! { "$set": { "title": title, "lastUpdatedTimestamp": now } },
            )
            .await?
            .modified_count;
        rep.contents += edit_first_file(db, id, now).await?;
    }
    Ok(rep)
}

/// Append a line to the first file of viz `id`'s content; returns the documents changed.
async fn edit_first_file(db: &mongodb::Database, id: &str, now: i64) -> Result<u64> {
    let contents = db.collection::<Document>("documentContent");
    let Some(c) = contents.find_one(doc! { "id": id }).await? else {
        return Ok(0);
    };
    let mut set = doc! { "lastUpdatedTimestamp": now };
    if let Ok(files) = c.get_array("files") {
        if let Some(Bson::Document(first)) = files.first() {
            let text = first.get_str("text").unwrap_or_default();
            set.insert("files.0.text", format!("{text}\n// edited at {now}\n"));
        }
    }
    Ok(contents
        .update_one(
            doc! { "_id": c.get("_id").cloned().unwrap_or(Bson::Null) },
            doc! { "$set": set },
        )
        .await?
        .modified_count)
}
