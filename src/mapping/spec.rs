//! The mapping file as users write it (TOML). Every struct denies unknown keys,
//! so a typo is an error that names the key, not a silent no-op.

use super::value::{ColumnType, SourceFormat};
use indexmap::IndexMap;
use serde::Deserialize;

/// The whole mapping file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingFile {
    /// Free-form version label, recorded with every run and dead letter.
    pub version: String,
    /// Entities in the order they are synced.
    pub entities: IndexMap<String, EntitySpec>,
}

/// How a source document's time field is encoded; queries use the same encoding so the index is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeEncoding {
    /// BSON date.
    Date,
    /// Seconds since 1970 as int32, int64 or double.
    EpochSeconds,
    /// Milliseconds since 1970 as int32, int64 or double.
    EpochMillis,
    /// ISO-8601 strings in UTC with a uniform layout (`2020-01-02T03:04:05.678Z`), so string order is time order.
    Iso8601,
}

/// One legacy collection mapped to one target table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitySpec {
    /// Source collection.
    pub collection: String,
    /// Source field that identifies a record (used for references and dead letters). Default `_id`.
    #[serde(default = "default_id_field")]
    pub id_field: String,
    /// Field that tells when the document last changed; windows select on it.
    pub time_field: String,
    /// How `time_field` is encoded.
    pub time_encoding: TimeEncoding,
    /// Extra MongoDB query (TOML form of the query document; extended JSON like `{ "$date" = ... }` allowed).
    #[serde(default)]
    pub filter: Option<toml::Table>,
    /// Target table.
    pub table: String,
    /// Target primary-key columns (must be among `columns`).
    pub primary_key: Vec<String>,
    /// Target columns, in table order.
    pub columns: IndexMap<String, ColumnSpec>,
    /// A rule marking a source document as deleted, and what to do in the target.
    #[serde(default)]
    pub deleted: Option<DeletedSpec>,
    /// CEL rule: documents for which it is true are read but not written (counted as filtered).
    #[serde(default)]
    pub skip_when: Option<String>,
    /// Arrays exploded into child tables (replace-the-whole-set semantics).
    #[serde(default)]
    pub children: IndexMap<String, ChildSpec>,
    /// Collections pulled for each migrated parent (documents of another entity whose
    /// `foreign_field` holds this document's `id_field`).
    #[serde(default)]
    pub dependents: Vec<DependentSpec>,
    /// Whether this entity has its own time-window lane (false: only pulled on demand).
    #[serde(default = "yes")]
    pub windowed: bool,
    /// Documents per page and batch of this entity's windows, instead of
    /// `source.batch_size`: smaller for entities that pull many or large dependents, whose
    /// batch holds them all in memory until it commits.
    #[serde(default)]
    pub batch_size: Option<usize>,
}

fn yes() -> bool {
    true
}

/// Deleted-document rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletedSpec {
    /// CEL expression over `doc`, true for a deleted document (e.g. `has(doc._type) && doc._type == null`).
    pub when: String,
    /// `delete` removes the row (and its children); `soft_delete` sets `column` to the document's time.
    pub action: DeleteAction,
    /// Timestamptz column set by `soft_delete`.
    #[serde(default)]
    pub column: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteAction {
    Delete,
    SoftDelete,
}

/// An embedded array exploded into its own table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildSpec {
    /// Dotted path of the array in the parent document.
    pub path: String,
    /// Target table.
    pub table: String,
    /// Primary key of the child table (derive it from the parent key plus an element key or `ordinal`).
    pub primary_key: Vec<String>,
    /// Columns: `path` is relative to the element (`$` = the element itself), `parent = "col"` copies a
    /// parent column, `ordinal = true` is the element's position, `expr` may use element/parent/index.
    pub columns: IndexMap<String, ColumnSpec>,
}

/// Documents of another entity pulled for each migrated parent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependentSpec {
    /// The entity whose documents are pulled (mapped with that entity's own mapping).
    pub entity: String,
    /// Field in the dependent's collection holding the parent's key.
    pub foreign_field: String,
    /// Field of the parent document that the foreign field points at. Default: the parent's `id_field`.
    #[serde(default)]
    pub parent_field: Option<String>,
}

fn default_id_field() -> String {
    "_id".into()
}

/// One target column.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// Dotted path into the document (`owner.id`, `files.0.name`); `$` is the whole document.
    #[serde(default)]
    pub path: Option<String>,
    /// SQL type.
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// A document without a value here is a dead letter.
    #[serde(default)]
    pub required: bool,
    /// How the source encodes the value (epoch_seconds, epoch_millis, iso8601, objectid_hex, objectid_time).
    #[serde(default)]
    pub from: Option<SourceFormat>,
    /// String clean-ups applied in order: trim, lower, upper, empty_to_null.
    #[serde(default)]
    pub transform: Vec<Transform>,
    /// Value used when the source has none.
    #[serde(default)]
    pub default: Option<toml::Value>,
    /// A constant instead of a path.
    #[serde(default)]
    pub value: Option<toml::Value>,
    /// Enum map from source strings to target values; an unmapped value is an error unless `default` is set.
    #[serde(default)]
    pub map: Option<IndexMap<String, toml::Value>>,
    /// Holds, as JSON, every top-level field no other column reads, so nothing is lost.
    #[serde(default)]
    pub remainder: bool,
    /// CEL expression computing the value (variables: doc; in children also element, parent, index).
    #[serde(default)]
    pub expr: Option<String>,
    /// Child tables only: copy this column of the parent row (the link to the parent).
    #[serde(default)]
    pub parent: Option<String>,
    /// Child tables only: the element's position in the array (0-based).
    #[serde(default)]
    pub ordinal: bool,
    /// The value is the source key of a document of this entity (a foreign key), pulled on demand.
    #[serde(default)]
    pub references: Option<String>,
    /// What to do when the referenced document does not exist: null | skip | defer. Default: null.
    #[serde(default)]
    pub on_missing: Option<MissingPolicy>,
}

/// Policy for a reference whose target does not exist in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingPolicy {
    /// Keep the row, set the column to NULL, record the missing key.
    Null,
    /// Dead-letter the row.
    Skip,
    /// Keep the row pending (not written) and retry on later runs.
    Defer,
}

/// String clean-ups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    Trim,
    Lower,
    Upper,
    EmptyToNull,
}
