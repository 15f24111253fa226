//! The systemd watchdog, and the status line an operator reads in `systemctl status`.
//!
//! Under a service manager (`NOTIFY_SOCKET` set) one task works in rounds, one per
//! *period*: half of `WATCHDOG_USEC` when the unit sets `WatchdogSec=`, otherwise
//! [`STATUS_PERIOD`]. Each round runs every [`Probe`] — the built-in one sends a
//! heartbeat through the group-commit writer ([`Writer::heartbeat`]) — and once all
//! of them have come back it sends `WATCHDOG=1` (when the watchdog is on) and a fresh
//! `STATUS=` line. A probe still pending after a whole period means that part of the
//! daemon has stopped making progress: the ping is withheld, the status line and the
//! log say which part, and `caremsg_watchdog_stalls_total` counts it; after
//! `WatchdogSec=` systemd aborts the service and `Restart=on-failure` starts it again.
//! When the probe does come back, pings resume.
//!
//! Outside a service manager nothing runs: the end-to-end tests start the daemon
//! in-process without one, and no heartbeat joins their writer batches.
//!
//! Hooks for the parts of the daemon that come later, passed in [`Hooks`]: a
//! [`StatusPart`] adds a count to the status line ("3 gateways", "12,031
//! conversations active"); a [`Probe`] adds a progress check that the ping waits for
//! (the conversation actors' mailboxes, say).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::state::Shared;
use crate::writer::{WriteError, Writer};

/// How often the status line is refreshed when the unit sets no watchdog.
pub const STATUS_PERIOD: Duration = Duration::from_secs(10);

/// One part of the status line, computed at every refresh (`None` leaves it out).
pub type StatusPart = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// What a probe found once the part it checks answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The part made progress.
    Ok,
    /// The part answered, so it is not stuck, but something is wrong; the note goes
    /// to the status line. The ping is still sent: restarting would not help.
    Degraded(&'static str),
}

/// A progress check run before each ping. Its future resolves once the part it
/// checks has shown progress; a future that stays pending withholds the ping.
pub struct Probe {
    // Names the part in the log and the status line ("writer").
    name: &'static str,
    // Starts one check.
    check: Box<dyn Fn() -> BoxFuture<'static, Health> + Send + Sync>,
}

impl Probe {
    /// A probe named `name` (a noun: "writer", "conversation actors").
    pub fn new(
        name: &'static str,
        check: impl Fn() -> BoxFuture<'static, Health> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            check: Box::new(check),
        }
    }

    /// The built-in probe: a heartbeat through the writer's queue and batch loop.
    /// A writer that answers but cannot commit (a full disk, a lost database) makes
    /// no progress either: the probe stays pending until the writer's probe write
    /// commits again ([`Writer::storage_ok`]), so the pings are withheld meanwhile.
    /// Any other database error still counts as progress (the writer answered and
    /// already logged it).
    pub fn writer(writer: Writer, metrics: Arc<Metrics>) -> Self {
        Self::new("writer", move || {
            let writer = writer.clone();
            let metrics = metrics.clone();
            Box::pin(async move {
                let started = Instant::now();
                let result = writer.heartbeat().await;
                match result {
                    Ok(()) => {
                        metrics
                            .writer_heartbeat_seconds
                            .observe(started.elapsed().as_secs_f64());
                        Health::Ok
                    }
                    Err(WriteError::Closed) => {
                        // A closed writer while the daemon runs makes no progress,
                        // ever: let the watchdog fire.
                        futures::future::pending::<Health>().await
                    }
                    Err(err) if err.is_storage() => {
                        writer.storage_ok().await;
                        Health::Ok
                    }
                    Err(_) => {
                        metrics
                            .writer_heartbeat_seconds
                            .observe(started.elapsed().as_secs_f64());
                        Health::Degraded("database errors")
                    }
                }
            })
        })
    }
}

/// What other parts of the daemon add to the watchdog.
#[derive(Default)]
pub struct Hooks {
    /// Counts for the status line, after "Serving on ADDR".
    pub status: Vec<StatusPart>,
    /// Progress checks the ping waits for, besides the writer's.
    pub probes: Vec<Probe>,
}

/// Where notifications go: `sd_notify` in the daemon, a channel in unit tests.
type Sink = Box<dyn Fn(&[NotifyState<'_>]) + Send + Sync>;

/// The running watchdog task, if a service manager is listening.
pub struct Watchdog {
    // Ends the task at shutdown, before `STOPPING=1`, so no status line follows it.
    stop: CancellationToken,
    // The task; `None` when no service manager is listening.
    task: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the task when `NOTIFY_SOCKET` is set: pings at half of `WATCHDOG_USEC`
    /// if that is set, status lines either way. `addr` is shown in the status line.
    pub fn start(state: &Shared, addr: SocketAddr, hooks: Hooks) -> Self {
        let stop = CancellationToken::new();
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Self { stop, task: None };
        }
        let watchdog = sd_notify::watchdog_enabled().filter(|interval| !interval.is_zero());
        let period = watchdog.map_or(STATUS_PERIOD, |interval| interval / 2);
        if let Some(interval) = watchdog {
            tracing::info!(
                interval_ms = interval.as_millis() as u64,
                ping_ms = period.as_millis() as u64,
                "The systemd watchdog is on; pinging while the writer makes progress."
            );
        }
        let mut probes = vec![Probe::writer(state.writer.clone(), state.metrics.clone())];
        probes.extend(hooks.probes);
        let rounds = Rounds {
            period,
            watchdog: watchdog.is_some(),
            probes,
            status: StatusLine {
                addr,
                backend: crate::db::backend_name(&state.db),
                writer: state.writer.clone(),
                metrics: state.metrics.clone(),
                parts: hooks.status,
            },
            metrics: state.metrics.clone(),
        };
        let sink: Sink = Box::new(|states| {
            if let Err(err) = sd_notify::notify(states) {
                tracing::warn!(error = %err, "Could not notify the service manager.");
            }
        });
        let task = tokio::spawn(rounds.run(sink, stop.clone()));
        Self {
            stop,
            task: Some(task),
        }
    }

    /// Stops the task and waits for it: no ping or status line after this returns.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Some(task) = self.task
            && let Err(err) = task.await
        {
            tracing::error!(error = %err, "The watchdog task ended abnormally.");
        }
    }
}

/// The status line: where the daemon serves, the hooks' counts, the writer's figures.
struct StatusLine {
    addr: SocketAddr,
    backend: &'static str,
    writer: Writer,
    metrics: Arc<Metrics>,
    parts: Vec<StatusPart>,
}

impl StatusLine {
    fn render(&self, notes: &[&str]) -> String {
        let mut parts = vec![format!("Serving on {} ({})", self.addr, self.backend)];
        parts.extend(self.parts.iter().filter_map(|part| part()));
        parts.push(format!(
            "{} writes since start, {} queued",
            thousands(self.metrics.writer_units.get()),
            thousands(self.writer.queued() as u64)
        ));
        parts.extend(notes.iter().map(|note| (*note).to_owned()));
        parts.join("; ")
    }
}

/// The watchdog loop's settings and state.
struct Rounds {
    period: Duration,
    watchdog: bool,
    probes: Vec<Probe>,
    status: StatusLine,
    metrics: Arc<Metrics>,
}

impl Rounds {
    async fn run(self, sink: Sink, stop: CancellationToken) {
        let mut stalled = false;
        let mut degraded = false;
        loop {
            let started = Instant::now();
            let mut pending: FuturesUnordered<_> = self
                .probes
                .iter()
                .enumerate()
                .map(|(i, probe)| {
                    let check = (probe.check)();
                    async move { (i, check.await) }
                })
                .collect();
            let mut found: Vec<Option<Health>> = vec![None; self.probes.len()];
            let mut overdue_at = started + self.period;
            while !pending.is_empty() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    Some((i, health)) = pending.next() => found[i] = Some(health),
                    () = tokio::time::sleep_until(overdue_at) => {
                        let stuck: Vec<&str> = self
                            .probes
                            .iter()
                            .zip(&found)
                            .filter(|(_, health)| health.is_none())
                            .map(|(probe, _)| probe.name)
                            .collect();
                        let waited = started.elapsed();
                        self.metrics.watchdog_stalls.inc();
                        if !stalled {
                            tracing::error!(
                                parts = ?stuck,
                                waited_ms = waited.as_millis() as u64,
                                "No progress within the watchdog period; the watchdog ping is withheld."
                            );
                            stalled = true;
                        }
                        let status = format!(
                            "Stalled: the {} made no progress for {}s; watchdog pings withheld",
                            stuck.join(", the "),
                            waited.as_secs()
                        );
                        sink(&[NotifyState::Status(&status)]);
                        overdue_at += self.period;
                    }
                }
            }
            if stalled {
                tracing::warn!(
                    waited_ms = started.elapsed().as_millis() as u64,
                    "Progress again after a stall; watchdog pings resume."
                );
                stalled = false;
            }
            let notes: Vec<&str> = found
                .iter()
                .filter_map(|health| match health {
                    Some(Health::Degraded(note)) => Some(*note),
                    _ => None,
                })
                .collect();
            if notes.is_empty() == degraded {
                degraded = !notes.is_empty();
                if degraded {
                    tracing::warn!(notes = ?notes, "The daemon is degraded.");
                } else {
                    tracing::info!("The daemon is no longer degraded.");
                }
            }
            let status = self.status.render(&notes);
            if self.watchdog {
                sink(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
            } else {
                sink(&[NotifyState::Status(&status)]);
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(started + self.period) => {}
            }
        }
    }
}

/// `12031` → `"12,031"`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::mpsc;

    use super::*;
    use crate::writer::WriterOptions;

    #[test]
    fn thousands_groups_digits_by_three() {
        fn check(n: u64, expected: &str) {
            assert_eq!(thousands(n), expected, "{n}");
        }
        check(0, "0");
        check(7, "7");
        check(999, "999");
        check(1_000, "1,000");
        check(12_031, "12,031");
        check(999_999, "999,999");
        check(1_234_567, "1,234,567");
        check(u64::MAX, "18,446,744,073,709,551,615");
    }

    /// A writer on an in-memory SQLite database, and its metrics.
    async fn writer() -> (Writer, Arc<Metrics>, CancellationToken) {
        let db = sea_orm::Database::connect("sqlite::memory:").await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let (writer, _task) = Writer::start(
            db,
            WriterOptions {
                max_batch_units: 16,
                queue_depth: 16,
            },
            metrics.clone(),
            stop.clone(),
        )
        .unwrap();
        (writer, metrics, stop)
    }

    /// Runs rounds on `writer` (plus `extra` status parts) with a sink that forwards
    /// every notification, rendered as systemd receives it, to the returned channel.
    fn rounds(
        writer: &Writer,
        metrics: &Arc<Metrics>,
        period: Duration,
        parts: Vec<StatusPart>,
    ) -> (mpsc::UnboundedReceiver<String>, CancellationToken) {
        let (tx, rx) = mpsc::unbounded_channel();
        let tx = Mutex::new(tx);
        let sink: Sink = Box::new(move |states| {
            let text: Vec<String> = states.iter().map(ToString::to_string).collect();
            let _ = tx.lock().unwrap().send(text.join("\n"));
        });
        let rounds = Rounds {
            period,
            watchdog: true,
            probes: vec![Probe::writer(writer.clone(), metrics.clone())],
            status: StatusLine {
                addr: SocketAddr::from(([127, 0, 0, 1], 8680)),
                backend: "sqlite",
                writer: writer.clone(),
                metrics: metrics.clone(),
                parts,
            },
            metrics: metrics.clone(),
        };
        let stop = CancellationToken::new();
        tokio::spawn(rounds.run(sink, stop.clone()));
        (rx, stop)
    }

    async fn next_with(rx: &mut mpsc::UnboundedReceiver<String>, wanted: &str) -> String {
        loop {
            let message = rx.recv().await.unwrap();
            if message.contains(wanted) {
                return message;
            }
        }
    }

    #[tokio::test]
    async fn pings_with_a_status_line_while_the_writer_commits() {
        let (writer, metrics, _stop) = writer().await;
        let gateways: StatusPart = Arc::new(|| Some("3 gateways".to_owned()));
        let hidden: StatusPart = Arc::new(|| None);
        let (mut rx, stop) = rounds(
            &writer,
            &metrics,
            Duration::from_millis(20),
            vec![gateways, hidden],
        );
        let first = next_with(&mut rx, "WATCHDOG=1").await;
        assert_eq!(
            first,
            "WATCHDOG=1\nSTATUS=Serving on 127.0.0.1:8680 (sqlite); 3 gateways; 0 writes since start, 0 queued"
        );
        next_with(&mut rx, "WATCHDOG=1").await;
        stop.cancel();
        // Heartbeats are timed, but are not writes.
        assert_eq!(metrics.writer_units.get(), 0);
        assert!(
            metrics
                .render()
                .contains("caremsg_writer_heartbeat_seconds_count")
        );
    }

    #[tokio::test]
    async fn a_paused_writer_withholds_pings_until_it_resumes() {
        let (writer, metrics, _stop) = writer().await;
        let (mut rx, stop) = rounds(&writer, &metrics, Duration::from_millis(20), vec![]);
        next_with(&mut rx, "WATCHDOG=1").await;
        writer.pause();
        // The heartbeat of the next round waits in the queue: that round ends in a stall.
        next_with(&mut rx, "STATUS=Stalled: the writer made no progress").await;
        // From the stall on, nothing but stall notices until the writer resumes: ten
        // periods of them, and not one ping.
        for _ in 0..10 {
            let message = rx.recv().await.unwrap();
            assert!(message.starts_with("STATUS=Stalled"), "{message}");
        }
        assert!(metrics.watchdog_stalls.get() >= 10);
        writer.resume();
        next_with(&mut rx, "WATCHDOG=1").await;
        stop.cancel();
    }
}
