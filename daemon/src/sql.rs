//! Hand-written SQL for the few queries sea-query would only obscure (the staff
//! patient list, search), portable between SQLite and PostgreSQL.
//!
//! Queries are written with `?` placeholders; [`statement`] numbers them `$1, $2, …`
//! for PostgreSQL. The SQL text never contains a literal `?`.

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, QueryResult, Statement,
    TransactionTrait, Value,
};

/// A statement for `backend` from SQL written with `?` placeholders.
pub fn statement(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    let sql = match backend {
        DbBackend::Postgres => {
            let mut out = String::with_capacity(sql.len() + 16);
            let mut n = 0;
            for c in sql.chars() {
                if c == '?' {
                    n += 1;
                    out.push('$');
                    out.push_str(&n.to_string());
                } else {
                    out.push(c);
                }
            }
            out
        }
        _ => sql.to_owned(),
    };
    Statement::from_sql_and_values(backend, sql, values)
}

/// All rows of `statement`, which PostgreSQL plans once per connection rather than on
/// every execution.
///
/// PostgreSQL re-plans a prepared statement each time it is run for as long as it costs
/// the statement's generic plan above its custom ones. For a statement of many parts
/// whose plan does not hang on the values bound, that planning can cost more than the
/// run: the staff list's first page took 2.2 ms to plan and 1.5 ms to run (measured on
/// `bench clinic`'s database, a warm session), 4.4 ms in all against 1.45 ms planned
/// once. So on PostgreSQL the statement runs in a transaction of its own under
/// `SET LOCAL plan_cache_mode = force_generic_plan`, which ends with the transaction:
/// the connection goes back to the pool as it came. SQLite plans a cached statement
/// once anyway; there it runs as it is. Use it only for a statement whose plan is right
/// whatever is bound.
pub async fn query_all_planned_once(
    db: &DatabaseConnection,
    statement: Statement,
) -> Result<Vec<QueryResult>, DbErr> {
    if db.get_database_backend() != DbBackend::Postgres {
        return db.query_all_raw(statement).await;
    }
    let txn = db.begin().await?;
    txn.execute_unprepared("SET LOCAL plan_cache_mode = force_generic_plan")
        .await?;
    let rows = txn.query_all_raw(statement).await?;
    txn.commit().await?;
    Ok(rows)
}

/// `text` with the LIKE wildcards `%`, `_` and the escape `\` escaped (use with
/// `ESCAPE '\'`).
pub fn like_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statement runs with the generic plan forced on PostgreSQL, and the setting
    /// does not outlive it: the same (only) connection of the pool is back on the
    /// server's default afterwards. On SQLite the statement runs as it is.
    #[tokio::test]
    async fn planned_once_forces_the_generic_plan_for_its_statement_only() {
        #![allow(clippy::unwrap_used)] // Tests: a panic is a failed test.
        for (db, schema) in crate::db::test_databases("plan").await {
            let backend = db.get_database_backend();
            let sql = match backend {
                DbBackend::Postgres => "SELECT current_setting('plan_cache_mode') AS mode, ? AS n",
                _ => "SELECT 'sqlite' AS mode, ? AS n",
            };
            let rows = query_all_planned_once(&db, statement(backend, sql, vec![7_i64.into()]))
                .await
                .unwrap();
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].try_get::<i64>("", "n").unwrap(), 7);
            let mode: String = rows[0].try_get("", "mode").unwrap();
            let after: String = db
                .query_one_raw(statement(backend, sql, vec![8_i64.into()]))
                .await
                .unwrap()
                .unwrap()
                .try_get("", "mode")
                .unwrap();
            if backend == DbBackend::Postgres {
                assert_eq!(mode, "force_generic_plan");
                assert_eq!(after, "auto", "SET LOCAL ends with its transaction");
            } else {
                assert_eq!((mode.as_str(), after.as_str()), ("sqlite", "sqlite"));
            }
            crate::db::drop_test_database(&db, schema).await;
        }
    }

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        let s = statement(
            DbBackend::Postgres,
            "a = ? AND b = ?",
            vec![1.into(), 2.into()],
        );
        assert_eq!(s.sql, "a = $1 AND b = $2");
        let s = statement(
            DbBackend::Sqlite,
            "a = ? AND b = ?",
            vec![1.into(), 2.into()],
        );
        assert_eq!(s.sql, "a = ? AND b = ?");
    }

    #[test]
    fn like_wildcards_are_escaped() {
        assert_eq!(like_escape("a%b_c\\d"), "a\\%b\\_c\\\\d");
    }
}
