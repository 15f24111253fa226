//! The entities under their table-derived type names, and the enums, for `use caremsg_entities::prelude::*`.

pub use crate::enums::{
    CareTeamRole, Channel, DeliveryChannel, DeliveryPurpose, DeliveryStatus, Direction,
    NotificationKind, SmsAuthStatus, SmsStatus, SmsStatusReason, TimerKind,
};

pub use crate::audit_log::Entity as AuditLog;
pub use crate::care_team_member::Entity as CareTeamMember;
pub use crate::conversation::Entity as Conversation;
pub use crate::delivery::Entity as Delivery;
pub use crate::inbound_receipt::Entity as InboundReceipt;
pub use crate::message::Entity as Message;
pub use crate::notification::Entity as Notification;
pub use crate::notification_settings::Entity as NotificationSettings;
pub use crate::patient::Entity as Patient;
pub use crate::patient_program::Entity as PatientProgram;
pub use crate::practice::Entity as Practice;
pub use crate::practice_sms_number::Entity as PracticeSmsNumber;
pub use crate::program::Entity as Program;
pub use crate::read_marker::Entity as ReadMarker;
pub use crate::sms_auth_attempt::Entity as SmsAuthAttempt;
pub use crate::sms_auth_session::Entity as SmsAuthSession;
pub use crate::sms_consent::Entity as SmsConsent;
pub use crate::sms_status_history::Entity as SmsStatusHistory;
pub use crate::timer::Entity as Timer;
pub use crate::unmatched_inbound::Entity as UnmatchedInbound;
pub use crate::user::Entity as User;
pub use crate::user_program_restriction::Entity as UserProgramRestriction;
