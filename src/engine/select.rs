//! Which entities a command processes, decided once for run, backfill, sweep and verify:
//! the `--entity` flags, else `sync.entities` (for the commands that follow it), else the
//! mapping's default set; every name checked against the mapping before anything connects.

use crate::exit::Failure;
use crate::mapping::{Entity, Mapping};
use anyhow::{anyhow, Result};

/// The mapping's entities a command takes when neither `--entity` nor `sync.entities`
/// names any, in the mapping's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Every entity with its own time windows (`windowed = true`): run, backfill, verify.
    Windowed,
    /// Every windowed entity with a key column: sweep (it finds rows by their key).
    Keyed,
}

impl Fallback {
    fn takes(self, e: &Entity) -> bool {
        match self {
            Fallback::Windowed => e.windowed,
            Fallback::Keyed => e.windowed && e.key_column.is_some(),
        }
    }
}

/// What names a command's entities: its `--entity` flags, the settings, the default.
#[derive(Debug, Clone, Copy)]
pub struct Selection<'a> {
    mapping: &'a Mapping,
    /// `--entity` flags, in the order given.
    named: &'a [String],
    /// `sync.entities`; empty for the commands that do not follow it (sweep, verify).
    configured: &'a [String],
    fallback: Fallback,
}

impl<'a> Selection<'a> {
    /// The entities `named` on the command line, else every windowed one of `mapping`.
    pub fn new(mapping: &'a Mapping, named: &'a [String]) -> Self {
        Selection {
            mapping,
            named,
            configured: &[],
            fallback: Fallback::Windowed,
        }
    }

    /// Follow `sync.entities` when the command line names none (run and backfill do).
    pub fn or_configured(self, configured: &'a [String]) -> Self {
        Selection { configured, ..self }
    }

    /// The mapping's entities taken when nothing names any.
    pub fn or(self, fallback: Fallback) -> Self {
        Selection { fallback, ..self }
    }

    /// The selected names, in the order named (else the mapping's), each named once; a
    /// name the mapping does not define is a configuration error listing the ones it does.
    pub fn names(&self) -> Result<Vec<String>> {
        let listed = if !self.named.is_empty() {
            self.named
        } else {
            self.configured
        };
        let names: Vec<String> = if listed.is_empty() {
            let mapping = self.mapping.entities.iter();
            mapping
                .filter(|e| self.fallback.takes(e))
                .map(|e| e.name.clone())
                .collect()
        } else {
            let mut seen = std::collections::HashSet::new();
            let once = listed.iter().filter(|n| seen.insert(n.as_str()));
            once.cloned().collect()
        };
        for n in &names {
            self.mapping.entity(n).map_err(Failure::Config)?;
        }
        Ok(names)
    }

    /// The entities to catch up window by window ([`names`](Self::names) that have time
    /// windows). An entity with `windowed = false` has no lane of its own, it is only
    /// pulled on demand: named with `--entity` it is refused with the fix, listed in
    /// `sync.entities` it is passed over.
    pub fn windows(&self) -> Result<Vec<String>> {
        let mut names = self.names()?;
        let windowed = |n: &String| self.mapping.entity(n).is_ok_and(|e| e.windowed);
        if let Some(n) = self.named.iter().find(|n| !windowed(n)) {
            return Err(Failure::Config(anyhow!(
                "entity `{n}` has windowed = false in the mapping: it has no time windows and is only \
                 pulled on demand; migrate records of it with --id, or set windowed = true"
            ))
            .into());
        }
        names.retain(windowed);
        Ok(names)
    }

    /// The one entity whose records are migrated by id (`run --id`), windowed or not: it
    /// must be named, alone, with `--entity`.
    pub fn one(&self) -> Result<String> {
        let [name] = self.named else {
            return Err(Failure::Config(anyhow!(
                "--id needs exactly one --entity, e.g. tidemark run --entity vizzes --id 1a2b…"
            ))
            .into());
        };
        self.mapping.entity(name).map_err(Failure::Config)?;
        Ok(name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `a` and `b` windowed with a key column, `c` windowed without one, `d` pulled only.
    const MAPPING: &str = r#"
version = "select"
[entities.a]
collection = "a"
time_field = "t"
time_encoding = "date"
table = "a"
primary_key = ["id"]
[entities.a.columns]
id = { path = "_id", type = "bigint", required = true }

[entities.b]
collection = "b"
time_field = "t"
time_encoding = "date"
table = "b"
primary_key = ["id"]
[entities.b.columns]
id = { path = "_id", type = "bigint", required = true }

[entities.c]
collection = "c"
time_field = "t"
time_encoding = "date"
table = "c"
primary_key = ["code"]
[entities.c.columns]
code = { path = "code", type = "text", required = true }

[entities.d]
collection = "d"
time_field = "t"
time_encoding = "date"
table = "d"
primary_key = ["id"]
windowed = false
[entities.d.columns]
id = { path = "_id", type = "bigint", required = true }
"#;

    fn mapping() -> Mapping {
        Mapping::parse(MAPPING, "select.toml").expect("test mapping compiles")
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn is_config(err: &anyhow::Error) -> bool {
        matches!(err.downcast_ref::<Failure>(), Some(Failure::Config(_)))
    }

    #[test]
    fn the_flags_win_over_the_settings_which_win_over_the_default() {
        let m = mapping();
        let (flags, configured) = (strings(&["b"]), strings(&["c", "a"]));
        let with = |f: &[String]| Selection::new(&m, f).or_configured(&configured).names();
        assert_eq!(with(&flags).unwrap(), ["b"]);
        assert_eq!(
            with(&[]).unwrap(),
            ["c", "a"],
            "sync.entities, in its order"
        );
        let none = Selection::new(&m, &[]).or_configured(&[]).names().unwrap();
        assert_eq!(
            none,
            ["a", "b", "c"],
            "every windowed entity, mapping order"
        );
    }

    #[test]
    fn commands_that_ignore_the_settings_fall_back_to_their_default() {
        let m = mapping();
        assert_eq!(Selection::new(&m, &[]).names().unwrap(), ["a", "b", "c"]);
        let keyed = Selection::new(&m, &[]).or(Fallback::Keyed).names().unwrap();
        assert_eq!(
            keyed,
            ["a", "b"],
            "sweep: windowed entities with a key column"
        );
        let named = strings(&["c"]);
        let c = Selection::new(&m, &named)
            .or(Fallback::Keyed)
            .names()
            .unwrap();
        assert_eq!(c, ["c"], "a named entity is taken as named");
    }

    #[test]
    fn an_unknown_name_is_a_config_error_listing_the_known_ones() {
        let m = mapping();
        let configured = strings(&["a", "nosuch"]);
        let err = Selection::new(&m, &[])
            .or_configured(&configured)
            .names()
            .unwrap_err();
        assert!(is_config(&err), "{err:#}");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("`nosuch`") && msg.contains("a, b, c, d"),
            "{msg}"
        );
    }

    #[test]
    fn a_name_given_twice_is_processed_once() {
        let m = mapping();
        let flags = strings(&["b", "a", "b"]);
        assert_eq!(Selection::new(&m, &flags).names().unwrap(), ["b", "a"]);
    }

    #[test]
    fn windows_refuse_a_named_unwindowed_entity_and_skip_a_configured_one() {
        let m = mapping();
        let flags = strings(&["a", "d"]);
        let err = Selection::new(&m, &flags).windows().unwrap_err();
        assert!(is_config(&err), "{err:#}");
        assert!(format!("{err:#}").contains("windowed = false"), "{err:#}");
        let configured = strings(&["d", "c"]);
        let names = Selection::new(&m, &[])
            .or_configured(&configured)
            .windows()
            .unwrap();
        assert_eq!(names, ["c"]);
        assert_eq!(Selection::new(&m, &[]).windows().unwrap(), ["a", "b", "c"]);
    }

    #[test]
    fn records_by_id_need_exactly_one_named_entity() {
        let m = mapping();
        let configured = strings(&["a"]);
        for flags in [strings(&[]), strings(&["a", "b"])] {
            let sel = Selection::new(&m, &flags).or_configured(&configured);
            let err = sel.one().unwrap_err();
            assert!(
                is_config(&err) && format!("{err:#}").contains("--id needs exactly one --entity")
            );
        }
        let d = strings(&["d"]);
        assert_eq!(
            Selection::new(&m, &d).one().unwrap(),
            "d",
            "unwindowed is fine"
        );
        let unknown = strings(&["zz"]);
        assert!(is_config(&Selection::new(&m, &unknown).one().unwrap_err()));
    }
}
