//! `tidemark check-config`: print the resolved settings (redacted) and the compiled mapping.

use crate::commands::setup::{fingerprint, load_mapping};
use crate::settings::Settings;
use anyhow::Result;

/// `tidemark check-config`: resolved settings (redacted) and the compiled mapping;
/// `quiet`: one line (for the units' ExecStartPre).
pub fn check_config(s: &Settings, quiet: bool) -> Result<String> {
    let mapping = load_mapping(s)?;
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
