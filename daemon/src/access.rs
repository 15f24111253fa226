//! The access rule of SPEC.md: a user sees a patient only in the user's own practice,
//! and not when the patient is enrolled in programs and the user is restricted from
//! every one of them. A patient in no program is visible to the whole practice.
//!
//! [`ACCESSIBLE`] is the same rule as SQL, for lists and searches, so that the rule
//! has one statement in each language and a test holding them together.

use caremsg_entities::{patient, patient_program, practice, user, user_program_restriction};
use sea_orm::{ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter};

/// Why a staff user may not act on a patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Unknown, deleted, or of another practice: existence is not revealed.
    NotFound,
    /// Same practice, but the user is restricted from every program of the patient.
    Restricted,
}

/// SQL condition, true when the user bound to its one `?` may access patient `p`:
/// the patient has no program, or one the user is not restricted from.
pub const ACCESSIBLE: &str = "(NOT EXISTS (SELECT 1 FROM patient_programs pp WHERE pp.patient_id = p.id) \
     OR EXISTS (SELECT 1 FROM patient_programs pp WHERE pp.patient_id = p.id AND pp.program_id NOT IN \
       (SELECT r.program_id FROM user_program_restrictions r WHERE r.user_id = ?)))";

/// Whether `user_id` may access `patient_id` by programs (same practice assumed).
pub async fn may_access(
    db: &impl ConnectionTrait,
    user_id: &str,
    patient_id: &str,
) -> Result<bool, DbErr> {
    let programs: Vec<String> = patient_program::Entity::find()
        .filter(patient_program::Column::PatientId.eq(patient_id))
        .all(db)
        .await?
        .into_iter()
        .map(|p| p.program_id)
        .collect();
    if programs.is_empty() {
        return Ok(true);
    }
    let restricted: Vec<String> = user_program_restriction::Entity::find()
        .filter(user_program_restriction::Column::UserId.eq(user_id))
        .all(db)
        .await?
        .into_iter()
        .map(|r| r.program_id)
        .collect();
    Ok(programs.iter().any(|p| !restricted.contains(p)))
}

/// The active patient `patient_id` with its practice, if `user` may act on it.
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
    if !may_access(db, &user.id, patient_id).await? {
        return Ok(Err(Denied::Restricted));
    }
    Ok(Ok((patient, practice)))
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
