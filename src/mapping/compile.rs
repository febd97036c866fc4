//! Compiling the mapping file: every check that can fail happens here, before any write.

use super::expr::Expr;
use super::spec::{
    ChildSpec, ColumnSpec, DeleteAction, DeletedSpec, EntitySpec, MappingFile, MissingPolicy,
};
use super::value::{self, ColumnType};
use super::{Child, Column, ColumnSource, Deleted, Entity, Mapping, Referrer};
use anyhow::{anyhow, bail, Context, Result};
use bson::Document;
use indexmap::IndexMap;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::Path;

impl Mapping {
    /// Read and compile a mapping file; errors name the file, entity, column and fix.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read mapping file {}; check sync.mapping",
                path.display()
            )
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Compile mapping text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let file: MappingFile = toml::from_str(text)
            .map_err(|e| anyhow!("mapping {origin}: {}", e.to_string().trim_end()))?;
        let hash = hex::encode(&Sha256::digest(text.as_bytes())[..4]);
        let mut entities = Vec::new();
        let mut tables = HashSet::new();
        for (name, spec) in &file.entities {
            let e = compile_entity(name, spec)
                .map_err(|e| anyhow!("mapping {origin}: entity `{name}`: {e:#}"))?;
            for t in std::iter::once(&e.table).chain(e.children.iter().map(|c| &c.table)) {
                if !tables.insert(t.clone()) {
                    bail!("mapping {origin}: entity `{name}`: table `{t}` is declared twice; give each table one owner");
                }
            }
            entities.push(e);
        }
        if entities.is_empty() {
            bail!("mapping {origin} declares no entities; add an [entities.NAME] section");
        }
        let names: HashSet<&str> = entities.iter().map(|e| e.name.as_str()).collect();
        for e in &entities {
            for c in &e.columns {
                if let Some(r) = &c.references {
                    if !names.contains(r.as_str()) {
                        bail!("mapping {origin}: entity `{}`: column `{}` references unknown entity `{r}`", e.name, c.name);
                    }
                }
            }
            for d in &e.dependents {
                if !names.contains(d.entity.as_str()) || d.entity == e.name {
                    bail!(
                        "mapping {origin}: entity `{}`: dependent entity `{}` must be another entity of this mapping",
                        e.name,
                        d.entity
                    );
                }
            }
        }
        for e in &entities {
            for c in e.columns.iter().filter(|c| c.references.is_some()) {
                let target = entities
                    .iter()
                    .find(|t| Some(&t.name) == c.references.as_ref())
                    .expect("checked");
                if target.key_column.is_none() {
                    bail!(
                        "mapping {origin}: entity `{}`: column `{}` references `{}`, which has no column with path = \"{}\" \
                         (its id_field); add one so references can be found in the target",
                        e.name,
                        c.name,
                        target.name,
                        target.id_field
                    );
                }
            }
        }
        link_referrers(&mut entities);
        Ok(Mapping {
            version: format!("{}+{hash}", file.version),
            entities,
        })
    }
}

/// Fill each entity's `referenced_by`: every table with a column that references it, where
/// the target carries a foreign key for the reference (the referenced entity's key column is
/// its whole primary key; the same rule as `sink::ddl::foreign_keys`).
fn link_referrers(entities: &mut [Entity]) {
    let mut found: Vec<(usize, Referrer)> = Vec::new();
    for e in entities.iter() {
        let tables = std::iter::once((&e.table, &e.columns, &e.pk, &e.children[..])).chain(
            e.children
                .iter()
                .map(|c| (&c.table, &c.columns, &c.pk, &[][..])),
        );
        for (table, columns, pk, children) in tables {
            for (column, c) in columns.iter().enumerate() {
                let Some(r) = c.references.as_deref() else {
                    continue;
                };
                let Some(i) = entities.iter().position(|x| x.name == r) else {
                    continue;
                };
                let x = &entities[i];
                if x.key_column.is_some_and(|kc| x.pk == [kc]) {
                    found.push((
                        i,
                        Referrer {
                            table: table.clone(),
                            columns: columns.clone(),
                            pk: pk.clone(),
                            column,
                            children: children.to_vec(),
                        },
                    ));
                }
            }
        }
    }
    for (i, r) in found {
        entities[i].referenced_by.push(r);
    }
}

/// SQL identifiers are quoted everywhere, and also restricted to a safe alphabet so
/// a mapping can never smuggle SQL into DDL.
pub fn check_ident(kind: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        bail!("{kind} name `{s}` is not allowed; use letters, digits and _ (starting with a letter or _), at most 63 characters");
    }
    if s.starts_with("tidemark_") {
        bail!("{kind} name `{s}` uses the prefix tidemark_, which is reserved for the tool's own tables");
    }
    Ok(())
}

fn check_path(p: &str) -> Result<Vec<String>> {
    let segs: Vec<String> = p.split('.').map(str::to_owned).collect();
    if p.is_empty() || segs.iter().any(|s| s.is_empty() || s.starts_with('$')) {
        bail!(
            "path `{p}` is malformed; write dotted field names like `owner.id` or `files.0.name`"
        );
    }
    Ok(segs)
}

fn compile_filter(t: &Option<toml::Table>) -> Result<Document> {
    let Some(t) = t else {
        return Ok(Document::new());
    };
    let json = serde_json::to_value(t)?;
    match bson::Bson::try_from(json).context("filter is not valid extended JSON")? {
        bson::Bson::Document(d) => Ok(d),
        _ => bail!("filter must be a table"),
    }
}

fn pk_indexes(columns: &[Column], keys: &[String]) -> Result<Vec<usize>> {
    if keys.is_empty() {
        bail!("primary_key is empty; name the column(s) that identify a row");
    }
    keys.iter()
        .map(|k| {
            let i = columns.iter().position(|c| &c.name == k).ok_or_else(|| {
                anyhow!(
                    "primary_key column `{k}` is not among the columns; declare it under columns"
                )
            })?;
            if columns[i].ty == ColumnType::Json {
                bail!("primary_key column `{k}` has type json, which cannot be a key; use text");
            }
            Ok(i)
        })
        .collect()
}

fn compile_entity(name: &str, spec: &EntitySpec) -> Result<Entity> {
    check_ident("table", &spec.table)?;
    check_collection(&spec.collection)?;
    check_path(&spec.time_field).context("time_field")?;
    let columns = entity_columns(spec)?;
    let pk = pk_indexes(&columns, &spec.primary_key)?;
    let key_column = spec
        .columns
        .values()
        .position(|c| c.path.as_deref() == Some(spec.id_field.as_str()));
    let deleted = spec
        .deleted
        .as_ref()
        .map(|d| compile_deleted(d, &columns, &spec.time_field))
        .transpose()?;
    let skip_when = spec
        .skip_when
        .as_deref()
        .map(Expr::compile)
        .transpose()
        .map_err(|e| anyhow!("skip_when: {e}"))?;
    let children = spec
        .children
        .iter()
        .map(|(cname, c)| {
            compile_child(cname, c, &columns).map_err(|e| anyhow!("child `{cname}`: {e:#}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Entity {
        name: name.to_owned(),
        collection: spec.collection.clone(),
        id_field: spec.id_field.clone(),
        time_field: spec.time_field.clone(),
        time_encoding: spec.time_encoding,
        filter: compile_filter(&spec.filter)?,
        table: spec.table.clone(),
        columns,
        pk,
        key_column,
        deleted,
        skip_when,
        children,
        dependents: spec.dependents.clone(),
        windowed: spec.windowed,
        referenced_by: Vec::new(),
        batch_size: match spec.batch_size {
            Some(n) if n == 0 || n > 50_000 => bail!(
                "entity `{name}`: batch_size = {n} is out of range; use a value between 1 and 50000"
            ),
            other => other,
        },
    })
}

fn check_collection(collection: &str) -> Result<()> {
    if collection.is_empty() || collection.contains('\0') || collection.starts_with('$') {
        bail!("collection `{collection}` is not a valid MongoDB collection name");
    }
    Ok(())
}

/// The entity's declared columns, plus the soft-delete marker when it is not declared.
fn entity_columns(spec: &EntitySpec) -> Result<Vec<Column>> {
    let used: HashSet<String> = spec
        .columns
        .values()
        .filter_map(|c| c.path.as_deref())
        .map(|p| p.split('.').next().unwrap_or(p).to_owned())
        .collect();
    let mut columns = compile_columns(&spec.columns, Some(&used), None)?;
    if let Some(DeletedSpec {
        action: DeleteAction::SoftDelete,
        column: Some(c),
        ..
    }) = &spec.deleted
    {
        // The soft-delete marker needs no declaration: an undeclared one is a timestamptz
        // column that is NULL until the rule marks the document.
        if !columns.iter().any(|x| &x.name == c) {
            check_ident("column", c).context("deleted.column")?;
            columns.push(Column {
                name: c.clone(),
                ty: ColumnType::Timestamptz,
                required: false,
                references: None,
                on_missing: MissingPolicy::Null,
                source: ColumnSource::Constant(value::Value::Null),
                format: None,
                transforms: Vec::new(),
                default: None,
                enum_map: None,
            });
        }
    }
    Ok(columns)
}

/// The deleted rule: its condition and, for a soft delete, the index of its marker column
/// among `columns` (which must be a timestamptz).
fn compile_deleted(d: &DeletedSpec, columns: &[Column], time_field: &str) -> Result<Deleted> {
    let when = Expr::compile(&d.when).map_err(|e| anyhow!("deleted.when: {e}"))?;
    let column = match (d.action, &d.column) {
        (DeleteAction::SoftDelete, Some(c)) => {
            let i = columns
                .iter()
                .position(|x| &x.name == c && x.ty == ColumnType::Timestamptz)
                .ok_or_else(|| {
                    anyhow!(
                        "deleted.column `{c}` is declared with a type other than timestamptz; \
                         give it type = \"timestamptz\" or leave it out of columns (tidemark then adds it)"
                    )
                })?;
            // A marker filled from the time field is set on every live row too: each would
            // read as deleted (a mistake made in session 21 on a domain written to try this).
            if matches!(&columns[i].source, ColumnSource::Path(p) if p.join(".") == time_field) {
                bail!(
                    "deleted.column `{c}` is declared with path = \"{time_field}\", the time field: every live \
                     document would fill it and look deleted. Leave `{c}` out of columns (tidemark adds it, NULL \
                     until the rule marks the document), or give it the source's own deletion-time field"
                );
            }
            Some(i)
        }
        (DeleteAction::SoftDelete, None) => {
            bail!("deleted.action = \"soft_delete\" needs deleted.column")
        }
        (DeleteAction::Delete, _) => None,
    };
    Ok(Deleted {
        when,
        action: d.action,
        column,
    })
}

fn compile_child(name: &str, spec: &ChildSpec, parent: &[Column]) -> Result<Child> {
    check_ident("table", &spec.table)?;
    let path = check_path(&spec.path)?;
    let columns = compile_columns(&spec.columns, None, Some(parent))?;
    let pk = pk_indexes(&columns, &spec.primary_key)?;
    let parent_links: Vec<(usize, usize)> = columns
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match c.source {
            ColumnSource::Parent(p) => Some((i, p)),
            _ => None,
        })
        .collect();
    if parent_links.is_empty() {
        bail!("a child table needs at least one column with `parent = \"<parent column>\"` linking it to its parent row");
    }
    Ok(Child {
        name: name.to_owned(),
        path,
        table: spec.table.clone(),
        columns,
        pk,
        parent_links,
    })
}

fn compile_columns(
    specs: &IndexMap<String, ColumnSpec>,
    used: Option<&HashSet<String>>,
    parent: Option<&[Column]>,
) -> Result<Vec<Column>> {
    specs
        .iter()
        .map(|(n, c)| {
            compile_column(n, c, used, parent).map_err(|e| anyhow!("column `{n}`: {e:#}"))
        })
        .collect()
}

fn compile_column(
    name: &str,
    c: &ColumnSpec,
    used: Option<&HashSet<String>>,
    parent: Option<&[Column]>,
) -> Result<Column> {
    check_ident("column", name)?;
    let given = [
        c.path.is_some(),
        c.value.is_some(),
        c.remainder,
        c.expr.is_some(),
        c.parent.is_some(),
        c.ordinal,
    ];
    if given.iter().filter(|b| **b).count() != 1 {
        bail!("give exactly one of `path`, `value`, `expr`, `remainder = true`, `parent` or `ordinal = true`");
    }
    let source = if c.remainder {
        if c.ty != ColumnType::Json {
            bail!("a remainder column must have type = \"json\"");
        }
        ColumnSource::Remainder(used.cloned().unwrap_or_default())
    } else if let Some(v) = &c.value {
        ColumnSource::Constant(value::from_toml(v, c.ty).map_err(|e| anyhow!("value: {e}"))?)
    } else if let Some(e) = &c.expr {
        ColumnSource::Expr(Expr::compile(e).map_err(|e| anyhow!("expr: {e}"))?)
    } else if let Some(p) = &c.parent {
        let cols = parent.ok_or_else(|| anyhow!("`parent` is only allowed in child tables"))?;
        let i = cols
            .iter()
            .position(|x| &x.name == p)
            .ok_or_else(|| anyhow!("parent column `{p}` does not exist in the parent table"))?;
        if cols[i].ty != c.ty {
            bail!(
                "type {:?} differs from the parent column `{p}` ({:?})",
                c.ty,
                cols[i].ty
            );
        }
        ColumnSource::Parent(i)
    } else if c.ordinal {
        if parent.is_none() {
            bail!("`ordinal` is only allowed in child tables");
        }
        if c.ty != ColumnType::Integer {
            bail!("an ordinal column must have type = \"integer\"");
        }
        ColumnSource::Ordinal
    } else {
        match c.path.as_deref() {
            Some("$") => ColumnSource::Whole,
            Some(p) => ColumnSource::Path(check_path(p)?),
            None => unreachable!("one source is given"),
        }
    };
    if !c.transform.is_empty() && c.ty != ColumnType::Text {
        bail!("transform applies to text columns only");
    }
    if c.on_missing.is_some() && c.references.is_none() {
        bail!("on_missing needs `references = \"<entity>\"`");
    }
    let default = c
        .default
        .as_ref()
        .map(|v| value::from_toml(v, c.ty))
        .transpose()
        .map_err(|e| anyhow!("default: {e}"))?;
    let enum_map = c
        .map
        .as_ref()
        .map(|m| {
            m.iter()
                .map(|(k, v)| value::from_toml(v, c.ty).map(|v| (k.clone(), v)))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
        .map_err(|e| anyhow!("map: {e}"))?;
    Ok(Column {
        name: name.to_owned(),
        ty: c.ty,
        required: c.required,
        references: c.references.clone(),
        on_missing: c.on_missing.unwrap_or(MissingPolicy::Null),
        source,
        format: c.from,
        transforms: c.transform.clone(),
        default,
        enum_map,
    })
}
