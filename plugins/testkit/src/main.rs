//! `caremsg-plugin-testkit <plugin.so> --config <file.json>`: runs the conformance
//! battery and exits non-zero when any check fails.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use caremsg_plugin_testkit::{Suite, run};
use clap::Parser;

/// Runs the caremsg plugin conformance battery against a plugin library.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The plugin library (`.so`).
    plugin: PathBuf,
    /// The suite file: `{"config": {...}, "send": [...], "webhooks": [...]}`, or just
    /// the plugin's configuration (JSON).
    #[arg(long)]
    config: PathBuf,
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let text = std::fs::read_to_string(&cli.config)
        .with_context(|| format!("cannot read {}", cli.config.display()))?;
    let suite = Suite::from_json(&text)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("in {}", cli.config.display()))?;
    let report = run(&cli.plugin, &suite, &mut std::io::stdout()).map_err(anyhow::Error::msg)?;
    Ok(if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
