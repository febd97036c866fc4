//! `tidemark check-config`: print the resolved settings (redacted) and the compiled mapping.

use crate::commands::setup::{fingerprint, load_mapping};
use crate::exit::Failure;
use crate::settings::Settings;
use anyhow::Result;

/// `tidemark check-config`: resolved settings (redacted) and the compiled mapping;
/// `quiet`: one line (for the units' ExecStartPre).
pub fn check_config(s: &Settings, quiet: bool) -> Result<String> {
    let mapping = load_mapping(s)?;
    for name in &s.sync.entities {
        mapping.entity(name).map_err(|e| {
            Failure::Config(anyhow::anyhow!(
                "sync.entities names {name:?}, which {} does not define: {e}",
                s.sync.mapping.display()
            ))
        })?;
    }
    if quiet {
        return Ok(format!(
            "settings OK (fingerprint {}), mapping {} OK (version {}, {} entities)\n",
            fingerprint(s),
            s.sync.mapping.display(),
            mapping.version,
            mapping.entities.len()
        ));
    }
    let mut out = format!(
        "settings OK (fingerprint {})\n{s:#?}\n\nmapping {} OK (version {})\n",
        fingerprint(s),
        s.sync.mapping.display(),
        mapping.version
    );
    for e in &mapping.entities {
        out.push_str(&format!(
            "  {:<18} {} -> {} ({} columns, time {} as {:?})\n",
            e.name,
            e.collection,
            e.table,
            e.columns.len(),
            e.time_field,
            e.time_encoding
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entity in sync.entities that the mapping lacks fails here (exit 5), not at `run`.
    #[test]
    fn unknown_entity_in_settings_is_refused() {
        let mut s = Settings::load(None).expect("defaults");
        s.sync.entities = vec!["vizzes".into()];
        check_config(&s, false).expect("vizzes is in the VizHub mapping");
        s.sync.entities = vec!["vizzes".into(), "nosuch".into()];
        let err = check_config(&s, true).unwrap_err();
        assert_eq!(crate::exit::code(&err), crate::exit::CONFIG);
        let msg = format!("{err:#}");
        assert!(
            msg.contains("sync.entities") && msg.contains("\"nosuch\"") && msg.contains("users"),
            "{msg}"
        );
    }
}
