//! The access rule of SPEC.md: a user sees a patient only when the user is active, the
//! patient is active, both are of the same practice, that practice is active, and the
//! patient is in no program or in one the user is not restricted from. A patient in no
//! program is visible to the whole practice.
//!
//! The rule has one statement in Rust, [`decide`], and one in SQL, [`ACCESSIBLE`], for
//! lists, searches, notifications and event audiences; the tests at the bottom hold
//! the two together on the same cases.

use caremsg_entities::{patient, patient_program, practice, user, user_program_restriction};
use sea_orm::{ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter};

/// Why a staff user may not act on a patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Unknown, deleted, of another practice, or of a deactivated practice (or the user
    /// is deactivated): existence is not revealed.
    NotFound,
    /// Same practice, but the user is restricted from every program of the patient.
    Restricted,
}

/// SQL condition, true when the user whose id is bound to its one `?` may access
/// patient `p`: the whole rule of [`decide`] — user active, patient active, same
/// practice, that practice active, and the program rule. Its own aliases (`acc_*`)
/// never shadow the caller's, so the `?` may be replaced by a column of the outer
/// query (`u.id`, `ct.user_id`).
pub const ACCESSIBLE: &str = "(p.active = TRUE AND EXISTS (SELECT 1 FROM users acc_u \
       JOIN practices acc_pr ON acc_pr.id = acc_u.practice_id \
       WHERE acc_u.id = ? AND acc_u.active = TRUE AND acc_pr.active = TRUE \
         AND acc_u.practice_id = p.practice_id \
         AND (NOT EXISTS (SELECT 1 FROM patient_programs acc_pp WHERE acc_pp.patient_id = p.id) \
           OR EXISTS (SELECT 1 FROM patient_programs acc_pp WHERE acc_pp.patient_id = p.id \
             AND acc_pp.program_id NOT IN (SELECT acc_r.program_id FROM user_program_restrictions acc_r \
               WHERE acc_r.user_id = acc_u.id)))))";

/// The access rule, in Rust: whether `user` may act on `patient` of `practice`, given
/// the patient's programs and the user's restrictions. [`ACCESSIBLE`] is the same rule.
pub fn decide(
    user: &user::Model,
    patient: &patient::Model,
    practice: &practice::Model,
    patient_programs: &[String],
    user_restrictions: &[String],
) -> Result<(), Denied> {
    if !user.active
        || !patient.active
        || !practice.active
        || patient.practice_id != practice.id
        || user.practice_id != practice.id
    {
        return Err(Denied::NotFound);
    }
    if programs_allow(patient_programs, user_restrictions) {
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

/// The active patient `patient_id` with its (active) practice, if `user` may act on it.
pub async fn patient_for(
    db: &impl ConnectionTrait,
    user: &user::Model,
    patient_id: &str,
) -> Result<Result<(patient::Model, practice::Model), Denied>, DbErr> {
    let Some((patient, practice)) = active_patient(db, patient_id).await? else {
        return Ok(Err(Denied::NotFound));
    };
    if patient.practice_id != user.practice_id {
        return Ok(Err(Denied::NotFound));
    }
    let programs = patient_programs(db, patient_id).await?;
    let restricted = if programs.is_empty() {
        Vec::new()
    } else {
        restrictions(db, &user.id).await?
    };
    Ok(decide(user, &patient, &practice, &programs, &restricted).map(|()| (patient, practice)))
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
        let mut allowed_somewhere = 0;
        for (user, restricted) in &users {
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
    }
}
