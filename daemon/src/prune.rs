//! The pruner: operational tables do not grow forever.
//!
//! Every `retention.prune_interval` (and once shortly after start) it removes, in
//! batches of `retention.prune_batch` rows, each batch one unit through the writer:
//! fired (and dead-lettered) timers, inbound receipts and parked delivery receipts
//! older than `retention.operational`, and unmatched inbound texts (PHI from unknown
//! numbers) older than `retention.unmatched_inbound`. Each batch is bounded by the
//! `prune_batch`-th oldest row's time, found through the table's time index, so a
//! batch never sorts the table.
//!
//! **Architecture Invariant:** messages, the audit log and the SMS status history are
//! records; nothing in caremsg prunes them.

use std::sync::Weak;

use caremsg_entities::{inbound_receipt, parked_receipt, timer, unmatched_inbound};
use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::state::{AppState, Shared};
use crate::writer::{Expect, WriteError, WriteUnit};

/// Rows removed by one run, per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Fired or dead-lettered timers.
    pub timers: u64,
    /// Inbound receipts (provider-retry dedup, status-callback dedup).
    pub inbound_receipts: u64,
    /// Parked delivery receipts whose delivery never carried their id.
    pub parked_receipts: u64,
    /// Texts of unknown numbers.
    pub unmatched_inbound: u64,
}

/// Why a run stopped. Nothing here carries PHI.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// Reading failed.
    #[error("reading failed: {0}")]
    Read(#[from] DbErr),
    /// Committing a batch failed.
    #[error("committing failed: {0}")]
    Write(#[from] WriteError),
}

/// One pruning run at `now` with the live settings.
pub async fn run_once(state: &Shared, now: DateTime<Utc>) -> Result<Pruned, PruneError> {
    let retention = state.settings.load().retention.clone();
    let before = |age: std::time::Duration| {
        now - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::days(30))
    };
    let operational = before(retention.operational);
    let batch = retention.prune_batch.max(1);
    Ok(Pruned {
        timers: prune::<timer::Entity>(
            state,
            Condition::all().add(timer::Column::Fired.eq(true)),
            timer::Column::FiredAt,
            operational,
            batch,
        )
        .await?,
        inbound_receipts: prune::<inbound_receipt::Entity>(
            state,
            Condition::all(),
            inbound_receipt::Column::ReceivedAt,
            operational,
            batch,
        )
        .await?,
        parked_receipts: prune::<parked_receipt::Entity>(
            state,
            Condition::all(),
            parked_receipt::Column::ReceivedAt,
            operational,
            batch,
        )
        .await?,
        unmatched_inbound: prune::<unmatched_inbound::Entity>(
            state,
            Condition::all(),
            unmatched_inbound::Column::ReceivedAt,
            before(retention.unmatched_inbound),
            batch,
        )
        .await?,
    })
}

/// Deletes the rows of `E` meeting `base` whose `at` is before `cutoff`, `batch` at a
/// time (each batch one unit). Returns how many went.
async fn prune<E>(
    state: &Shared,
    base: Condition,
    at: E::Column,
    cutoff: DateTime<Utc>,
    batch: u64,
) -> Result<u64, PruneError>
where
    E: EntityTrait,
    E::Model: Sync,
{
    let mut total = 0;
    loop {
        let old = base.clone().add(at.lt(cutoff));
        // The time of the batch-th oldest row bounds this batch (ties may add a few).
        let bound: Option<DateTime<Utc>> = E::find()
            .filter(old.clone())
            .select_only()
            .column(at)
            .order_by_asc(at)
            .offset(batch - 1)
            .limit(1)
            .into_tuple()
            .one(&state.db)
            .await?;
        let these = match bound {
            Some(bound) => old.add(at.lte(bound)),
            None => old,
        };
        let count = E::find().filter(these.clone()).count(&state.db).await?;
        if count == 0 {
            return Ok(total);
        }
        state
            .writer
            .write(WriteUnit::new().exec(
                E::delete_many().filter(these).into_query(),
                Expect::Any,
                "operational rows pruned",
            ))
            .await?;
        total += count;
        if bound.is_none() {
            return Ok(total);
        }
    }
}

/// Starts the background pruner: a run shortly after start, then one every
/// `retention.prune_interval` (read again after each run), until `stop`.
pub fn spawn(state: Weak<AppState>, stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut wait = std::time::Duration::from_secs(60);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            let Some(state) = state.upgrade() else { break };
            let now = state.clock.now();
            match run_once(&state, now).await {
                Ok(pruned) if pruned != Pruned::default() => tracing::info!(
                    timers = pruned.timers,
                    inbound_receipts = pruned.inbound_receipts,
                    parked_receipts = pruned.parked_receipts,
                    unmatched_inbound = pruned.unmatched_inbound,
                    "Old operational rows were pruned."
                ),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "Pruning old operational rows failed; the next run tries again.");
                }
            }
            wait = state.settings.load().retention.prune_interval;
        }
    })
}
