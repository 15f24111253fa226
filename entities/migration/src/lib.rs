//! caremsg's schema migrations, the same for SQLite and PostgreSQL.
//!
//! The daemon runs [`Migrator`] on start (and on `caremsgd migrate`):
//! `Migrator::up(&db, None)`. Applied migrations are recorded in `seaql_migrations`,
//! so running it again is a no-op. Each migration runs in one transaction on both
//! back ends. Migrations are history: a released one never changes.

pub use sea_orm_migration::prelude::*;

mod m20261126_000001_initial;
mod m20261205_000002_inbound_edges;
mod m20261205_000020_ha;
mod m20261205_000030_staff_list;

/// All of caremsg's migrations, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261126_000001_initial::Migration),
            Box::new(m20261205_000020_ha::Migration),
            Box::new(m20261205_000002_inbound_edges::Migration),
            Box::new(m20261205_000030_staff_list::Migration),
        ]
    }
}
