//! Configuration reload (SIGHUP, `systemctl reload`): re-read, validate, diff, and
//! apply the reloadable parts atomically; refuse the whole file otherwise.
//!
//! Start-up and reload share one loading path (`caremsg_config::load_with_env`), so a
//! file that would not start the daemon is never applied by a reload either.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use caremsg_config::Settings;

use crate::metrics::Metrics;
use crate::notify;

/// Applies a new log filter directive (the `log.level` setting); returns why not.
pub type LogFilterHook = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Called after a reload is applied, with the old and the new settings (the gateways
/// rebuild their rate limiters and allow-lists with it).
pub type ApplyHook = Arc<dyn Fn(&Settings, &Settings) + Send + Sync>;

/// Where the settings come from, so that a reload reads the same sources.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The config file; `None` means the embedded default.
    pub path: Option<PathBuf>,
    /// `CAREMSG__...` environment overrides captured at start.
    pub env: Vec<(String, String)>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// These reloadable fields changed and are now in force.
    Applied(Vec<String>),
    /// The file says what is already in force.
    Unchanged,
    /// Nothing was applied; the reason names the file's problem or the field.
    Refused(String),
}

/// Performs reloads.
pub struct Reloader {
    /// The sources read again on every reload.
    pub source: ConfigSource,
    /// The live settings every part of the daemon reads.
    pub settings: Arc<ArcSwap<Settings>>,
    /// Counts reloads by outcome.
    pub metrics: Arc<Metrics>,
    /// Applies `log.level`, when the binary installed a reloadable filter.
    pub log_filter: Option<LogFilterHook>,
    /// Told about every applied reload, in order, after the new settings are live.
    pub on_apply: Vec<ApplyHook>,
}

impl Reloader {
    /// Reloads once, telling systemd before and after.
    pub fn reload(&self) -> ReloadOutcome {
        notify::reloading();
        let outcome = self.apply();
        let (label, status) = match &outcome {
            ReloadOutcome::Applied(fields) => (
                "applied",
                format!("Serving; configuration reloaded ({} changed)", fields.len()),
            ),
            ReloadOutcome::Unchanged => {
                ("unchanged", "Serving; configuration unchanged".to_owned())
            }
            ReloadOutcome::Refused(_) => (
                "refused",
                "Serving; reload refused, previous configuration in force".to_owned(),
            ),
        };
        self.metrics.reload(label);
        notify::ready(&status);
        outcome
    }

    fn apply(&self) -> ReloadOutcome {
        let new = match caremsg_config::load_with_env(
            self.source.path.as_deref(),
            self.source.env.clone(),
        ) {
            Ok(new) => new,
            Err(err) => {
                tracing::error!(error = %err, "Reload refused: the configuration is invalid. The previous configuration stays in force.");
                return ReloadOutcome::Refused(err.to_string());
            }
        };
        let old = self.settings.load_full();
        let changed = match caremsg_config::reload_plan(&old, &new) {
            Ok(changed) => changed,
            Err(refused) => {
                tracing::error!(field = %refused.field, "Reload refused: this field cannot change without a restart. The previous configuration stays in force.");
                return ReloadOutcome::Refused(format!(
                    "{} cannot change without a restart",
                    refused.field
                ));
            }
        };
        if changed.is_empty() {
            tracing::info!("Reload: the configuration is unchanged.");
            return ReloadOutcome::Unchanged;
        }
        if old.log.level != new.log.level
            && let Some(hook) = &self.log_filter
            && let Err(err) = hook(&new.log.level)
        {
            tracing::error!(error = %err, "Reload refused: log.level is not a valid filter. The previous configuration stays in force.");
            return ReloadOutcome::Refused(format!("log.level: {err}"));
        }
        let new = Arc::new(new);
        self.settings.store(new.clone());
        for hook in &self.on_apply {
            hook(&old, &new);
        }
        tracing::info!(fields = ?changed, "Configuration reloaded.");
        ReloadOutcome::Applied(changed)
    }
}
