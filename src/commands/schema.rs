//! `tidemark schema [--format mermaid|dot|sql]`: the target schema a mapping declares, as a
//! diagram (`mapping::diagram`) or as the DDL `migrate` runs (`sink::ddl::create_script`).
//! Reads the mapping file only; connects to nothing.

use crate::cli::{SchemaArgs, SchemaFormat, SqlDialect};
use crate::exit::Failure;
use crate::mapping::diagram::Schema;
use crate::mapping::Mapping;
use crate::settings::Settings;
use crate::sink::ddl::{self, Dialect};
use anyhow::Result;

/// The text `tidemark schema` prints.
pub fn schema(s: &Settings, args: &SchemaArgs) -> Result<String> {
    if args.dialect.is_some() && args.format != SchemaFormat::Sql {
        return Err(Failure::Config(anyhow::anyhow!(
            "--dialect applies to --format sql only; drop it or add --format sql"
        ))
        .into());
    }
    let path = args.mapping.as_ref().unwrap_or(&s.sync.mapping);
    let mapping = Mapping::load(path).map_err(Failure::Config)?;
    Ok(match args.format {
        SchemaFormat::Mermaid => Schema::of(&mapping).mermaid(),
        SchemaFormat::Dot => Schema::of(&mapping).dot(),
        SchemaFormat::Sql => {
            let d = match args.dialect {
                Some(SqlDialect::Postgres) => Dialect::Postgres,
                Some(SqlDialect::Sqlite) => Dialect::Sqlite,
                None => Dialect::of_url(s.target.url.expose()),
            };
            ddl::create_script(&mapping, d, s.target.foreign_key_checks)
        }
    })
}
