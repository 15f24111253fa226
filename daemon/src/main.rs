//! The `caremsgd` binary: parses the command line, sets up logging, and hands over to
//! the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// mimalloc rather than glibc's malloc: under load the daemon allocates and frees
/// small objects on many threads (HTTP, actors, the database's worker threads), and
/// glibc's arenas took 15–20% of its CPU (`caremsgd bench conversations`). Plugins
/// keep their own allocator: every buffer crossing the ABI carries its free function.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// caremsg: patient messaging for clinics.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file; without it, the embedded default (config/caremsg.toml).
    #[arg(long, short, global = true, env = "CAREMSG_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Check a configuration file; print what is wrong and exit non-zero if anything is.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Gateway plugins.
    Plugin {
        #[command(subcommand)]
        which: PluginCommand,
    },
    /// Benchmarks (print figures and ratios against their baselines).
    Bench {
        #[command(subcommand)]
        which: caremsgd::bench::Which,
    },
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Print a plugin library's metadata and whether this daemon can load it; exit
    /// non-zero if it cannot.
    Inspect {
        /// The plugin's shared library (`.so`).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    // SAFETY: the first thing the process does, on its only thread: nothing has
    // touched SQLite and no other thread exists to.
    #[allow(unsafe_code)]
    let sqlite = unsafe { caremsgd::sqlite_tuning::install() };
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return check_config(file);
    }
    if let Some(Command::Plugin {
        which: PluginCommand::Inspect { file },
    }) = &cli.command
    {
        let (report, loadable) = caremsgd::gateways::inspect(file);
        println!("{report}");
        return if loadable {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
    }
    let env = caremsg_env();
    let settings = match caremsg_config::load_with_env(cli.config.as_deref(), env.clone()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("caremsgd: the configuration is not usable:\n{err}");
            return ExitCode::from(2);
        }
    };
    let log_filter = init_tracing(&settings);
    if let Err(refused) = sqlite {
        tracing::warn!(%refused, "SQLite refused a setting of caremsg's and keeps its default for it.");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("caremsgd: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            None | Some(Command::Run) => {
                let options = caremsgd::Options {
                    source: caremsgd::reload::ConfigSource {
                        path: cli.config,
                        env,
                    },
                    log_filter: Some(log_filter),
                    ..Default::default()
                };
                caremsgd::run(settings, options, shutdown_signal()).await
            }
            Some(Command::Migrate) => caremsgd::open_database(&settings).await.map(|_| {
                tracing::info!("Every migration is applied.");
            }),
            Some(Command::Bench { which }) => caremsgd::bench::run(which).await,
            Some(Command::CheckConfig { .. } | Command::Plugin { .. }) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "caremsgd failed.");
            eprintln!("caremsgd: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `CAREMSG__...` variables of the environment.
fn caremsg_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("CAREMSG__"))
        .collect()
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match caremsg_config::load_with_env(Some(file), caremsg_env()) {
        Ok(settings) => {
            for warning in settings.warnings() {
                println!("{}: warning: {warning}", file.display());
            }
            println!("{}: OK", file.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            println!("{}: {err}", file.display());
            ExitCode::from(1)
        }
    }
}

/// Logs to stderr (journald), with a filter that `log.level` can change on reload.
fn init_tracing(settings: &caremsg_config::Settings) -> caremsgd::reload::LogFilterHook {
    let filter = EnvFilter::try_new(&settings.log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = match settings.log.format {
        caremsg_config::LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        caremsg_config::LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    Arc::new(move |directive: &str| {
        let filter = EnvFilter::try_new(directive).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called
/// (before the daemon starts and tells systemd it is ready), not when the future is
/// first polled, so a signal in between is not the default "terminate at once".
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::error!("Cannot install signal handlers; stopping only on Ctrl-C.");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
