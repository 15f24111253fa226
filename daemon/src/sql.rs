//! Hand-written SQL for the few queries sea-query would only obscure (the staff
//! patient list, search), portable between SQLite and PostgreSQL.
//!
//! Queries are written with `?` placeholders; [`statement`] numbers them `$1, $2, …`
//! for PostgreSQL. The SQL text never contains a literal `?`.

use sea_orm::{DbBackend, Statement, Value};

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
