//! The new schema's tables, declared by the mapping: create what is missing, add new
//! nullable columns, and report (never apply) destructive differences.

use super::{BeginWrite, Sink};
use crate::mapping::{ColumnType, Entity, Mapping, TableRef};
use crate::settings::ForeignKeyChecks;
use anyhow::Result;
use sqlx::Row;

/// Double-quote an identifier (identifiers are also restricted to `[A-Za-z0-9_]` by the mapping).
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// What `migrate` found and did for one table.
#[derive(Debug, Default, Clone)]
pub struct SchemaPlan {
    /// Statements that are safe and applied (create table, add nullable column).
    pub apply: Vec<String>,
    /// Differences an operator must resolve by hand, with the SQL they would run.
    pub manual: Vec<String>,
}

/// The SQL dialect a statement is written in: the sink's, or (for `tidemark schema --format
/// sql`) the one asked for, so the printed script is exactly what `migrate` runs on an empty
/// target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

impl Dialect {
    /// The dialect of an open target.
    pub fn of(sink: &Sink) -> Dialect {
        match sink {
            Sink::Postgres(_) => Dialect::Postgres,
            Sink::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// The dialect of a `target.url` (`sqlite:…` or PostgreSQL).
    pub fn of_url(url: &str) -> Dialect {
        if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            Dialect::Postgres
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgres",
            Dialect::Sqlite => "sqlite",
        }
    }
}

fn col_type(d: Dialect, t: ColumnType) -> &'static str {
    match d {
        Dialect::Postgres => t.postgres(),
        Dialect::Sqlite => t.sqlite(),
    }
}

/// The columns of `t` that reference another entity by its whole primary key, each with that
/// entity and its key column: `(column, entity, key column)`.
fn references<'m>(
    mapping: &'m Mapping,
    t: TableRef<'m>,
) -> impl Iterator<Item = (usize, &'m Entity, usize)> + 'm {
    t.columns.iter().enumerate().filter_map(move |(i, c)| {
        let r = mapping
            .entities
            .iter()
            .find(|x| Some(x.name.as_str()) == c.references.as_deref())?;
        let kc = r.key_column.filter(|kc| r.pk == [*kc])?;
        Some((i, r, kc))
    })
}

/// Foreign keys a mapped table carries: `(constraint name, clause)`. References point at the
/// referenced entity's key column (when it is that entity's whole primary key) and set the
/// column to NULL if that row is deleted; child tables point at their parent and cascade.
/// All are DEFERRABLE INITIALLY DEFERRED: checked at commit, so a batch may write rows in any
/// order and cycles (self-references, mutual references) need no special ordering.
pub fn foreign_keys(mapping: &Mapping, table: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in &mapping.entities {
        let tables = std::iter::once((e.table_ref(), None))
            .chain(e.children.iter().map(|c| (c.table_ref(), Some(c))));
        for (t, child) in tables {
            if t.name != table {
                continue;
            }
            for (c, r, kc) in references(mapping, t) {
                let c = &t.columns[c];
                out.push((
                    format!("fk_{}_{}", t.name, c.name),
                    format!(
                        "FOREIGN KEY ({}) REFERENCES {} ({}) ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED",
                        quote(&c.name),
                        quote(&r.table),
                        quote(&r.columns[kc].name)
                    ),
                ));
            }
            if let Some(ch) = child {
                let parent_cols: Vec<usize> = ch.parent_links.iter().map(|(_, p)| *p).collect();
                if ch.links_whole_parent_key(&e.pk) {
                    let mine: Vec<String> = ch
                        .parent_links
                        .iter()
                        .map(|(c, _)| quote(&ch.columns[*c].name))
                        .collect();
                    let theirs: Vec<String> = parent_cols
                        .iter()
                        .map(|p| quote(&e.columns[*p].name))
                        .collect();
                    out.push((
                        format!("fk_{}_parent", t.name),
                        format!(
                            "FOREIGN KEY ({}) REFERENCES {} ({}) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED",
                            mine.join(", "),
                            quote(&e.table),
                            theirs.join(", ")
                        ),
                    ));
                }
            }
        }
    }
    out
}

/// `CREATE TABLE` for a mapped table, without its foreign keys.
pub fn create_table(d: Dialect, e: TableRef<'_>) -> String {
    create_table_with(d, e, &[])
}

fn create_table_with(d: Dialect, e: TableRef<'_>, fks: &[(String, String)]) -> String {
    let mut parts: Vec<String> = e
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let nn = if e.pk.contains(&i) { " NOT NULL" } else { "" };
            format!("{} {}{nn}", quote(&c.name), col_type(d, c.ty))
        })
        .collect();
    let pk: Vec<String> = e.pk.iter().map(|&i| quote(&e.columns[i].name)).collect();
    parts.push(format!("PRIMARY KEY ({})", pk.join(", ")));
    for (name, clause) in fks {
        parts.push(format!("CONSTRAINT {} {clause}", quote(name)));
    }
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\n    {}\n)",
        quote(e.name),
        parts.join(",\n    ")
    )
}

fn normalise_pg(t: &str) -> String {
    match t {
        "timestamp with time zone" => "TIMESTAMPTZ".into(),
        other => other.to_uppercase(),
    }
}

async fn existing_columns(sink: &Sink, table: &str) -> Result<Vec<(String, String)>> {
    Ok(match sink {
        Sink::Postgres(p) => sqlx::query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
        )
        .bind(table)
        .fetch_all(p)
        .await?
        .into_iter()
        .map(|r| (r.get::<String, _>(0), normalise_pg(&r.get::<String, _>(1))))
        .collect(),
        Sink::Sqlite(p) => sqlx::query("SELECT name, type FROM pragma_table_info($1)")
            .bind(table)
            .fetch_all(p)
            .await?
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1).to_uppercase()))
            .collect(),
    })
}

/// Every mapped table, main tables each followed by their child tables, in mapping order.
fn tables(mapping: &Mapping) -> impl Iterator<Item = TableRef<'_>> {
    mapping.entities.iter().flat_map(|e| {
        std::iter::once(e.table_ref()).chain(e.children.iter().map(|c| c.table_ref()))
    })
}

/// The statements that create table `t` where it does not exist: SQLite checks foreign keys
/// lazily, so they are declared inline even for cycles; PostgreSQL needs the referenced
/// tables first, so its constraints go to `late` (added after every create).
fn create_statements(
    d: Dialect,
    mapping: &Mapping,
    t: TableRef<'_>,
    apply: &mut Vec<String>,
    late: &mut Vec<String>,
) {
    let fks = foreign_keys(mapping, t.name);
    match d {
        Dialect::Sqlite => apply.push(create_table_with(d, t, &fks)),
        Dialect::Postgres => {
            apply.push(create_table(d, t));
            for (name, clause) in fks {
                late.push(format!(
                    "ALTER TABLE {} ADD CONSTRAINT {} {clause}",
                    quote(t.name),
                    quote(&name)
                ));
            }
        }
    }
}

/// The whole DDL `migrate` runs on an empty target of dialect `d` for the mapped tables
/// (what [`plan`] plans when no mapped table exists yet), as a script: each `CREATE TABLE`
/// preceded by a comment naming the entity and the source collection it comes from, then
/// the foreign keys added late (PostgreSQL) and the indexes. `tidemark schema --format sql`.
pub fn create_script(mapping: &Mapping, d: Dialect, checks: ForeignKeyChecks) -> String {
    let mut out = format!(
        "-- The tables of mapping {} ({} dialect), as `tidemark migrate` creates them on an \
         empty target.\n-- tidemark's own tables (tidemark_*) come from its embedded migrations.\n",
        mapping.version,
        d.name()
    );
    let mut late = Vec::new();
    for e in &mapping.entities {
        let mut apply = Vec::new();
        create_statements(d, mapping, e.table_ref(), &mut apply, &mut late);
        out.push_str(&format!(
            "\n-- {}: entity {}, from collection {}\n",
            e.table, e.name, e.collection
        ));
        for st in apply.drain(..) {
            out.push_str(&format!("{st};\n"));
        }
        for c in &e.children {
            create_statements(d, mapping, c.table_ref(), &mut apply, &mut late);
            out.push_str(&format!(
                "\n-- {}: child table {} of {}, one row per element of {}.{}\n",
                c.table,
                c.name,
                e.table,
                e.collection,
                c.path.join(".")
            ));
            for st in apply.drain(..) {
                out.push_str(&format!("{st};\n"));
            }
        }
    }
    if !late.is_empty() {
        out.push_str("\n-- Foreign keys, once every table exists.\n");
        for st in late {
            out.push_str(&format!("{st};\n"));
        }
    }
    let indexes = fk_indexes(mapping, ref_indexes(d, checks));
    if !indexes.is_empty() {
        out.push_str("\n-- Indexes on the columns foreign keys point from.\n");
        for (_, st) in indexes {
            out.push_str(&format!("{st};\n"));
        }
    }
    out
}

/// Compare the mapping with the target and plan the schema changes.
pub async fn plan(sink: &Sink, mapping: &Mapping, checks: ForeignKeyChecks) -> Result<SchemaPlan> {
    let d = Dialect::of(sink);
    let mut plan = SchemaPlan::default();
    let mut late_fks = Vec::new();
    for e in tables(mapping) {
        let have = existing_columns(sink, e.name).await?;
        if have.is_empty() {
            create_statements(d, mapping, e, &mut plan.apply, &mut late_fks);
            continue;
        }
        for c in e.columns {
            let want = col_type(d, c.ty);
            match have.iter().find(|(n, _)| n == &c.name) {
                None => plan.apply.push(format!(
                    "ALTER TABLE {} ADD COLUMN {} {}",
                    quote(e.name),
                    quote(&c.name),
                    want
                )),
                Some((_, t)) if t != want => plan.manual.push(match d {
                    Dialect::Postgres => format!(
                        "-- {}.{} is {t}, the mapping says {want}\nALTER TABLE {} ALTER COLUMN {} TYPE {want} USING {}::{want};",
                        e.name, c.name, quote(e.name), quote(&c.name), quote(&c.name)
                    ),
                    Dialect::Sqlite => format!(
                        "-- {}.{} is {t}, the mapping says {want}; SQLite cannot change a column type in place: \
                         rebuild the table (CREATE new, INSERT … SELECT, DROP old, RENAME)",
                        e.name, c.name
                    ),
                }),
                Some(_) => {}
            }
        }
        for (n, _) in &have {
            if !e.columns.iter().any(|c| &c.name == n) {
                plan.manual.push(format!(
                    "-- {}.{n} is not in the mapping any more; tidemark leaves it alone. To drop it:\nALTER TABLE {} DROP COLUMN {};",
                    e.name,
                    quote(e.name),
                    quote(n)
                ));
            }
        }
    }
    plan.apply.extend(late_fks);
    for (name, sql) in fk_indexes(mapping, ref_indexes(d, checks)) {
        if !index_exists(sink, &name).await? {
            plan.apply.push(sql);
        }
    }
    Ok(plan)
}

/// Whether [`fk_indexes`] includes the reference columns' indexes: on SQLite while SQLite
/// checks the foreign keys of tidemark's writes. With `target.foreign_key_checks =
/// "tidemark"` nothing searches them during a load (the run's connection checks nothing),
/// and without them a 200,000-viz load kept pace with PostgreSQL; what they would still
/// serve, deletions of referenced rows (tidemark's `SET NULL`, another program's deletes),
/// scans the referencing table instead, as on PostgreSQL by default. An index an earlier
/// `migrate` created stays.
fn ref_indexes(d: Dialect, checks: ForeignKeyChecks) -> bool {
    d == Dialect::Sqlite && checks == ForeignKeyChecks::Database
}

/// An index on every column set a foreign key points from, unless the table's primary key
/// starts with it, so that no check or action on a foreign key scans a table:
/// - each child table's link to its parent (`ix_<table>_parent`): every batch reads and
///   replaces a parent's child rows by that link, and a parent's delete cascades through it.
///   Without one, each batch scanned the whole child table (`upvotes`, keyed by its own id,
///   cost the full VizHub mapping minutes).
/// - on SQLite, each reference column (`ix_<table>_ref_<column>`). SQLite searches it for
///   every row inserted into the referenced table while the batch's transaction holds a
///   deferred violation (a row written before the row it points at), and for every
///   referenced row deleted (`ON DELETE SET NULL`). Without these, each pulled `vizzes` row
///   scanned `vizzes`, `commits` and `analytics_events` whole: 16 s of a 27 s demo run, and
///   quadratic in the table sizes. PostgreSQL searches a reference column only when the
///   referenced row is deleted; there the nine indexes cost the full VizHub mapping ~10 %
///   (BENCHMARKS.md, fourteenth round), so they are left to the operator
///   (docs/DEPENDENCIES.md).
fn fk_indexes(mapping: &Mapping, sqlite: bool) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut index = |name: String, t: TableRef<'_>, cols: &[usize]| {
        // Covered when the key's leading columns are these, in any order.
        let mut lead: Vec<usize> = t.pk.iter().take(cols.len()).copied().collect();
        let mut want = cols.to_vec();
        lead.sort_unstable();
        want.sort_unstable();
        if lead == want {
            return;
        }
        let names: Vec<String> = cols.iter().map(|&i| quote(&t.columns[i].name)).collect();
        let sql = format!(
            "CREATE INDEX IF NOT EXISTS {} ON {} ({})",
            quote(&name),
            quote(t.name),
            names.join(", ")
        );
        out.push((name, sql));
    };
    for e in &mapping.entities {
        let tables = std::iter::once((e.table_ref(), None))
            .chain(e.children.iter().map(|c| (c.table_ref(), Some(c))));
        for (t, child) in tables {
            if let Some(c) = child.filter(|c| !c.parent_links.is_empty()) {
                let links: Vec<usize> = c.parent_links.iter().map(|(ci, _)| *ci).collect();
                index(format!("ix_{}_parent", t.name), t, &links);
            }
            if sqlite {
                for (c, _, _) in references(mapping, t) {
                    index(format!("ix_{}_ref_{}", t.name, t.columns[c].name), t, &[c]);
                }
            }
        }
    }
    out
}

async fn index_exists(sink: &Sink, name: &str) -> Result<bool> {
    Ok(match sink {
        Sink::Postgres(p) => sqlx::query(
            "SELECT 1 FROM pg_indexes WHERE schemaname = current_schema() AND indexname = $1",
        )
        .bind(name)
        .fetch_optional(p)
        .await?
        .is_some(),
        Sink::Sqlite(p) => {
            sqlx::query("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = $1")
                .bind(name)
                .fetch_optional(p)
                .await?
                .is_some()
        }
    })
}

/// Apply the safe part of a plan, all or nothing.
pub async fn apply(sink: &Sink, plan: &SchemaPlan) -> Result<()> {
    match sink {
        Sink::Postgres(p) => {
            let mut tx = p.begin_write().await?;
            for s in &plan.apply {
                sqlx::query(s).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        Sink::Sqlite(p) => {
            let mut tx = p.begin_write().await?;
            for s in &plan.apply {
                sqlx::query(s).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
    }
    Ok(())
}
