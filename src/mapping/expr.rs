//! Computed columns and rules, written in CEL (Common Expression Language).
//!
//! Why CEL (`cel-interpreter`): it is built for exactly this — small, safe, per-record
//! policy rules. It is not Turing-complete (every expression terminates, no loops, no
//! I/O), it is typed, and its syntax (`size(doc.upvotes) >= 2 ? "pool" : "gold"`) reads
//! like the rules operators already write. Rhai is Turing-complete (a runaway rule could
//! hang a run); jaq is excellent for reshaping JSON but clumsy for boolean classification.
//!
//! Variables: `doc` (the source document), and inside exploded arrays `element` (the array
//! element), `parent` (the parent document) and `index` (the element's position).

use super::value::{self, ColumnType, Value};
use bson::raw::RawBsonRef;
use bson::RawDocument;
use cel_interpreter::extractors::This;
use cel_interpreter::objects::{Key, Map};
use cel_interpreter::{Context, FunctionContext, Program, ResolveResult, Value as Cel};
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

thread_local! {
    /// The built-in function registry, built once per thread; each evaluation gets a child scope.
    static ROOT: Context<'static> = root_context();
}

/// CEL's standard functions plus tidemark's own: `sha256`.
fn root_context() -> Context<'static> {
    let mut ctx = Context::default();
    ctx.add_function("sha256", sha256);
    ctx
}

/// `sha256(text)` / `sha256(bytes)` (or `text.sha256()`): the SHA-256 of the UTF-8 text or the
/// bytes, as 64 lower-case hex digits — a key for content, so identical content maps to one
/// row however many documents carry it (docs/MAPPING.md, "Content hashes").
fn sha256(ftx: &FunctionContext, This(v): This<Cel>) -> ResolveResult {
    use sha2::{Digest, Sha256};
    let digest = match &v {
        Cel::String(s) => Sha256::digest(s.as_bytes()),
        Cel::Bytes(b) => Sha256::digest(b.as_slice()),
        other => {
            return Err(ftx.error(format!(
            "sha256 takes text or bytes, not {other:?}; convert it first, e.g. sha256(string(x))"
        )))
        }
    };
    Ok(Cel::String(Arc::new(hex::encode(digest))))
}

/// A compiled expression.
pub struct Expr {
    pub source: String,
    program: Program,
    /// Top-level fields of each variable the expression reads (None = the whole value).
    fields: HashMap<&'static str, Option<HashSet<String>>>,
    /// Of those, fields read only as `size(var.f)` or `has(var.f)`: an array there becomes a
    /// list of as many nulls, not a converted copy (`size(doc.files)` would otherwise copy
    /// every file's text into the interpreter).
    counted: HashMap<&'static str, HashSet<String>>,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

impl Clone for Expr {
    fn clone(&self) -> Self {
        Expr::compile(&self.source).expect("an expression that compiled once compiles again")
    }
}

const VARS: [&str; 4] = ["doc", "element", "parent", "index"];

impl Expr {
    /// Compile once at start-up; the error text is CEL's parse error.
    pub fn compile(source: &str) -> Result<Expr, String> {
        let program = Program::compile(source)
            .map_err(|e| format!("expression `{source}` does not compile: {e}"))?;
        // The variables the expression reads from outside: a macro's loop variable
        // (`doc.tags.all(t, t != "")`) is bound by the macro, whatever its name.
        let free = free_variables(source)?;
        let mut fields = HashMap::new();
        let mut counted = HashMap::new();
        for v in VARS {
            if free.contains(v) {
                let f = referenced_fields(source, v);
                if let Some(f) = &f {
                    counted.insert(v, counted_fields(source, v, f));
                }
                fields.insert(v, f);
            }
        }
        let mut unknown: Vec<&String> = free
            .iter()
            .filter(|v| !VARS.contains(&v.as_str()))
            .collect();
        unknown.sort();
        if let Some(v) = unknown.first() {
            return Err(format!(
                "expression `{source}` uses unknown variable `{v}`; available: doc, element, parent, index"
            ));
        }
        Ok(Expr {
            source: source.to_owned(),
            program,
            fields,
            counted,
        })
    }

    pub fn uses(&self, var: &str) -> bool {
        self.fields.contains_key(var)
    }

    /// Evaluate against a document scope.
    pub fn eval(&self, scope: &Scope<'_>) -> Result<Cel, String> {
        ROOT.with(|root| {
            let mut ctx = root.new_inner_scope();
            for (var, fields) in &self.fields {
                let counted = self.counted.get(var);
                let v = match *var {
                    "doc" | "parent" => {
                        let d = if *var == "doc" {
                            scope.doc
                        } else {
                            scope.parent
                        };
                        d.map(|d| match scope.cache {
                            Some(cache) => cache.get_or_build(self, var, || {
                                doc_to_cel(d, fields.as_ref(), counted)
                            }),
                            None => doc_to_cel(d, fields.as_ref(), counted),
                        })
                    }
                    "element" => scope.element.map(to_cel),
                    "index" => scope.index.map(|i| Cel::Int(i as i64)),
                    _ => None,
                };
                ctx.add_variable_from_value(*var, v.unwrap_or(Cel::Null));
            }
            self.program
                .execute(&ctx)
                .map_err(|e| format!("expression `{}` failed: {e}", self.source))
        })
    }
}

/// What an expression can see.
#[derive(Default, Clone, Copy)]
pub struct Scope<'a> {
    pub doc: Option<&'a RawDocument>,
    pub element: Option<RawBsonRef<'a>>,
    pub parent: Option<&'a RawDocument>,
    pub index: Option<usize>,
    /// `doc` and `parent` as CEL values already built, valid while both stay the same.
    pub cache: Option<&'a DocCache>,
}

/// The CEL values of `doc` and `parent` built for each expression, kept while one parent's
/// array elements are mapped: every element's columns see the same parent, and building
/// its CEL map again for each element (VizHub's upvote ids read `parent.id`, 550,000 times
/// on the benchmark) was ~4 % of tidemark's CPU on the full mapping (BENCHMARKS.md).
#[derive(Default)]
pub struct DocCache(std::cell::RefCell<Vec<(usize, &'static str, Cel)>>);

impl DocCache {
    fn get_or_build(&self, e: &Expr, var: &'static str, build: impl FnOnce() -> Cel) -> Cel {
        // The expression's address identifies it: it outlives the cache (both belong to one
        // call mapping one parent's elements).
        let id = e as *const Expr as usize;
        if let Some((_, _, v)) = self
            .0
            .borrow()
            .iter()
            .find(|(i, n, _)| *i == id && *n == var)
        {
            return v.clone();
        }
        let v = build();
        self.0.borrow_mut().push((id, var, v.clone()));
        v
    }
}

/// The identifiers `source` reads that no macro binds (`all`, `exists`, `exists_one`,
/// `filter`, `map` bind their loop variable inside their body). The interpreter's own
/// `references()` lists loop variables too, so it cannot tell `t` in
/// `doc.tags.all(t, t != "")` from an unknown variable.
fn free_variables(source: &str) -> Result<HashSet<String>, String> {
    use cel_parser::ast::{EntryExpr, Expr as E};
    fn walk(e: &cel_parser::Expression, bound: &mut Vec<String>, out: &mut HashSet<String>) {
        match &e.expr {
            E::Unspecified | E::Literal(_) => {}
            E::Ident(name) => {
                if !name.starts_with('@') && !bound.iter().any(|b| b == name) {
                    out.insert(name.clone());
                }
            }
            E::Call(call) => {
                if let Some(t) = &call.target {
                    walk(t, bound, out);
                }
                for a in &call.args {
                    walk(a, bound, out);
                }
            }
            E::Select(sel) => walk(&sel.operand, bound, out),
            E::List(list) => {
                for x in &list.elements {
                    walk(x, bound, out);
                }
            }
            E::Map(map) => walk_entries(map.entries.iter().map(|x| &x.expr), bound, out),
            E::Struct(st) => walk_entries(st.entries.iter().map(|x| &x.expr), bound, out),
            E::Comprehension(c) => {
                // The range is read outside the loop; the rest sees the loop variables.
                walk(&c.iter_range, bound, out);
                walk(&c.accu_init, bound, out);
                let depth = bound.len();
                bound.push(c.iter_var.clone());
                bound.extend(c.iter_var2.clone());
                bound.push(c.accu_var.clone());
                walk(&c.loop_cond, bound, out);
                walk(&c.loop_step, bound, out);
                walk(&c.result, bound, out);
                bound.truncate(depth);
            }
        }
    }
    fn walk_entries<'a>(
        entries: impl Iterator<Item = &'a EntryExpr>,
        bound: &mut Vec<String>,
        out: &mut HashSet<String>,
    ) {
        for entry in entries {
            match entry {
                EntryExpr::StructField(f) => walk(&f.value, bound, out),
                EntryExpr::MapEntry(m) => {
                    walk(&m.key, bound, out);
                    walk(&m.value, bound, out);
                }
            }
        }
    }
    let ast = cel_parser::Parser::default()
        .parse(source)
        .map_err(|e| format!("expression `{source}` does not compile: {e}"))?;
    let mut out = HashSet::new();
    walk(&ast, &mut Vec::new(), &mut out);
    Ok(out)
}

/// `doc.title`, `has(doc.title)` → {"title"}; any other use of `doc` → None (convert everything).
fn referenced_fields(src: &str, var: &str) -> Option<HashSet<String>> {
    let bytes = src.as_bytes();
    let mut out = HashSet::new();
    let mut i = 0;
    while let Some(pos) = src[i..].find(var) {
        let at = i + pos;
        let end = at + var.len();
        i = end;
        let before_ok = at == 0
            || !(bytes[at - 1].is_ascii_alphanumeric()
                || bytes[at - 1] == b'_'
                || bytes[at - 1] == b'.');
        let after_ident =
            end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_');
        if !before_ok || after_ident {
            continue;
        }
        if end < bytes.len() && bytes[end] == b'.' {
            let field: String = src[end + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if field.is_empty() {
                return None;
            }
            out.insert(field);
        } else {
            return None;
        }
    }
    Some(out)
}

/// Of `fields` (what [`referenced_fields`] found), those whose every use in `src` is
/// exactly `size(var.f)` or `has(var.f)`: only their presence and length matter.
fn counted_fields(src: &str, var: &str, fields: &HashSet<String>) -> HashSet<String> {
    fields
        .iter()
        .filter(|f| {
            let needle = format!("{var}.{f}");
            let mut uses = src.match_indices(&needle).peekable();
            uses.peek().is_some()
                && uses.all(|(at, _)| {
                    let end = at + needle.len();
                    let before = &src[..at];
                    (before.ends_with("size(") || before.ends_with("has("))
                        && src[end..].starts_with(')')
                })
        })
        .cloned()
        .collect()
}

fn doc_to_cel(
    d: &RawDocument,
    only: Option<&HashSet<String>>,
    counted: Option<&HashSet<String>>,
) -> Cel {
    let mut map: HashMap<Key, Cel> = HashMap::new();
    for (k, v) in d.into_iter().flatten() {
        if only.is_none_or(|f| f.contains(k)) {
            let v = match v {
                RawBsonRef::Array(a) if counted.is_some_and(|c| c.contains(k)) => {
                    Cel::List(Arc::new(vec![Cel::Null; a.into_iter().count()]))
                }
                other => to_cel(other),
            };
            map.insert(Key::String(Arc::new(k.to_owned())), v);
        }
    }
    Cel::Map(Map { map: Arc::new(map) })
}

/// BSON to CEL: documents → maps, arrays → lists, dates → timestamps, ObjectIds → hex strings.
pub fn to_cel(v: RawBsonRef<'_>) -> Cel {
    match v {
        RawBsonRef::Document(d) => doc_to_cel(d, None, None),
        RawBsonRef::Array(a) => Cel::List(Arc::new(a.into_iter().flatten().map(to_cel).collect())),
        RawBsonRef::String(s) => Cel::String(Arc::new(s.to_owned())),
        RawBsonRef::Int32(i) => Cel::Int(i as i64),
        RawBsonRef::Int64(i) => Cel::Int(i),
        RawBsonRef::Double(d) => Cel::Float(d),
        RawBsonRef::Boolean(b) => Cel::Bool(b),
        RawBsonRef::Null | RawBsonRef::Undefined => Cel::Null,
        RawBsonRef::ObjectId(o) => Cel::String(Arc::new(o.to_hex())),
        RawBsonRef::DateTime(d) => {
            match DateTime::<Utc>::from_timestamp_millis(d.timestamp_millis()) {
                Some(t) => Cel::Timestamp(t.fixed_offset()),
                None => Cel::Null,
            }
        }
        RawBsonRef::Decimal128(d) => Cel::String(Arc::new(d.to_string())),
        RawBsonRef::Binary(b) => Cel::Bytes(Arc::new(b.bytes.to_vec())),
        other => match value::raw_to_json(other) {
            Ok(j) => Cel::String(Arc::new(j.to_string())),
            Err(_) => Cel::Null,
        },
    }
}

/// A CEL result as a column value of type `ty`.
pub fn from_cel(v: Cel, ty: ColumnType) -> Result<Value, String> {
    use ColumnType as T;
    Ok(match (v, ty) {
        (Cel::Null, _) => Value::Null,
        (Cel::String(s), T::Text) => Value::Text(value::sanitize(&s)),
        (Cel::Int(i), T::Text) => Value::Text(i.to_string()),
        (Cel::UInt(i), T::Text) => Value::Text(i.to_string()),
        (Cel::Float(f), T::Text) => Value::Text(f.to_string()),
        (Cel::Bool(b), T::Text) => Value::Text(b.to_string()),
        (Cel::Int(i), T::Integer) => {
            Value::Int(i32::try_from(i).map_err(|_| format!("{i} is out of range for integer"))?)
        }
        (Cel::UInt(i), T::Integer) => {
            Value::Int(i32::try_from(i).map_err(|_| format!("{i} is out of range for integer"))?)
        }
        (Cel::Int(i), T::Bigint) => Value::BigInt(i),
        (Cel::UInt(i), T::Bigint) => {
            Value::BigInt(i64::try_from(i).map_err(|_| format!("{i} is out of range for bigint"))?)
        }
        (Cel::Int(i), T::Double) => Value::Double(i as f64),
        (Cel::Float(f), T::Double) if f.is_finite() => Value::Double(f),
        (Cel::Bool(b), T::Boolean) => Value::Bool(b),
        (Cel::Timestamp(t), T::Timestamptz) => Value::Timestamp(t.with_timezone(&Utc)),
        (Cel::String(s), T::Timestamptz) => Value::Timestamp(
            DateTime::parse_from_rfc3339(&s)
                .map_err(|e| format!("`{s}` is not a timestamp: {e}"))?
                .with_timezone(&Utc),
        ),
        (v, T::Json) => Value::Json(
            v.json()
                .map_err(|e| format!("result cannot be JSON: {e:?}"))?,
        ),
        (v, t) => return value::from_text_like(v, t),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, RawDocumentBuf};

    fn eval(src: &str, d: bson::Document) -> Cel {
        let raw = RawDocumentBuf::from_document(&d).unwrap();
        Expr::compile(src)
            .unwrap()
            .eval(&Scope {
                doc: Some(&raw),
                ..Default::default()
            })
            .unwrap()
    }

    #[test]
    fn sha256_of_text_and_bytes() {
        // FIPS 180-2's "abc" test vector.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let hex = |s: &str| Cel::String(Arc::new(s.into()));
        assert_eq!(eval("sha256(doc.t)", doc! { "t": "abc" }), hex(abc));
        assert_eq!(eval("doc.t.sha256()", doc! { "t": "abc" }), hex(abc));
        let bin = bson::Binary {
            subtype: bson::spec::BinarySubtype::Generic,
            bytes: b"abc".to_vec(),
        };
        assert_eq!(eval("sha256(doc.b)", doc! { "b": bin }), hex(abc));
        assert_eq!(eval(r#"sha256(b"abc")"#, doc! {}), hex(abc));
        // Equal content, equal key; other content, other key.
        assert_eq!(
            eval(
                "sha256(doc.a) == sha256(doc.b)",
                doc! { "a": "x\ny", "b": "x\ny" }
            ),
            Cel::Bool(true)
        );
        assert_ne!(eval("sha256(doc.t)", doc! { "t": "abd" }), hex(abc));
        let err = Expr::compile("sha256(doc.n)")
            .unwrap()
            .eval(&Scope {
                doc: Some(&RawDocumentBuf::from_document(&doc! { "n": 5 }).unwrap()),
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.contains("sha256 takes text or bytes"), "{err}");
    }

    #[test]
    fn classification_rule() {
        let rule = r#"size(doc.annotators) == 1 ? "gold" : "pool""#;
        assert_eq!(
            eval(rule, doc! { "annotators": ["a"] }),
            Cel::String(Arc::new("gold".into()))
        );
        assert_eq!(
            eval(rule, doc! { "annotators": ["a", "b"] }),
            Cel::String(Arc::new("pool".into()))
        );
    }

    #[test]
    fn fallback_and_field_pruning() {
        let e = r#"has(doc.fullName) && doc.fullName != "" ? doc.fullName : doc.userName"#;
        assert_eq!(
            eval(e, doc! { "userName": "ann", "big": "x" }),
            Cel::String(Arc::new("ann".into()))
        );
        assert_eq!(
            referenced_fields(e, "doc"),
            Some(["fullName".to_string(), "userName".to_string()].into())
        );
        assert_eq!(referenced_fields("size(doc)", "doc"), None);
    }

    #[test]
    fn arrays_only_counted_are_not_converted() {
        let e = Expr::compile("has(doc.files) ? size(doc.files) : size(doc.tags) + doc.tags[0]")
            .unwrap();
        assert_eq!(e.counted["doc"], ["files".to_string()].into());
        let d = doc! { "files": [{ "name": "a", "text": "x".repeat(1000) }, { "name": "b" }], "tags": [5, 6] };
        let raw = RawDocumentBuf::from_document(&d).unwrap();
        let scope = Scope {
            doc: Some(&raw),
            ..Default::default()
        };
        assert_eq!(e.eval(&scope).unwrap(), Cel::Int(2));
        let e = Expr::compile("has(doc.files) ? size(doc.tags) + doc.tags[0] : 0").unwrap();
        assert_eq!(
            e.counted["doc"],
            ["files".to_string()].into(),
            "tags is indexed"
        );
        assert_eq!(e.eval(&scope).unwrap(), Cel::Int(7));
        // A string or a map keeps its real size.
        let e = Expr::compile("size(doc.s) + size(doc.m)").unwrap();
        let raw =
            RawDocumentBuf::from_document(&doc! { "s": "hello", "m": { "a": 1, "b": 2 } }).unwrap();
        assert_eq!(
            e.eval(&Scope {
                doc: Some(&raw),
                ..Default::default()
            })
            .unwrap(),
            Cel::Int(7)
        );
    }

    #[test]
    fn macros_bind_any_loop_variable_name() {
        let d = doc! { "answers": [{ "score": 3, "by": "a" }, { "score": 5, "by": "b" }], "tags": ["x", "y"] };
        let t = |b| Cel::Bool(b);
        assert_eq!(eval("doc.answers.all(a, a.score > 2)", d.clone()), t(true));
        assert_eq!(
            eval("doc.answers.exists(ans, ans.score > 4)", d.clone()),
            t(true)
        );
        assert_eq!(
            eval("doc.answers.exists_one(x, x.score > 4)", d.clone()),
            t(true)
        );
        assert_eq!(
            eval("size(doc.answers.filter(a, a.score > 4))", d.clone()),
            Cel::Int(1)
        );
        assert_eq!(
            eval("doc.answers.map(a, a.score).exists(s, s == 5)", d.clone()),
            t(true)
        );
        // Nested macros, each with its own name; the outer one stays bound inside.
        assert_eq!(
            eval(
                "doc.answers.all(a, doc.tags.exists(t, t == 'x' && a.score > 2))",
                d.clone()
            ),
            t(true)
        );
        // A loop variable does not leak out of its macro.
        assert!(Expr::compile("doc.tags.all(t, t != '') && t == 'x'")
            .unwrap_err()
            .contains("unknown variable `t`"));
        // `doc` is still pruned to the fields read.
        let e = Expr::compile("doc.answers.all(a, a.score > 2)").unwrap();
        assert_eq!(e.fields["doc"], Some(["answers".to_string()].into()));
    }

    #[test]
    fn bad_expressions_fail_to_compile() {
        assert!(Expr::compile("size(doc.upvotes").is_err());
        assert!(Expr::compile("row.x + 1")
            .unwrap_err()
            .contains("unknown variable `row`"));
    }
}
