//! The access rule of SPEC.md: a user sees a patient only when the user is active, the
//! patient is active, both are of the same practice, that practice is active, and the
//! patient is in no program or in one the user is not restricted from. A patient in no
//! program is visible to the whole practice.
//!
//! The rule has one statement in Rust, [`decide`], and one in SQL, [`ACCESSIBLE`], for
//! lists, searches, notifications and event audiences; the tests at the bottom hold
//! the two together on the same cases. The staff check of one patient, [`patient_for`],
//! is one database statement: it reads the patient and its practice, computes the
//! program part of the rule with [`PROGRAMS_ALLOW`] (the same SQL text as in
//! [`ACCESSIBLE`]) and whether the user is on the patient's panel, and applies the rest
//! of [`decide`]'s rule to the row.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use caremsg_entities::{
    patient, patient_program, practice, practice_sms_number, user, user_program_restriction,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, FromQueryResult, IdenStatic, Iterable,
    QueryFilter, Value,
};

use crate::sql::statement;

/// Why a staff user may not act on a patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Unknown, deleted, of another practice, or of a deactivated practice (or the user
    /// is deactivated): existence is not revealed.
    NotFound,
    /// Same practice, but the user is restricted from every program of the patient.
    Restricted,
}

/// The program part of the rule in SQL, for patient `p` and the user whose id is
/// `$user` (a column, or `?`): the patient is in no program, or in one the user is not
/// restricted from. A macro so that [`ACCESSIBLE`] and [`PROGRAMS_ALLOW`] are one text.
macro_rules! programs_allow_sql {
    ($user:literal) => {
        concat!(
            "(NOT EXISTS (SELECT 1 FROM patient_programs acc_pp WHERE acc_pp.patient_id = p.id) \
           OR EXISTS (SELECT 1 FROM patient_programs acc_pp WHERE acc_pp.patient_id = p.id \
             AND acc_pp.program_id NOT IN (SELECT acc_r.program_id FROM user_program_restrictions acc_r \
               WHERE acc_r.user_id = ",
            $user,
            ")))"
        )
    };
}

/// The user's part of the rule in SQL, as a sub-query that has a row when the user
/// whose id is bound to its `?` is active, of practice `$practice` (a column, or `?`),
/// and that practice is active. A macro so that [`ACCESSIBLE`] and
/// [`ACCESSIBLE_IN_PRACTICE`] are one text.
macro_rules! active_user_sql {
    ($practice:literal) => {
        concat!(
            "SELECT 1 FROM users acc_u \
       JOIN practices acc_pr ON acc_pr.id = acc_u.practice_id \
       WHERE acc_u.id = ? AND acc_u.active = TRUE AND acc_pr.active = TRUE \
         AND acc_u.practice_id = ",
            $practice
        )
    };
}

/// SQL condition, true when the user whose id is bound to its one `?` may access
/// patient `p`: the whole rule of [`decide`] — user active, patient active, same
/// practice, that practice active, and the program rule. Its own aliases (`acc_*`)
/// never shadow the caller's, so the `?` may be replaced by a column of the outer
/// query (`u.id`, `ct.user_id`).
pub const ACCESSIBLE: &str = concat!(
    "(p.active = TRUE AND EXISTS (",
    active_user_sql!("p.practice_id"),
    " AND ",
    programs_allow_sql!("acc_u.id"),
    "))"
);

/// SQL condition, [`ACCESSIBLE`] for an acting user whose practice is known (the
/// user's own row): the same rule and the same texts, with the user's part compared
/// with a bound practice instead of the patient's, so that it does not refer to the
/// patient. The database then evaluates it once per statement, where [`ACCESSIBLE`]
/// looks the user and the practice up again for every patient row it tests (on the
/// staff list, a quarter of a page's lookups). Binds [`accessible_in_practice_values`].
pub const ACCESSIBLE_IN_PRACTICE: &str = concat!(
    "(p.active = TRUE AND p.practice_id = ? AND EXISTS (",
    active_user_sql!("?"),
    ") AND ",
    programs_allow_sql!("?"),
    ")"
);

/// The values [`ACCESSIBLE_IN_PRACTICE`] binds, in order, for `user`. Whatever
/// practice the caller read, the rule holds only if the user is still of it: the
/// patient and the user are both compared with the one value.
pub fn accessible_in_practice_values(user: &user::Model) -> [Value; 4] {
    [
        user.practice_id.clone().into(),
        user.id.clone().into(),
        user.practice_id.clone().into(),
        user.id.clone().into(),
    ]
}

/// SQL condition, the program part of [`ACCESSIBLE`] alone (the same text), for
/// patient `p` and the user whose id is bound to its one `?`: what [`patient_for`]
/// computes in its one statement, the rest of the rule being checked on the row.
pub const PROGRAMS_ALLOW: &str = programs_allow_sql!("?");

/// The access rule, in Rust: whether `user` may act on `patient` of `practice`, given
/// the patient's programs and the user's restrictions. [`ACCESSIBLE`] is the same rule.
pub fn decide(
    user: &user::Model,
    patient: &patient::Model,
    practice: &practice::Model,
    patient_programs: &[String],
    user_restrictions: &[String],
) -> Result<(), Denied> {
    decide_with(
        user,
        patient,
        practice,
        programs_allow(patient_programs, user_restrictions),
    )
}

/// [`decide`], with its program part already answered (`programs_allow`: by
/// [`PROGRAMS_ALLOW`] in [`patient_for`]'s statement).
fn decide_with(
    user: &user::Model,
    patient: &patient::Model,
    practice: &practice::Model,
    programs_allow: bool,
) -> Result<(), Denied> {
    if !user.active
        || !patient.active
        || !practice.active
        || patient.practice_id != practice.id
        || user.practice_id != practice.id
    {
        return Err(Denied::NotFound);
    }
    if programs_allow {
        Ok(())
    } else {
        Err(Denied::Restricted)
    }
}

/// The program part of the rule: no program, or one not restricted.
fn programs_allow(patient_programs: &[String], user_restrictions: &[String]) -> bool {
    patient_programs.is_empty()
        || patient_programs
            .iter()
            .any(|p| !user_restrictions.contains(p))
}

async fn patient_programs(
    db: &impl ConnectionTrait,
    patient_id: &str,
) -> Result<Vec<String>, DbErr> {
    Ok(patient_program::Entity::find()
        .filter(patient_program::Column::PatientId.eq(patient_id))
        .all(db)
        .await?
        .into_iter()
        .map(|p| p.program_id)
        .collect())
}

async fn restrictions(db: &impl ConnectionTrait, user_id: &str) -> Result<Vec<String>, DbErr> {
    Ok(user_program_restriction::Entity::find()
        .filter(user_program_restriction::Column::UserId.eq(user_id))
        .all(db)
        .await?
        .into_iter()
        .map(|r| r.program_id)
        .collect())
}

/// Whether `user_id` may access `patient_id` by programs (the rest of the rule is the
/// caller's: the Care Team panel lists only active users of the patient's practice).
pub async fn may_access(
    db: &impl ConnectionTrait,
    user_id: &str,
    patient_id: &str,
) -> Result<bool, DbErr> {
    let programs = patient_programs(db, patient_id).await?;
    if programs.is_empty() {
        return Ok(true);
    }
    Ok(programs_allow(&programs, &restrictions(db, user_id).await?))
}

/// What a staff user may act on: an active patient of the user's (active) practice,
/// and whether the user is in the patient's Care Team panel.
#[derive(Debug, Clone)]
pub struct Access {
    /// The patient.
    pub patient: patient::Model,
    /// Its practice (the user's).
    pub practice: practice::Model,
    /// The user has a `care_team_members` row for the patient (member or notification
    /// user), so is not asked "notify me?".
    pub on_panel: bool,
    /// The practice's sending number (its first by number), if it has one: what a
    /// staff message to the patient would be texted from.
    pub sms_from: Option<practice_sms_number::Model>,
}

/// The statement of [`patient_for`]; values: the user (program rule), the user (panel),
/// the patient, the user's practice.
static PATIENT_FOR_SQL: LazyLock<String> = LazyLock::new(|| {
    let mut columns: Vec<String> = patient::Column::iter()
        .map(|c| format!("p.{0} AS p_{0}", c.as_str()))
        .collect();
    columns.extend(practice::Column::iter().map(|c| format!("pr.{0} AS pr_{0}", c.as_str())));
    format!(
        "SELECT {}, \
           CASE WHEN {PROGRAMS_ALLOW} THEN 1 ELSE 0 END AS programs_allow, \
           CASE WHEN EXISTS (SELECT 1 FROM care_team_members ct \
              WHERE ct.patient_id = p.id AND ct.user_id = ?) THEN 1 ELSE 0 END AS on_panel, \
           n.number AS n_number, n.practice_id AS n_practice_id, n.gateway AS n_gateway \
         FROM patients p JOIN practices pr ON pr.id = p.practice_id \
         LEFT JOIN practice_sms_numbers n ON n.number = (SELECT MIN(n1.number) \
           FROM practice_sms_numbers n1 WHERE n1.practice_id = p.practice_id) \
         WHERE p.id = ? AND p.practice_id = ? AND p.active = TRUE AND pr.active = TRUE",
        columns.join(", ")
    )
});

/// The active patient `patient_id` with its (active) practice, if `user` may act on it,
/// and whether `user` is on its panel: one statement, the program part of the rule
/// ([`PROGRAMS_ALLOW`]) computed in it and the rest checked by [`decide`]'s rule.
pub async fn patient_for(
    db: &impl ConnectionTrait,
    user: &user::Model,
    patient_id: &str,
) -> Result<Result<Access, Denied>, DbErr> {
    let values: Vec<Value> = vec![
        user.id.clone().into(),
        user.id.clone().into(),
        patient_id.to_owned().into(),
        user.practice_id.clone().into(),
    ];
    let Some(row) = db
        .query_one_raw(statement(
            db.get_database_backend(),
            &PATIENT_FOR_SQL,
            values,
        ))
        .await?
    else {
        return Ok(Err(Denied::NotFound));
    };
    let patient = patient::Model::from_query_result(&row, "p_")?;
    let practice = practice::Model::from_query_result(&row, "pr_")?;
    let allow = row.try_get::<i32>("", "programs_allow")? != 0;
    let on_panel = row.try_get::<i32>("", "on_panel")? != 0;
    let sms_from = match row.try_get::<Option<String>>("", "n_number")? {
        Some(_) => Some(practice_sms_number::Model::from_query_result(&row, "n_")?),
        None => None,
    };
    Ok(
        decide_with(user, &patient, &practice, allow).map(|()| Access {
            patient,
            practice,
            on_panel,
            sms_from,
        }),
    )
}

/// The active patient `patient_id` of an active practice, for the portal backend
/// (which acts for one patient, whatever the practice).
pub async fn patient_for_portal(
    db: &impl ConnectionTrait,
    patient_id: &str,
) -> Result<Option<(patient::Model, practice::Model)>, DbErr> {
    active_patient(db, patient_id).await
}

/// The active patient `id` with its practice, if that is active too (one query).
pub(crate) async fn active_patient(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<Option<(patient::Model, practice::Model)>, DbErr> {
    Ok(patient::Entity::find_by_id(id.to_owned())
        .find_also_related(practice::Entity)
        .one(db)
        .await?
        .and_then(|(patient, practice)| Some((patient, practice?)))
        .filter(|(patient, practice)| patient.active && practice.active))
}

/// The acting users of recent staff requests, so that a staff request does not read
/// its user on every call (the `Staff` extractor).
///
/// **Invalidation.** Every admin request that may write forgets them all
/// ([`Users::forget_all`], from the admin routes' layer, once its handler has
/// finished — the handler runs in a task of its own, so a request the timeout cancels
/// still forgets only after its write committed or failed): users and practices
/// change only through the admin API. A reader takes the generation *before* it reads
/// the database and files what it read under that generation, so a read that raced
/// an admin commit is filed under the generation that the commit's `forget_all` then
/// retires. As a second guard, an entry is used at most [`USER_TTL`]. The same
/// generation ([`Users::generation`]) guards the patient rows a conversation actor
/// remembers. All of it lives and dies with the process; a standby serves no staff
/// request, and a daemon that steps down re-executes itself.
#[derive(Debug, Default)]
pub struct Users {
    generation: AtomicU64,
    entries: Mutex<HashMap<String, Remembered>>,
}

#[derive(Debug)]
struct Remembered {
    generation: u64,
    until: Instant,
    user: user::Model,
}

/// How long a remembered user is used at most (see [`Users`]).
pub const USER_TTL: Duration = Duration::from_secs(2);
/// At most this many users are remembered; past it, the expired ones are dropped, and
/// if none is, all of them.
const USERS_REMEMBERED: usize = 4096;

impl Users {
    /// [`active_user`], remembered: no read when this user was read under the current
    /// generation less than [`USER_TTL`] ago. Unknown and inactive users are not
    /// remembered (each such request reads again).
    pub async fn active(
        &self,
        db: &impl ConnectionTrait,
        id: &str,
    ) -> Result<Option<user::Model>, DbErr> {
        let generation = self.generation.load(Ordering::Acquire);
        let now = Instant::now();
        if let Some(found) = self.lock().get(id)
            && found.generation == generation
            && found.until > now
        {
            return Ok(Some(found.user.clone()));
        }
        let user = active_user(db, id).await?;
        if let Some(user) = &user {
            let mut entries = self.lock();
            if entries.len() >= USERS_REMEMBERED && !entries.contains_key(id) {
                entries.retain(|_, r| r.until > now);
                if entries.len() >= USERS_REMEMBERED {
                    entries.clear();
                }
            }
            entries.insert(
                id.to_owned(),
                Remembered {
                    generation,
                    until: now + USER_TTL,
                    user: user.clone(),
                },
            );
        }
        Ok(user)
    }

    /// The admin-write generation: it moves on after every admin request that may
    /// have written. Take it before reading admin-owned rows; what was read under an
    /// older one must not be used.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Forgets every remembered user: after any admin write.
    pub fn forget_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Remembered>> {
        // A panic while holding the lock leaves a map that is still whole.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The active user `id`, if the user's practice is active too (one query): a
/// deactivated practice's users are deactivated with it.
pub async fn active_user(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<Option<user::Model>, DbErr> {
    Ok(user::Entity::find_by_id(id.to_owned())
        .find_also_related(practice::Entity)
        .one(db)
        .await?
        .filter(|(user, practice)| user.active && practice.as_ref().is_some_and(|p| p.active))
        .map(|(user, _)| user))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use caremsg_entities::{SmsStatus, program};
    use chrono::{NaiveDate, Utc};
    use sea_orm::{ActiveModelTrait, IntoActiveModel, Value};

    use super::*;

    /// Two practices (`a` active, `x` deactivated), programs `p1`/`p2` in each; users
    /// and patients over every combination the rule distinguishes; the SQL form must
    /// agree with [`decide`] on every (user, patient) pair. SQLite, and PostgreSQL when
    /// `DATABASE_URL` names one (in a schema of its own, dropped after).
    #[tokio::test]
    async fn the_rust_and_sql_forms_agree() {
        for (db, schema) in crate::db::test_databases("acc").await {
            agree(&db).await;
            crate::db::drop_test_database(&db, schema).await;
        }
    }

    /// A remembered user is used without a read until the next admin write's
    /// `forget_all`; what was read before that is never used after it.
    #[tokio::test]
    async fn users_are_remembered_until_forgotten() {
        for (db, schema) in crate::db::test_databases("accu").await {
            let now = Utc::now();
            practice::Model {
                id: "a".into(),
                name: "a".into(),
                sms_enabled: true,
                portal_enabled: true,
                country: "US".into(),
                timezone: "UTC".into(),
                sign_outbound_sms: false,
                active: true,
                created_at: now,
                updated_at: now,
            }
            .into_active_model()
            .insert(&db)
            .await
            .unwrap();
            let user = user::Model {
                id: "u".into(),
                practice_id: "a".into(),
                name: "u".into(),
                email: None,
                active: true,
                created_at: now,
                updated_at: now,
            };
            user.clone().into_active_model().insert(&db).await.unwrap();
            let users = Users::default();
            assert!(users.active(&db, "u").await.unwrap().is_some());
            assert!(users.active(&db, "nobody").await.unwrap().is_none());
            // Deactivated behind the cache's back (as an admin write would, before
            // its forget): still remembered, so no read happened.
            let mut gone = user.into_active_model();
            gone.active = sea_orm::ActiveValue::Set(false);
            gone.update(&db).await.unwrap();
            assert!(users.active(&db, "u").await.unwrap().is_some());
            users.forget_all();
            assert!(users.active(&db, "u").await.unwrap().is_none());
            // Nothing inactive is remembered.
            assert!(users.lock().is_empty());
            crate::db::drop_test_database(&db, schema).await;
        }
    }

    async fn agree(db: &sea_orm::DatabaseConnection) {
        let now = Utc::now();
        let mut practices = Vec::new();
        for (id, active) in [("a", true), ("x", false)] {
            let row = practice::Model {
                id: id.into(),
                name: id.into(),
                sms_enabled: true,
                portal_enabled: true,
                country: "US".into(),
                timezone: "UTC".into(),
                sign_outbound_sms: false,
                active,
                created_at: now,
                updated_at: now,
            };
            row.clone().into_active_model().insert(db).await.unwrap();
            practices.push(row);
            for p in ["p1", "p2"] {
                program::Model {
                    id: format!("{id}{p}"),
                    practice_id: id.into(),
                    name: p.into(),
                    active: true,
                    created_at: now,
                    updated_at: now,
                }
                .into_active_model()
                .insert(db)
                .await
                .unwrap();
            }
        }
        let restriction_sets: [&[&str]; 4] = [&[], &["p1"], &["p2"], &["p1", "p2"]];
        let program_sets: [&[&str]; 4] = [&[], &["p1"], &["p1", "p2"], &["p2"]];
        let mut users = Vec::new();
        let mut patients = Vec::new();
        for practice in &practices {
            for active in [true, false] {
                for (i, set) in restriction_sets.iter().enumerate() {
                    let user = user::Model {
                        id: format!("u-{}-{active}-{i}", practice.id),
                        practice_id: practice.id.clone(),
                        name: "u".into(),
                        email: None,
                        active,
                        created_at: now,
                        updated_at: now,
                    };
                    user.clone().into_active_model().insert(db).await.unwrap();
                    let set: Vec<String> =
                        set.iter().map(|p| format!("{}{p}", practice.id)).collect();
                    for program_id in &set {
                        user_program_restriction::Model {
                            user_id: user.id.clone(),
                            program_id: program_id.clone(),
                        }
                        .into_active_model()
                        .insert(db)
                        .await
                        .unwrap();
                    }
                    users.push((user, set));
                }
                for (i, set) in program_sets.iter().enumerate() {
                    let patient = patient::Model {
                        id: format!("p-{}-{active}-{i}", practice.id),
                        practice_id: practice.id.clone(),
                        first_name: "f".into(),
                        last_name: "l".into(),
                        search_name: "f l".into(),
                        date_of_birth: NaiveDate::from_ymd_opt(1950, 1, 1).unwrap(),
                        mobile_phone: None,
                        portal_enrolled: false,
                        sms_status: SmsStatus::None,
                        sms_status_reason: None,
                        last_activity_at: None,
                        active,
                        created_at: now,
                        updated_at: now,
                    };
                    patient
                        .clone()
                        .into_active_model()
                        .insert(db)
                        .await
                        .unwrap();
                    let set: Vec<String> =
                        set.iter().map(|p| format!("{}{p}", practice.id)).collect();
                    for program_id in &set {
                        patient_program::Model {
                            patient_id: patient.id.clone(),
                            program_id: program_id.clone(),
                        }
                        .into_active_model()
                        .insert(db)
                        .await
                        .unwrap();
                    }
                    patients.push((patient, practice.clone(), set));
                }
            }
        }
        let sql = format!("SELECT p.id FROM patients p WHERE {ACCESSIBLE} ORDER BY p.id");
        let in_practice_sql =
            format!("SELECT p.id FROM patients p WHERE {ACCESSIBLE_IN_PRACTICE} ORDER BY p.id");
        let programs_sql = format!(
            "SELECT p.id, CASE WHEN {PROGRAMS_ALLOW} THEN 1 ELSE 0 END AS allow \
             FROM patients p ORDER BY p.id"
        );
        let mut allowed_somewhere = 0;
        for (user, restricted) in &users {
            // The program part alone, as patient_for computes it, on every patient.
            let rows = db
                .query_all_raw(crate::sql::statement(
                    db.get_database_backend(),
                    &programs_sql,
                    vec![Value::from(user.id.clone())],
                ))
                .await
                .unwrap();
            for row in &rows {
                let id: String = row.try_get("", "id").unwrap();
                let by_sql = row.try_get::<i32>("", "allow").unwrap() != 0;
                let (_, _, programs) = patients.iter().find(|(p, _, _)| p.id == id).unwrap();
                assert_eq!(
                    by_sql,
                    programs_allow(programs, restricted),
                    "user {} patient {id}",
                    user.id
                );
            }
            assert_eq!(rows.len(), patients.len());
            let rows = db
                .query_all_raw(crate::sql::statement(
                    db.get_database_backend(),
                    &sql,
                    vec![Value::from(user.id.clone())],
                ))
                .await
                .unwrap();
            let by_sql: Vec<String> = rows.iter().map(|r| r.try_get("", "id").unwrap()).collect();
            let mut by_rust: Vec<String> = patients
                .iter()
                .filter(|(patient, practice, programs)| {
                    decide(user, patient, practice, programs, restricted).is_ok()
                })
                .map(|(patient, _, _)| patient.id.clone())
                .collect();
            by_rust.sort();
            assert_eq!(by_sql, by_rust, "user {}", user.id);
            // The form for a user whose practice is known agrees as well.
            let rows = db
                .query_all_raw(crate::sql::statement(
                    db.get_database_backend(),
                    &in_practice_sql,
                    accessible_in_practice_values(user).to_vec(),
                ))
                .await
                .unwrap();
            let in_practice: Vec<String> =
                rows.iter().map(|r| r.try_get("", "id").unwrap()).collect();
            assert_eq!(in_practice, by_rust, "user {} (in practice)", user.id);
            allowed_somewhere += by_sql.len();
            // The loader agrees too, for every patient.
            for (patient, practice, programs) in &patients {
                let loaded = patient_for(db, user, &patient.id)
                    .await
                    .unwrap()
                    .map(|_| ());
                let decided = if patient.practice_id == user.practice_id && practice.active {
                    decide(user, patient, practice, programs, restricted)
                } else {
                    Err(Denied::NotFound)
                };
                assert_eq!(loaded, decided, "user {} patient {}", user.id, patient.id);
            }
        }
        // The matrix is not vacuous: some pairs are allowed, some restricted.
        assert!(allowed_somewhere > 0);
        assert!(users.iter().any(|(user, restricted)| {
            patients.iter().any(|(patient, practice, programs)| {
                decide(user, patient, practice, programs, restricted) == Err(Denied::Restricted)
            })
        }));
    }

    #[test]
    fn the_sql_form_binds_one_user() {
        assert_eq!(ACCESSIBLE.matches('?').count(), 1);
        assert_eq!(PROGRAMS_ALLOW.matches('?').count(), 1);
        // The program part is the text of ACCESSIBLE's, with its user bound.
        assert!(ACCESSIBLE.contains(&PROGRAMS_ALLOW.replacen('?', "acc_u.id", 1)));
        let values = accessible_in_practice_values(&user::Model {
            id: "u".into(),
            practice_id: "pr".into(),
            name: "u".into(),
            email: None,
            active: true,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        });
        assert_eq!(ACCESSIBLE_IN_PRACTICE.matches('?').count(), values.len());
        assert!(ACCESSIBLE_IN_PRACTICE.ends_with(&format!("{PROGRAMS_ALLOW})")));
        // The user's part is one text in both forms.
        assert!(ACCESSIBLE.contains(active_user_sql!("p.practice_id")));
        assert!(ACCESSIBLE_IN_PRACTICE.contains(active_user_sql!("?")));
        assert_eq!(PATIENT_FOR_SQL.matches('?').count(), 4);
    }

    /// One `patient_for` is one statement, whatever its outcome, on SQLite and on
    /// PostgreSQL when `DATABASE_URL` names one: allowed (on the panel as member or
    /// notification user, or not), restricted (403), and every 404 — unknown patient,
    /// inactive patient, another practice, a deactivated practice, a deactivated user.
    #[tokio::test]
    async fn one_patient_check_is_one_statement() {
        for (mut db, schema) in crate::db::test_databases("acc1").await {
            let statements = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counter = statements.clone();
            db.set_metric_callback(move |_| {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
            let (u, ux, v) = one_statement_fixture(&db).await;
            let cases: [(&user::Model, &str, Result<bool, Denied>); 10] = [
                (&u, "free-member", Ok(true)),
                (&u, "free-none", Ok(false)),
                (&u, "p1p2-notified", Ok(true)),
                (&u, "p2-none", Ok(false)),
                (&u, "p1-member", Err(Denied::Restricted)),
                (&u, "inactive", Err(Denied::NotFound)),
                (&u, "unknown", Err(Denied::NotFound)),
                (&u, "other-practice", Err(Denied::NotFound)),
                (&ux, "closed-practice", Err(Denied::NotFound)),
                (&v, "free-member", Err(Denied::NotFound)),
            ];
            for (user, patient_id, expected) in cases {
                let before = statements.load(std::sync::atomic::Ordering::SeqCst);
                let access = patient_for(&db, user, patient_id).await.unwrap();
                let ran = statements.load(std::sync::atomic::Ordering::SeqCst) - before;
                assert_eq!(
                    ran, 1,
                    "statements for user {} patient {patient_id}",
                    user.id
                );
                let got = access.map(|a| {
                    assert_eq!(a.patient.id, patient_id);
                    assert_eq!(a.practice.id, user.practice_id);
                    assert!(a.patient.active && a.practice.active);
                    a.on_panel
                });
                assert_eq!(got, expected, "user {} patient {patient_id}", user.id);
            }
            // The whole model comes back, as the entity reads it.
            let read = patient_for(&db, &u, "p1p2-notified")
                .await
                .unwrap()
                .unwrap();
            let stored = patient::Entity::find_by_id("p1p2-notified".to_owned())
                .one(&db)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(read.patient, stored);
            let stored = practice::Entity::find_by_id("a".to_owned())
                .one(&db)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(read.practice, stored);
            crate::db::drop_test_database(&db, schema).await;
        }
    }

    /// Practices `a` and `b` (active) and `x` (deactivated); in `a`, user `u`
    /// restricted from program `a1` and deactivated user `v`; in `x`, user `ux`.
    /// Patients (all in `a` unless named otherwise): `free-member` (no program, `u` on
    /// the care team), `free-none` (no program, no panel), `p1p2-notified` (programs
    /// `a1`, `a2`; `u` a notification user), `p2-none` (`a2`), `p1-member` (`a1`, `u`
    /// on the care team), `inactive` (deactivated, `u` on the care team),
    /// `other-practice` (in `b`), `closed-practice` (in `x`, `ux` on the care team).
    async fn one_statement_fixture(
        db: &sea_orm::DatabaseConnection,
    ) -> (user::Model, user::Model, user::Model) {
        use caremsg_entities::{CareTeamRole, care_team_member};
        let now = Utc::now();
        for (id, active) in [("a", true), ("b", true), ("x", false)] {
            practice::Model {
                id: id.into(),
                name: id.into(),
                sms_enabled: true,
                portal_enabled: true,
                country: "US".into(),
                timezone: "UTC".into(),
                sign_outbound_sms: false,
                active,
                created_at: now,
                updated_at: now,
            }
            .into_active_model()
            .insert(db)
            .await
            .unwrap();
        }
        for id in ["a1", "a2"] {
            program::Model {
                id: id.into(),
                practice_id: "a".into(),
                name: id.into(),
                active: true,
                created_at: now,
                updated_at: now,
            }
            .into_active_model()
            .insert(db)
            .await
            .unwrap();
        }
        let user = |id: &str, practice: &str, active: bool| user::Model {
            id: id.into(),
            practice_id: practice.into(),
            name: id.into(),
            email: None,
            active,
            created_at: now,
            updated_at: now,
        };
        let (u, v, ux) = (
            user("u", "a", true),
            user("v", "a", false),
            user("ux", "x", true),
        );
        for user in [&u, &v, &ux] {
            user.clone().into_active_model().insert(db).await.unwrap();
        }
        user_program_restriction::Model {
            user_id: "u".into(),
            program_id: "a1".into(),
        }
        .into_active_model()
        .insert(db)
        .await
        .unwrap();
        // (id, practice, active, programs, care-team row of)
        type Row<'a> = (
            &'a str,
            &'a str,
            bool,
            &'a [&'a str],
            Option<(&'a str, CareTeamRole)>,
        );
        let patients: [Row; 8] = [
            (
                "free-member",
                "a",
                true,
                &[],
                Some(("u", CareTeamRole::Member)),
            ),
            ("free-none", "a", true, &[], None),
            (
                "p1p2-notified",
                "a",
                true,
                &["a1", "a2"],
                Some(("u", CareTeamRole::NotificationUser)),
            ),
            ("p2-none", "a", true, &["a2"], None),
            (
                "p1-member",
                "a",
                true,
                &["a1"],
                Some(("u", CareTeamRole::Member)),
            ),
            (
                "inactive",
                "a",
                false,
                &[],
                Some(("u", CareTeamRole::Member)),
            ),
            ("other-practice", "b", true, &[], None),
            (
                "closed-practice",
                "x",
                true,
                &[],
                Some(("ux", CareTeamRole::Member)),
            ),
        ];
        for (id, practice, active, programs, member) in patients {
            patient::Model {
                id: id.into(),
                practice_id: practice.into(),
                first_name: "f".into(),
                last_name: "l".into(),
                search_name: "f l".into(),
                date_of_birth: NaiveDate::from_ymd_opt(1950, 1, 1).unwrap(),
                mobile_phone: Some("+15555550100".into()),
                portal_enrolled: true,
                sms_status: SmsStatus::None,
                sms_status_reason: None,
                last_activity_at: Some(now),
                active,
                created_at: now,
                updated_at: now,
            }
            .into_active_model()
            .insert(db)
            .await
            .unwrap();
            for program_id in programs {
                patient_program::Model {
                    patient_id: id.into(),
                    program_id: (*program_id).into(),
                }
                .into_active_model()
                .insert(db)
                .await
                .unwrap();
            }
            if let Some((user_id, role)) = member {
                care_team_member::Model {
                    patient_id: id.into(),
                    user_id: user_id.into(),
                    role,
                    created_at: now,
                }
                .into_active_model()
                .insert(db)
                .await
                .unwrap();
            }
        }
        (u, ux, v)
    }
}
