//! The target schema a mapping declares, as a picture: a mapping-level model of its tables
//! (columns, types, keys, references, child tables and where each table's rows come from)
//! and its rendering as a Mermaid ER diagram or a Graphviz graph (`tidemark schema`).
//! No I/O; the SQL form of the same schema is `sink::ddl::create_script`.

use super::spec::MissingPolicy;
use super::{Column, Mapping, TableRef};
use std::fmt::Write;

/// One table of the target schema.
#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    /// Where its rows come from: `collection documentInfo` or, for a child table,
    /// `array documentInfo.upvotes` (one row per element).
    pub source: String,
    /// The entity that writes it (a child table: its parent entity).
    pub entity: String,
    /// A child table: its parent table.
    pub parent: Option<String>,
    pub columns: Vec<Col>,
}

/// One column of a [`Table`].
#[derive(Debug, Clone)]
pub struct Col {
    pub name: String,
    /// The mapping's type name (`text`, `bigint`, `timestamptz`, …).
    pub ty: &'static str,
    pub pk: bool,
    pub required: bool,
    /// References another entity's table: `(table, key column)`.
    pub references: Option<(String, String)>,
    /// The reference is a foreign key `migrate` declares (the referenced key column is that
    /// table's whole primary key); otherwise tidemark resolves it without a constraint.
    pub foreign_key: bool,
    pub on_missing: Option<MissingPolicy>,
    /// A child table's link to its parent: the parent column it copies (`table.column`).
    pub parent_column: Option<String>,
}

/// An edge of the diagram: a reference, or a child table's link to its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub from_table: String,
    pub from_columns: Vec<String>,
    pub to_table: String,
    pub to_columns: Vec<String>,
    /// A child table's link to its parent (else a reference).
    pub child: bool,
    /// The column may be NULL (a reference that is not required).
    pub optional: bool,
    pub label: String,
}

/// The whole schema of a mapping.
#[derive(Debug, Clone)]
pub struct Schema {
    pub version: String,
    pub tables: Vec<Table>,
    pub links: Vec<Link>,
    /// `(entity table, dependent table, foreign field)`: documents pulled with each parent.
    pub dependents: Vec<(String, String, String)>,
}

fn policy_name(p: MissingPolicy) -> &'static str {
    match p {
        MissingPolicy::Null => "null",
        MissingPolicy::Skip => "skip",
        MissingPolicy::Defer => "defer",
    }
}

impl Schema {
    /// The schema `mapping` declares, tables in mapping order (each entity's table, then its
    /// child tables).
    pub fn of(mapping: &Mapping) -> Schema {
        let mut schema = Schema {
            version: mapping.version.clone(),
            tables: Vec::new(),
            links: Vec::new(),
            dependents: Vec::new(),
        };
        for e in &mapping.entities {
            schema.add(
                mapping,
                e.table_ref(),
                format!("collection {}", e.collection),
                &e.name,
                None,
            );
            for c in &e.children {
                let source = format!("array {}.{}", e.collection, c.path.join("."));
                schema.add(
                    mapping,
                    c.table_ref(),
                    source,
                    &e.name,
                    Some(e.table.as_str()),
                );
                let t = schema.tables.last_mut().expect("just added");
                for (ci, pi) in &c.parent_links {
                    t.columns[*ci].parent_column =
                        Some(format!("{}.{}", e.table, e.columns[*pi].name));
                }
                let (mine, theirs): (Vec<String>, Vec<String>) = c
                    .parent_links
                    .iter()
                    .map(|(ci, pi)| (c.columns[*ci].name.clone(), e.columns[*pi].name.clone()))
                    .unzip();
                schema.links.push(Link {
                    from_table: c.table.clone(),
                    from_columns: mine,
                    to_table: e.table.clone(),
                    to_columns: theirs,
                    child: true,
                    optional: false,
                    label: match c.path.join(".") {
                        p if p == c.name => format!("child {p}"),
                        p => format!("child {} ({p})", c.name),
                    },
                });
            }
            for d in &e.dependents {
                if let Ok(dep) = mapping.entity(&d.entity) {
                    schema.dependents.push((
                        e.table.clone(),
                        dep.table.clone(),
                        d.foreign_field.clone(),
                    ));
                }
            }
        }
        schema
    }

    fn add(
        &mut self,
        mapping: &Mapping,
        t: TableRef<'_>,
        source: String,
        entity: &str,
        parent: Option<&str>,
    ) {
        let columns = t
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| self.column(mapping, t, i, c))
            .collect();
        self.tables.push(Table {
            name: t.name.to_owned(),
            source,
            entity: entity.to_owned(),
            parent: parent.map(str::to_owned),
            columns,
        });
    }

    fn column(&mut self, mapping: &Mapping, t: TableRef<'_>, i: usize, c: &Column) -> Col {
        let target = c
            .references
            .as_deref()
            .and_then(|r| mapping.entities.iter().find(|e| e.name == r));
        let references = target.and_then(|r| {
            let kc = r.key_column?;
            let fk = r.pk == [kc];
            Some(((r.table.clone(), r.columns[kc].name.clone()), fk))
        });
        if let Some(((table, key), fk)) = &references {
            self.links.push(Link {
                from_table: t.name.to_owned(),
                from_columns: vec![c.name.clone()],
                to_table: table.clone(),
                to_columns: vec![key.clone()],
                child: false,
                optional: !c.required,
                label: format!(
                    "{} (on_missing {}{})",
                    c.name,
                    policy_name(c.on_missing),
                    if *fk { "" } else { ", no FK" }
                ),
            });
        }
        Col {
            name: c.name.clone(),
            ty: c.ty.name(),
            pk: t.pk.contains(&i),
            required: c.required || t.pk.contains(&i),
            foreign_key: references.as_ref().is_some_and(|r| r.1),
            references: references.map(|r| r.0),
            on_missing: c.references.as_ref().map(|_| c.on_missing),
            parent_column: None,
        }
    }

    /// A Mermaid `erDiagram`: one entity per table (named after the table, labelled with
    /// where its rows come from), `PK`/`FK` markers with the referenced column as comment,
    /// one relationship per reference and per child table.
    pub fn mermaid(&self) -> String {
        let mut out = format!(
            "%% Target schema of mapping {} (generated by `tidemark schema --format mermaid`).\n\
             erDiagram\n",
            self.version
        );
        for t in &self.tables {
            let _ = writeln!(out, "    {}[\"{}: {}\"] {{", t.name, t.name, t.source);
            for c in &t.columns {
                let mut keys = Vec::new();
                if c.pk {
                    keys.push("PK");
                }
                if c.references.is_some() || c.parent_column.is_some() {
                    keys.push("FK");
                }
                let comment = column_note(c);
                let _ = write!(out, "        {} {}", c.ty, c.name);
                if !keys.is_empty() {
                    let _ = write!(out, " {}", keys.join(", "));
                }
                if !comment.is_empty() {
                    let _ = write!(out, " \"{comment}\"");
                }
                out.push('\n');
            }
            out.push_str("    }\n");
        }
        for l in &self.links {
            // Read from the pointing table: many of its rows go to one row of the other.
            let card = match (l.child, l.optional) {
                (true, _) => "}o--||",
                (false, true) => "}o--o|",
                (false, false) => "}o--||",
            };
            let _ = writeln!(
                out,
                "    {} {card} {} : \"{}\"",
                l.from_table, l.to_table, l.label
            );
        }
        for (parent, dep, field) in &self.dependents {
            let _ = writeln!(
                out,
                "    %% {parent} pulls its {dep} on demand (their {field} holds its key)"
            );
        }
        out
    }

    /// A Graphviz digraph: one HTML-like table per table (header: name and source), one port
    /// per column, solid edges for references (dashed when no foreign key is declared), bold
    /// edges from child tables to their parents.
    pub fn dot(&self) -> String {
        let mut out = format!(
            "// Target schema of mapping {} (generated by `tidemark schema --format dot`).\n\
             digraph schema {{\n  graph [rankdir=LR, fontname=\"Helvetica\", fontsize=11, nodesep=0.4, ranksep=1.1, \
             label=<Target schema of mapping {}<br/><font point-size=\"9\">blue: a table per \
             entity (one row per document) · yellow: a child table (one row per array element) · \
             bold column: required · gold edge: child to parent · dashed: reference without a \
             foreign key</font>>, labelloc=t];\n  \
             node [shape=plaintext, fontname=\"Helvetica\", fontsize=10];\n  \
             edge [fontname=\"Helvetica\", fontsize=9, color=\"#555555\", fontcolor=\"#333333\"];\n",
            self.version,
            html(&self.version)
        );
        for t in &self.tables {
            let (bg, what) = match &t.parent {
                Some(p) => ("#fff2cc", format!("child of {p}")),
                None => ("#dae8fc", format!("entity {}", t.entity)),
            };
            let _ = writeln!(
                out,
                "  {} [label=<<table border=\"0\" cellborder=\"1\" cellspacing=\"0\" cellpadding=\"4\">",
                t.name
            );
            let _ = writeln!(
                out,
                "    <tr><td colspan=\"3\" bgcolor=\"{bg}\"><b>{}</b><br/><font point-size=\"8\">{} · {}</font></td></tr>",
                html(&t.name),
                html(&what),
                html(&t.source)
            );
            for c in &t.columns {
                let key = match (c.pk, c.references.is_some() || c.parent_column.is_some()) {
                    (true, true) => "PK FK",
                    (true, false) => "PK",
                    (false, true) => "FK",
                    (false, false) => "",
                };
                let name = if c.required {
                    format!("<b>{}</b>", html(&c.name))
                } else {
                    html(&c.name)
                };
                // Edges leave a row on its right (port `<column>_out`) and arrive on its
                // left (`<column>_in`), never across the text.
                let _ = writeln!(
                    out,
                    "    <tr><td align=\"left\" port=\"{col}_in\">{key}</td><td align=\"left\">{name}</td><td align=\"left\" port=\"{col}_out\">{}</td></tr>",
                    c.ty,
                    col = c.name
                );
            }
            out.push_str("  </table>>];\n");
        }
        for l in &self.links {
            let style = if l.child {
                "style=bold, color=\"#b58900\", dir=both, arrowtail=crow, arrowhead=tee"
            } else if l.label.contains("no FK") {
                "style=dashed"
            } else {
                "style=solid"
            };
            let _ = writeln!(
                out,
                "  {}:{}_out:e -> {}:{}_in:w [{style}, label=\"{}\"];",
                l.from_table,
                l.from_columns[0],
                l.to_table,
                l.to_columns[0],
                l.label.replace('"', "'")
            );
        }
        for (parent, dep, field) in &self.dependents {
            let _ = writeln!(
                out,
                "  // {parent} pulls its {dep} on demand (their {field} holds its key)"
            );
        }
        out.push_str("}\n");
        out
    }
}

/// The comment of a column in the Mermaid diagram: what it points at, if anything.
fn column_note(c: &Col) -> String {
    if let Some(p) = &c.parent_column {
        return format!("parent {p}");
    }
    match (&c.references, c.on_missing) {
        (Some((table, key)), Some(p)) => format!(
            "references {table}.{key}, on_missing {}{}",
            policy_name(p),
            if c.foreign_key { "" } else { ", no FK" }
        ),
        _ => String::new(),
    }
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPPING: &str = r#"
version = "shop"
[entities.customers]
collection = "people"
id_field = "code"
time_field = "t"
time_encoding = "date"
table = "customers"
primary_key = ["code"]
[entities.customers.columns]
code = { path = "code", type = "bigint", required = true }
name = { path = "name", type = "text" }

[entities.orders]
collection = "orders"
time_field = "t"
time_encoding = "iso8601"
table = "orders"
primary_key = ["id"]
[entities.orders.columns]
id = { path = "_id", type = "text", required = true }
customer = { path = "customer", type = "bigint", references = "customers", on_missing = "defer" }
[entities.orders.children.lines]
path = "lines"
table = "order_lines"
primary_key = ["order_id", "n"]
[entities.orders.children.lines.columns]
order_id = { parent = "id", type = "text" }
n = { ordinal = true, type = "integer" }
buyer = { path = "buyer", type = "bigint", required = true, references = "customers", on_missing = "skip" }
"#;

    fn schema() -> Schema {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        std::fs::write(&p, MAPPING).unwrap();
        Schema::of(&Mapping::load(&p).unwrap())
    }

    #[test]
    fn the_model_has_every_table_key_reference_and_parent_link() {
        let s = schema();
        let names: Vec<&str> = s.tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["customers", "orders", "order_lines"]);
        assert_eq!(s.tables[2].source, "array orders.lines");
        assert_eq!(s.tables[2].parent.as_deref(), Some("orders"));
        let line_buyer = &s.tables[2].columns[2];
        assert_eq!(
            line_buyer.references,
            Some(("customers".into(), "code".into()))
        );
        assert!(line_buyer.foreign_key && line_buyer.required);
        assert_eq!(
            s.tables[2].columns[0].parent_column.as_deref(),
            Some("orders.id")
        );
        assert!(s.tables[0].columns[0].pk && s.tables[0].columns[0].ty == "bigint");
        let edges: Vec<(&str, &str, bool)> = s
            .links
            .iter()
            .map(|l| (l.from_table.as_str(), l.to_table.as_str(), l.child))
            .collect();
        assert_eq!(
            edges,
            [
                ("orders", "customers", false),
                ("order_lines", "customers", false),
                ("order_lines", "orders", true)
            ]
        );
    }

    #[test]
    fn mermaid_and_dot_name_every_table_and_edge() {
        let s = schema();
        let m = s.mermaid();
        assert!(m.contains("erDiagram"), "{m}");
        assert!(
            m.contains("order_lines[\"order_lines: array orders.lines\"] {"),
            "{m}"
        );
        assert!(m.contains("bigint code PK"), "{m}");
        assert!(
            m.contains("text order_id PK, FK \"parent orders.id\""),
            "{m}"
        );
        assert!(
            m.contains("orders }o--o| customers : \"customer (on_missing defer)\""),
            "{m}"
        );
        assert!(
            m.contains("order_lines }o--|| orders : \"child lines\""),
            "{m}"
        );
        let d = s.dot();
        assert!(
            d.starts_with("// Target schema") && d.trim_end().ends_with('}'),
            "{d}"
        );
        assert!(
            d.contains("order_lines:order_id_out:e -> orders:id_in:w [style=bold"),
            "{d}"
        );
        assert!(
            d.contains("order_lines:buyer_out:e -> customers:code_in:w [style=solid"),
            "{d}"
        );
        assert!(d.contains("collection people"), "{d}");
    }
}
