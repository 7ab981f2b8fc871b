//! `spool config check FILE`: validate a TOML configuration file as `spool serve` would read
//! it (with the flags and `SPOOL_*` variables given too), and print the effective value of
//! every setting with where it came from — flag, env, file or default — secrets masked.
//!
//! Validation is `spool serve`'s own: the file is parsed with the same unknown-key and type
//! checks (errors carry the line and column), then [`config::resolve`] checks values and reads
//! the files named (TLS certificate and key, JWT public keys) exactly as a start would.

use std::{fmt::Write as _, io::Write as _, path::PathBuf};

use anyhow::{Context, bail};
use clap::{Arg, ArgMatches, Args, CommandFactory, Subcommand, parser::ValueSource};

use crate::config::{self, Settings};

#[derive(Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate a TOML configuration file and print the effective configuration, with where
    /// each value came from (flag, env, file, default); secrets are masked. Takes the flags
    /// of `spool serve` too, which override the file as they would there.
    Check(Box<CheckArgs>),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The TOML file to check.
    pub file: PathBuf,
    #[command(flatten)]
    pub settings: Settings,
}

pub fn run(args: ConfigArgs) -> anyhow::Result<()> {
    let ConfigCommand::Check(check) = args.command;
    let CheckArgs { file, settings } = *check;
    if settings.config.as_ref().is_some_and(|c| c != &file) {
        bail!("give the file once: as FILE or as --config / SPOOL_CONFIG, not both");
    }
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read config file {}", file.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", file.display()))?;
    let from_file = Settings::load(&file)?;
    let settings = Settings {
        config: Some(file.clone()),
        ..settings
    };
    config::resolve(&settings).with_context(|| {
        format!(
            "{} does not make a configuration spool serve can start with",
            file.display()
        )
    })?;

    // Which flag or variable was given: clap knows, from the same command line.
    let command = crate::Cli::command();
    let matches = command.clone().try_get_matches().ok();
    let check_matches = matches
        .as_ref()
        .and_then(|m| m.subcommand_matches("config"))
        .and_then(|m| m.subcommand_matches("check"));
    let check_command = command
        .find_subcommand("config")
        .and_then(|c| c.find_subcommand("check"))
        .context("the config check command")?;

    let mut out = format!("{}: valid\n", file.display());
    let mut rows = Vec::new();
    for arg in check_command.get_arguments() {
        let Some(long) = arg.get_long() else {
            continue;
        };
        if matches!(long, "help" | "config") {
            continue;
        }
        let key = match config::RENAMED.iter().find(|(flag, _)| *flag == long) {
            Some((_, key)) => (*key).to_owned(),
            None => long.replace('-', "_"),
        };
        let (value, source) = effective(arg, &key, check_matches, &table);
        let value = value.map(|v| mask(arg, &key, &v));
        rows.push((key, value.unwrap_or_else(|| "(not set)".into()), source));
    }
    let key_width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let value_width = rows
        .iter()
        .map(|r| r.1.chars().count().min(40))
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "{:<key_width$}  {:<value_width$}  FROM",
        "SETTING", "VALUE"
    );
    for (key, value, source) in rows {
        let _ = writeln!(out, "{key:<key_width$}  {value:<value_width$}  {source}");
    }
    let rules = from_file.retention.rules.len();
    if rules > 0 {
        let _ = writeln!(out, "[[retention.rules]]: {rules} rule(s), from the file");
    }
    // A closed pipe (`| head`) is not an error of the check.
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The value a setting takes and where it came from.
fn effective(
    arg: &Arg,
    key: &str,
    matches: Option<&ArgMatches>,
    table: &toml::Table,
) -> (Option<String>, &'static str) {
    let id = arg.get_id().as_str();
    if let Some(m) = matches {
        let source = match m.value_source(id) {
            Some(ValueSource::CommandLine) => Some("flag"),
            Some(ValueSource::EnvVariable) => Some("env"),
            _ => None,
        };
        if let Some(source) = source {
            let raw = m
                .get_raw(id)
                .map(|values| {
                    values
                        .map(|v| v.to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_else(|| "true".into());
            return (Some(raw), source);
        }
    }
    let in_file = match key.split_once('.') {
        Some((t, k)) => table
            .get(t)
            .and_then(|t| t.as_table())
            .and_then(|t| t.get(k)),
        None => table.get(key),
    };
    if let Some(value) = in_file {
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        return (Some(text), "file");
    }
    (default_of(arg), "default")
}

/// The default a flag's help states: "(default 10000)", "(default: --anycable-secret)".
fn default_of(arg: &Arg) -> Option<String> {
    if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
        return Some("false".into());
    }
    let help = arg.get_help()?.to_string();
    let start = help
        .find("(default: ")
        .map(|i| i + "(default: ".len())
        .or_else(|| help.find("(default ").map(|i| i + "(default ".len()))?;
    let rest = &help[start..];
    let end = rest.find([')', ';'])?;
    Some(rest[..end].trim().to_owned())
}

/// Secrets as `****`; passwords inside URLs as `****`, the rest of the URL kept.
fn mask(arg: &Arg, key: &str, value: &str) -> String {
    if key.ends_with("_url") {
        return value
            .split(',')
            .map(|one| match reqwest::Url::parse(one) {
                Ok(mut url) if url.password().is_some() => {
                    let _ = url.set_password(Some("****"));
                    url.to_string()
                }
                _ => one.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(",");
    }
    let secret = arg.is_hide_env_values_set()
        || key.contains("secret")
        || key == "api_keys"
        || key.ends_with("broadcast_key");
    if secret && !value.is_empty() {
        let n = value.split(',').count();
        return vec!["****"; n].join(",");
    }
    value.to_owned()
}
