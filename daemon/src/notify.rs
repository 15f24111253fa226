//! Telling systemd what the daemon is doing, through `NOTIFY_SOCKET` when it is set
//! (nothing happens when it is not).

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!(error = %err, "Could not notify the service manager.");
    }
}

/// Start-up is complete, or a reload has finished.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins (`RELOADING=1` with the monotonic timestamp systemd requires).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(err) => {
            tracing::warn!(error = %err, "Could not read the monotonic clock for the reload notice.");
            send(&[NotifyState::Reloading]);
        }
    }
}

/// Shutdown begins.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("Stopping")]);
}
