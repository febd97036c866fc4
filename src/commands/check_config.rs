//! `tidemark check-config`: print the effective settings as TOML (redacted) and the compiled
//! mapping; `--connect` tests the connections too ([`super::check_connect`]).

use crate::commands::setup::{fingerprint, load_mapping};
use crate::exit::Failure;
use crate::settings::Settings;
use anyhow::{Context, Result};

/// `tidemark check-config`: the effective settings as TOML (redacted) and the compiled mapping;
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
    let toml = toml::to_string_pretty(s).context("printing the settings as TOML")?;
    let mut out = format!(
        "# tidemark check-config: settings OK (fingerprint {}). The effective settings (defaults,\n\
         # file, TIDEMARK__* environment), secrets redacted, paths resolved (README.md, Paths).\n\
         # Reports go to {}.\n{toml}\n# mapping {} OK (version {})\n",
        fingerprint(s),
        s.reports_path().display(),
        s.sync.mapping.display(),
        mapping.version
    );
    for e in &mapping.entities {
        out.push_str(&format!(
            "#   {:<18} {} -> {} ({} columns, time {} as {:?})\n",
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

    /// The output is TOML that reads back, durations in the settings' own form, no password.
    #[test]
    fn output_is_toml_without_secrets() {
        let mut s = Settings::load(None).expect("defaults");
        s.source.uri = crate::secret::SecretUri::new("mongodb://u:Pa55word-x@h/?tls=true");
        s.target.url = crate::secret::SecretUri::new("postgres://u@h/db?password=T0ken-y");
        let out = check_config(&s, false).unwrap();
        let v: toml::Value = toml::from_str(&out).expect("TOML");
        assert_eq!(v["sync"]["max_window"].as_str(), Some("365d"), "{out}");
        assert_eq!(v["sync"]["settle"].as_str(), Some("5m"), "{out}");
        assert!(!out.contains("Pa55word") && !out.contains("T0ken"), "{out}");
        assert!(
            v["source"]["uri"].as_str().unwrap().contains("u:***@h"),
            "{out}"
        );
    }

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
