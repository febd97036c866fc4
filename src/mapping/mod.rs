//! The mapping: compiled once from the mapping file, then turns one source document
//! into a row (plus child rows for exploded arrays). Knows neither MongoDB connections
//! nor SQL. Compile errors name the file, entity, column and the fix.

pub mod canon;
mod child_rows;
mod compile;
pub mod diagram;
pub mod expr;
pub mod spec;
pub mod value;

use bson::{raw::RawBsonRef, Document, RawDocument};
pub use child_rows::{child_key_hash, ChildRows};
use chrono::{DateTime, Utc};
use expr::{Expr, Scope};
use spec::{DeleteAction, DependentSpec, MissingPolicy, TimeEncoding, Transform};
use std::collections::HashSet;
pub use value::{ColumnType, SourceFormat, Value};

/// A compiled mapping file.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// `version` from the file plus a content hash, e.g. `v3-demo+1a2b3c4d`.
    pub version: String,
    pub entities: Vec<Entity>,
}

/// One compiled entity (a source collection and its target table).
#[derive(Debug, Clone)]
pub struct Entity {
    pub name: String,
    pub collection: String,
    pub id_field: String,
    pub time_field: String,
    pub time_encoding: TimeEncoding,
    pub filter: Document,
    pub table: String,
    pub columns: Vec<Column>,
    /// Indexes into `columns`.
    pub pk: Vec<usize>,
    /// The column holding the value of `id_field` (how references find rows), if any.
    pub key_column: Option<usize>,
    pub deleted: Option<Deleted>,
    pub skip_when: Option<Expr>,
    pub children: Vec<Child>,
    pub dependents: Vec<DependentSpec>,
    /// Has its own time-window lane (false: only pulled on demand).
    pub windowed: bool,
    /// Page and batch size of this entity's windows (`batch_size`; None: `source.batch_size`).
    pub batch_size: Option<usize>,
    /// Every mapped table (the entity's own, other entities', child tables) with a column
    /// that references this entity through a foreign key: what deleting one of its rows
    /// does to them (`sink::rows`).
    pub referenced_by: Vec<Referrer>,
}

/// A table whose column references an entity through a foreign key (`ON DELETE SET NULL`).
/// A copy of the table's shape, so the writer can reach it from the referenced entity.
#[derive(Debug, Clone)]
pub struct Referrer {
    pub table: String,
    pub columns: Vec<Column>,
    pub pk: Vec<usize>,
    /// The referencing column, an index into `columns`.
    pub column: usize,
    /// The child tables of `table` when it is an entity's.
    pub children: Vec<Child>,
}

impl Referrer {
    pub fn table_ref(&self) -> TableRef<'_> {
        TableRef {
            name: &self.table,
            columns: &self.columns,
            pk: &self.pk,
        }
    }

    /// The referencing column is part of the table's primary key (`NOT NULL`): its rows
    /// cannot lose the reference, so they go with the row they reference (a viz's content
    /// row, keyed by the viz's id; a collaborator row keyed by viz and user).
    pub fn in_key(&self) -> bool {
        self.pk.contains(&self.column)
    }
}

/// A compiled deleted-document rule.
#[derive(Debug, Clone)]
pub struct Deleted {
    pub when: Expr,
    pub action: DeleteAction,
    /// Column set by a soft delete.
    pub column: Option<usize>,
}

/// An embedded array exploded into a child table.
#[derive(Debug, Clone)]
pub struct Child {
    pub name: String,
    pub path: Vec<String>,
    pub table: String,
    pub columns: Vec<Column>,
    pub pk: Vec<usize>,
    /// `(child column, parent column)` pairs linking a child row to its parent.
    pub parent_links: Vec<(usize, usize)>,
}

/// A borrowed view of a target table, shared by entities and children.
#[derive(Debug, Clone, Copy)]
pub struct TableRef<'a> {
    pub name: &'a str,
    pub columns: &'a [Column],
    pub pk: &'a [usize],
}

/// One compiled column.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    pub required: bool,
    /// The entity this column references (by its source key), if any.
    pub references: Option<String>,
    pub on_missing: MissingPolicy,
    source: ColumnSource,
    format: Option<SourceFormat>,
    transforms: Vec<Transform>,
    default: Option<Value>,
    enum_map: Option<Vec<(String, Value)>>,
}

#[derive(Debug, Clone)]
enum ColumnSource {
    Path(Vec<String>),
    Whole,
    Remainder(HashSet<String>),
    Constant(Value),
    Expr(Expr),
    Parent(usize),
    Ordinal,
}

/// Why a document could not be mapped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("column `{column}`: {message}")]
pub struct MapError {
    pub column: String,
    pub message: String,
}

/// What one document becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A row, and per child table (in `Entity::children` order) its rows.
    Row {
        row: Vec<Value>,
        children: Vec<Vec<Vec<Value>>>,
    },
    /// The deleted rule matched; `key` is the row's primary key when it can be derived.
    Deleted {
        key: Option<Vec<Value>>,
        at: Option<DateTime<Utc>>,
    },
    /// `skip_when` matched.
    Filtered,
}

impl Mapping {
    pub fn entity(&self, name: &str) -> anyhow::Result<&Entity> {
        self.entities
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| {
                let known: Vec<_> = self.entities.iter().map(|e| e.name.as_str()).collect();
                anyhow::anyhow!(
                    "unknown entity `{name}`; the mapping defines: {}",
                    known.join(", ")
                )
            })
    }
}

/// Follow a dotted path from `base` through documents and (numeric segments) arrays.
pub fn lookup_in<'a>(
    base: RawBsonRef<'a>,
    path: &[String],
) -> Result<Option<RawBsonRef<'a>>, String> {
    let mut cur = base;
    for (i, seg) in path.iter().enumerate() {
        let next = match cur {
            RawBsonRef::Document(d) => d
                .get(seg)
                .map_err(|e| format!("undecodable field `{seg}`: {e}"))?,
            RawBsonRef::Array(a) => match seg.parse::<usize>() {
                Ok(n) => a
                    .into_iter()
                    .nth(n)
                    .transpose()
                    .map_err(|e| format!("undecodable array: {e}"))?,
                Err(_) => {
                    return Err(format!(
                        "`{}` is an array; index it with a number",
                        path[..i].join(".")
                    ))
                }
            },
            RawBsonRef::Null | RawBsonRef::Undefined => return Ok(None),
            _ => {
                return Err(format!(
                    "`{}` is a scalar, not a document",
                    path[..i].join(".")
                ))
            }
        };
        match next {
            Some(v) => cur = v,
            None => return Ok(None),
        }
    }
    Ok(Some(cur))
}

/// Follow a dotted path through a document.
pub fn lookup<'a>(doc: &'a RawDocument, path: &[String]) -> Result<Option<RawBsonRef<'a>>, String> {
    lookup_in(RawBsonRef::Document(doc), path)
}

/// Everything a column may read.
#[derive(Clone, Copy)]
struct Input<'a> {
    /// The document, or the array element for child columns.
    base: RawBsonRef<'a>,
    /// The top-level fields of `base` in order, read once for all columns (None: not built,
    /// or `base` did not decode; then each column reads `base` itself).
    top: Option<&'a [(&'a str, RawBsonRef<'a>)]>,
    parent_row: Option<&'a [Value]>,
    index: Option<usize>,
    scope: Scope<'a>,
}

impl<'a> Input<'a> {
    /// A top-level document, with its fields `top` read once (see [`Input::top`]).
    fn document(doc: &'a RawDocument, top: Option<&'a [(&'a str, RawBsonRef<'a>)]>) -> Self {
        Input {
            base: RawBsonRef::Document(doc),
            top,
            parent_row: None,
            index: None,
            scope: Scope {
                doc: Some(doc),
                ..Default::default()
            },
        }
    }
}

impl Column {
    /// The dotted source path this column copies, when it reads one directly.
    pub fn source_path(&self) -> Option<&[String]> {
        match &self.source {
            ColumnSource::Path(p) => Some(p),
            _ => None,
        }
    }

    fn extract(&self, input: &Input<'_>) -> Result<Value, String> {
        let raw = match &self.source {
            ColumnSource::Constant(v) => return Ok(v.clone()),
            ColumnSource::Whole => Some(input.base),
            ColumnSource::Remainder(used) => return remainder(input.base, used).map(Value::Json),
            ColumnSource::Parent(i) => {
                return Ok(input.parent_row.map_or(Value::Null, |r| r[*i].clone()))
            }
            ColumnSource::Ordinal => return Ok(Value::Int(input.index.unwrap_or(0) as i32)),
            ColumnSource::Expr(e) => {
                let v = expr::from_cel(e.eval(&input.scope)?, self.ty)?;
                return self.finish(v);
            }
            ColumnSource::Path(p) => match (input.top, p.split_first()) {
                // The first match, as `RawDocument::get` finds it.
                (Some(top), Some((first, rest))) => match top.iter().find(|(k, _)| k == first) {
                    Some((_, v)) => lookup_in(*v, rest)?,
                    None => None,
                },
                _ => lookup_in(input.base, p)?,
            },
        };
        let v = match (raw, &self.enum_map) {
            (None | Some(RawBsonRef::Null), _) => Value::Null,
            (Some(r), Some(map)) => {
                let key = match r {
                    RawBsonRef::String(s) => s.to_owned(),
                    other => value::raw_to_json(other)?.to_string(),
                };
                match map.iter().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.clone(),
                    None if self.default.is_some() => Value::Null,
                    None => {
                        return Err(format!("value `{key}` is not in the column's map; add it to `map` or set a `default`"))
                    }
                }
            }
            (Some(r), None) => value::coerce(&r, self.ty, self.format)?,
        };
        self.finish(v)
    }

    /// Transforms, default, required.
    fn finish(&self, mut v: Value) -> Result<Value, String> {
        if let Value::Text(s) = &mut v {
            for t in &self.transforms {
                match t {
                    Transform::Trim => *s = s.trim().to_owned(),
                    Transform::Lower => *s = s.to_lowercase(),
                    Transform::Upper => *s = s.to_uppercase(),
                    Transform::EmptyToNull => {}
                }
            }
            if self.transforms.contains(&Transform::EmptyToNull) && s.is_empty() {
                v = Value::Null;
            }
        }
        if v == Value::Null {
            if let Some(d) = &self.default {
                v = d.clone();
            } else if self.required {
                return Err("required value is missing or null".into());
            }
        }
        Ok(v)
    }
}

fn remainder(base: RawBsonRef<'_>, used: &HashSet<String>) -> Result<serde_json::Value, String> {
    let RawBsonRef::Document(doc) = base else {
        return Ok(serde_json::Value::Null);
    };
    let mut out = serde_json::Map::new();
    for el in doc {
        let (k, v) = el.map_err(|e| format!("undecodable document: {e}"))?;
        if k != "_id" && !used.contains(k) {
            out.insert(value::sanitize(k), value::raw_to_json(v)?);
        }
    }
    Ok(serde_json::Value::Object(out))
}

fn map_columns(columns: &[Column], input: &Input<'_>) -> Result<Vec<Value>, MapError> {
    columns
        .iter()
        .map(|c| {
            c.extract(input).map_err(|message| MapError {
                column: c.name.clone(),
                message,
            })
        })
        .collect()
}

fn rule(e: &Expr, doc: &RawDocument, what: &str) -> Result<bool, MapError> {
    match e.eval(&Scope {
        doc: Some(doc),
        ..Default::default()
    }) {
        Ok(cel_interpreter::Value::Bool(b)) => Ok(b),
        Ok(other) => Err(MapError {
            column: what.into(),
            message: format!("rule returned {other:?}, not a boolean"),
        }),
        Err(message) => Err(MapError {
            column: what.into(),
            message,
        }),
    }
}

impl Entity {
    /// A column of the entity or of one of its child tables references another entity.
    pub fn has_references(&self) -> bool {
        self.columns.iter().any(|c| c.references.is_some())
            || self
                .children
                .iter()
                .any(|c| c.columns.iter().any(|c| c.references.is_some()))
    }

    /// Map one document: a row with its child rows, a deletion, or filtered.
    pub fn map(&self, doc: &RawDocument) -> Result<Outcome, MapError> {
        self.map_with(doc, true)
    }

    /// [`Entity::map`] without the child rows (each child table's list left empty): for a
    /// document whose arrays are mapped and written in pieces ([`Child::rows`]).
    pub fn map_parent(&self, doc: &RawDocument) -> Result<Outcome, MapError> {
        self.map_with(doc, false)
    }

    /// How many elements the document's exploded arrays hold together (read without
    /// decoding them): how many child rows it maps to.
    pub fn child_elements(&self, doc: &RawDocument) -> usize {
        self.children
            .iter()
            .map(|c| match lookup(doc, &c.path) {
                Ok(Some(RawBsonRef::Array(a))) => a.into_iter().count(),
                _ => 0,
            })
            .sum()
    }

    fn map_with(&self, doc: &RawDocument, with_children: bool) -> Result<Outcome, MapError> {
        // One pass over the document's fields instead of one per column.
        let top: Option<Vec<(&str, RawBsonRef<'_>)>> =
            doc.into_iter().collect::<Result<_, _>>().ok();
        let input = Input::document(doc, top.as_deref());
        // A soft-deleted document is a row like any other (every column, every child row)
        // plus its marker: the marker column holds the document's time.
        let mut marker = None;
        if let Some(d) = &self.deleted {
            if rule(&d.when, doc, "deleted.when")? {
                // The time field may be a dotted path (`meta.touched`), like everywhere else.
                let path: Vec<String> = self.time_field.split('.').map(str::to_owned).collect();
                let at = lookup(doc, &path)
                    .ok()
                    .flatten()
                    .and_then(|v| value::to_timestamp(&v, Some(self.time_format())).ok());
                match (d.action, d.column) {
                    (DeleteAction::SoftDelete, Some(col)) => {
                        let at = at.ok_or_else(|| MapError {
                            column: self.columns[col].name.clone(),
                            message: format!(
                                "the document is marked deleted but its time field `{}` is missing or not {:?}; \
                                 the soft-delete marker is the document's time",
                                self.time_field, self.time_encoding
                            ),
                        })?;
                        marker = Some((col, at));
                    }
                    _ => {
                        let key = self.key_from(&input);
                        return Ok(Outcome::Deleted { key, at });
                    }
                }
            }
        }
        if marker.is_none() {
            if let Some(s) = &self.skip_when {
                if rule(s, doc, "skip_when")? {
                    return Ok(Outcome::Filtered);
                }
            }
        }
        let mut row = map_columns(&self.columns, &input)?;
        if let Some((col, at)) = marker {
            row[col] = Value::Timestamp(at);
        }
        let mut children = Vec::with_capacity(self.children.len());
        for c in &self.children {
            children.push(if with_children {
                c.map(doc, &row)?
            } else {
                Vec::new()
            });
        }
        Ok(Outcome::Row { row, children })
    }

    /// The primary key a document maps to, from the key columns alone (`None` when one of
    /// them fails or is null). For a document that maps to a row, it is that row's key: the
    /// same columns read the same input.
    pub fn key_of(&self, doc: &RawDocument) -> Option<Vec<Value>> {
        // The key's columns look their fields up one by one (the first match, as with the
        // fields read once): decoding every field of the document for one or two key
        // columns was ~5 % of a flat first load's CPU (BENCHMARKS.md, "Session 23").
        self.key_from(&Input::document(doc, None))
    }

    fn key_from(&self, input: &Input<'_>) -> Option<Vec<Value>> {
        self.pk
            .iter()
            .map(|&i| {
                self.columns[i]
                    .extract(input)
                    .ok()
                    .filter(|v| *v != Value::Null)
            })
            .collect()
    }

    /// Map only the main row (errors for deleted or filtered documents).
    pub fn map_row(&self, doc: &RawDocument) -> Result<Vec<Value>, MapError> {
        match self.map(doc)? {
            Outcome::Row { row, .. } => Ok(row),
            other => Err(MapError {
                column: "-".into(),
                message: format!("document is {other:?}"),
            }),
        }
    }

    pub fn table_ref(&self) -> TableRef<'_> {
        TableRef {
            name: &self.table,
            columns: &self.columns,
            pk: &self.pk,
        }
    }

    pub fn column_names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    /// The source format of the time field, for decoding its values.
    pub fn time_format(&self) -> SourceFormat {
        match self.time_encoding {
            TimeEncoding::Date => SourceFormat::Date,
            TimeEncoding::EpochSeconds => SourceFormat::EpochSeconds,
            TimeEncoding::EpochMillis => SourceFormat::EpochMillis,
            TimeEncoding::Iso8601 => SourceFormat::Iso8601,
        }
    }
}

impl Child {
    /// The parent link is the parent's whole primary key (`parent_pk`), in any order: then
    /// `migrate` declares the child's foreign key to its parent, and a parent that is not
    /// stored has no child rows.
    pub fn links_whole_parent_key(&self, parent_pk: &[usize]) -> bool {
        let mut pk = parent_pk.to_vec();
        let mut links: Vec<usize> = self.parent_links.iter().map(|(_, p)| *p).collect();
        pk.sort_unstable();
        links.sort_unstable();
        pk == links
    }

    fn map(&self, doc: &RawDocument, parent_row: &[Value]) -> Result<Vec<Vec<Value>>, MapError> {
        self.rows(doc, parent_row)?.collect()
    }

    /// The child rows of `doc` (whose row is `parent_row`), one array element at a time: a
    /// writer can map and write a very large array in pieces. An element that does not map
    /// is an error naming the element, as in [`Entity::map`].
    pub fn rows<'a>(
        &'a self,
        doc: &'a RawDocument,
        parent_row: &'a [Value],
    ) -> Result<ChildRows<'a>, MapError> {
        ChildRows::new(self, doc, parent_row)
    }

    pub fn table_ref(&self) -> TableRef<'_> {
        TableRef {
            name: &self.table,
            columns: &self.columns,
            pk: &self.pk,
        }
    }
}

#[cfg(test)]
mod tests;
