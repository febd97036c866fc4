//! The source's side of `check-config --connect`: the collections of `source.database`, and
//! one document read from a collection (the `read` right). Only reads.

use super::Source;
use crate::reach::{Side, Unreachable};
use crate::settings::SourceSettings;
use bson::doc;

impl Source {
    /// The collection names of `source.database` (listCollections).
    pub async fn collection_names(&self, s: &SourceSettings) -> Result<Vec<String>, Unreachable> {
        self.db
            .list_collection_names()
            .await
            .map_err(|e| failed(s, &e))
    }

    /// Read one document of `collection` (a find with limit 1): whether it holds any.
    pub async fn read_one(
        &self,
        s: &SourceSettings,
        collection: &str,
    ) -> Result<bool, Unreachable> {
        self.db
            .collection::<bson::Document>(collection)
            .find_one(doc! {})
            .await
            .map(|d| d.is_some())
            .map_err(|e| failed(s, &e))
    }
}

fn failed(s: &SourceSettings, e: &mongodb::error::Error) -> Unreachable {
    let cause = super::reach::cause(e, s.connect_timeout);
    Unreachable::new(Side::Source, cause, &s.uri, &e.to_string())
}
