//! High availability (issue #17): the lease row that names the active daemon and its
//! fencing epoch, and the epoch that claimed each delivery.
//!
//! `ha_lease` has one row per lock key (one key, `all`, today; a later sharding step
//! keys it by a set of practices). Only the daemon's HA elector writes it, on its own
//! connection; every write batch of the active daemon reads it (`FOR SHARE`) to check
//! that its epoch is still the newest. `deliveries.claim_epoch` is the epoch of the
//! daemon that claimed the row (NULL in single mode), so a new active reconciles only
//! the rows claimed under older epochs.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(HaLease::Table)
                    .col(string(HaLease::Key).primary_key())
                    .col(string(HaLease::Holder))
                    .col(big_integer(HaLease::BackendPid))
                    .col(big_integer(HaLease::Epoch))
                    .col(timestamp_with_time_zone(HaLease::ExpiresAt))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Deliveries::Table)
                    .add_column(big_integer_null(Deliveries::ClaimEpoch))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Deliveries::Table)
                    .drop_column(Deliveries::ClaimEpoch)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(HaLease::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum HaLease {
    Table,
    Key,
    Holder,
    BackendPid,
    Epoch,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum Deliveries {
    Table,
    ClaimEpoch,
}
