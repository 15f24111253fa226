//! One user's notification settings as rules: the three switches and their channels,
//! the defaults a missing row stands for, the merge a `PUT` applies (with the
//! dependency of the Unread Message Reminder on New Patient Message), and which
//! channels a notification really goes out on.
//!
//! **Defaults** (what a clinic expects, and what admin user sync stores): New Patient
//! Message on, Unread Message Reminder off, Two-Way Texting off; every setting's
//! channels `in_app` only.
//!
//! **Email that cannot be sent is in-app instead**: a setting whose channels name
//! email, for a user with no email address or a daemon with no email gateway, is
//! delivered in-app, and [`email_unavailable`] says why.

use caremsg_entities::{NotificationKind, notification_settings};
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;

/// A notification setting (also the key of its channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Setting {
    /// New Patient Message.
    NewPatientMessage,
    /// Unread Message Reminder.
    UnreadReminder,
    /// Two-Way Texting (SMS authentication status changes).
    TwoWayTexting,
}

impl Setting {
    /// Every setting, in API order.
    pub const ALL: [Setting; 3] = [
        Setting::NewPatientMessage,
        Setting::UnreadReminder,
        Setting::TwoWayTexting,
    ];

    /// The setting's name in the API and in `channels`.
    pub fn name(self) -> &'static str {
        match self {
            Setting::NewPatientMessage => "new_patient_message",
            Setting::UnreadReminder => "unread_reminder",
            Setting::TwoWayTexting => "two_way_texting",
        }
    }

    /// The kind of notification the setting sends.
    pub fn kind(self) -> NotificationKind {
        match self {
            Setting::NewPatientMessage => NotificationKind::NewPatientMessage,
            Setting::UnreadReminder => NotificationKind::UnreadReminder,
            Setting::TwoWayTexting => NotificationKind::SmsStatus,
        }
    }

    fn index(self) -> usize {
        match self {
            Setting::NewPatientMessage => 0,
            Setting::UnreadReminder => 1,
            Setting::TwoWayTexting => 2,
        }
    }
}

/// The channels one setting delivers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channels {
    /// Stored, listable, pushed on the staff event stream.
    pub in_app: bool,
    /// An email through the notifications' email gateway.
    pub email: bool,
}

impl Channels {
    /// In-app only: the default of every setting.
    pub const IN_APP: Channels = Channels {
        in_app: true,
        email: false,
    };

    /// Whether no channel is chosen.
    pub fn is_empty(self) -> bool {
        !self.in_app && !self.email
    }
}

/// A user's notification settings, whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefs {
    /// New Patient Message.
    pub new_patient_message: bool,
    /// Unread Message Reminder (only while New Patient Message is on).
    pub unread_reminder: bool,
    /// Two-Way Texting.
    pub two_way_texting: bool,
    // Per setting, in `Setting::index` order.
    channels: [Channels; 3],
}

impl Default for Prefs {
    fn default() -> Self {
        Self {
            new_patient_message: true,
            unread_reminder: false,
            two_way_texting: false,
            channels: [Channels::IN_APP; 3],
        }
    }
}

impl Prefs {
    /// The settings a row holds; no row means the defaults.
    pub fn from_row(row: Option<&notification_settings::Model>) -> Self {
        let Some(row) = row else {
            return Self::default();
        };
        Self {
            new_patient_message: row.new_patient_message,
            unread_reminder: row.unread_reminder,
            two_way_texting: row.two_way_texting,
            channels: [
                Channels {
                    in_app: row.new_patient_message_in_app,
                    email: row.new_patient_message_email,
                },
                Channels {
                    in_app: row.unread_reminder_in_app,
                    email: row.unread_reminder_email,
                },
                Channels {
                    in_app: row.two_way_texting_in_app,
                    email: row.two_way_texting_email,
                },
            ],
        }
    }

    /// The settings from a query's columns, in the order of [`COLUMNS`]; `None`
    /// everywhere (no row in a `LEFT JOIN`) means the defaults.
    pub fn from_columns(values: [Option<bool>; 9]) -> Self {
        if values.iter().all(Option::is_none) {
            return Self::default();
        }
        let d = Self::default();
        let v = |i: usize, default: bool| values[i].unwrap_or(default);
        Self {
            new_patient_message: v(0, d.new_patient_message),
            unread_reminder: v(1, d.unread_reminder),
            two_way_texting: v(2, d.two_way_texting),
            channels: [
                Channels {
                    in_app: v(3, true),
                    email: v(4, false),
                },
                Channels {
                    in_app: v(5, true),
                    email: v(6, false),
                },
                Channels {
                    in_app: v(7, true),
                    email: v(8, false),
                },
            ],
        }
    }

    /// Whether `setting` is on.
    pub fn is_on(&self, setting: Setting) -> bool {
        match setting {
            Setting::NewPatientMessage => self.new_patient_message,
            // The dependency holds even for a row written around the API.
            Setting::UnreadReminder => self.unread_reminder && self.new_patient_message,
            Setting::TwoWayTexting => self.two_way_texting,
        }
    }

    /// The channels of `setting`.
    pub fn channels(&self, setting: Setting) -> Channels {
        self.channels[setting.index()]
    }

    /// The row that stores these settings for `user_id`.
    pub fn to_row(&self, user_id: &str, now: DateTime<Utc>) -> notification_settings::ActiveModel {
        let [npm, ur, twt] = self.channels;
        notification_settings::ActiveModel {
            user_id: Set(user_id.to_owned()),
            new_patient_message: Set(self.new_patient_message),
            unread_reminder: Set(self.unread_reminder),
            two_way_texting: Set(self.two_way_texting),
            new_patient_message_in_app: Set(npm.in_app),
            new_patient_message_email: Set(npm.email),
            unread_reminder_in_app: Set(ur.in_app),
            unread_reminder_email: Set(ur.email),
            two_way_texting_in_app: Set(twt.in_app),
            two_way_texting_email: Set(twt.email),
            updated_at: Set(now),
        }
    }
}

/// The settings columns of `notification_settings` (alias `s`), in the order
/// [`Prefs::from_columns`] takes them.
pub const COLUMNS: [&str; 9] = [
    "new_patient_message",
    "unread_reminder",
    "two_way_texting",
    "new_patient_message_in_app",
    "new_patient_message_email",
    "unread_reminder_in_app",
    "unread_reminder_email",
    "two_way_texting_in_app",
    "two_way_texting_email",
];

/// What a `PUT` asks to change; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// New Patient Message.
    pub new_patient_message: Option<bool>,
    /// Unread Message Reminder.
    pub unread_reminder: Option<bool>,
    /// Two-Way Texting.
    pub two_way_texting: Option<bool>,
    /// Channels, per setting; a given setting's list replaces its channels.
    pub channels: Vec<(Setting, Channels)>,
}

/// Why a change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The Unread Message Reminder was asked for while New Patient Message is off.
    #[error("the Unread Message Reminder can be on only while New Patient Message is on")]
    ReminderWithoutNewPatientMessage,
    /// A setting was given no channel at all.
    #[error("{} needs at least one channel; turn the setting off instead", .0.name())]
    NoChannel(Setting),
}

/// `current` with `change` merged in: fields not given keep their value; turning New
/// Patient Message off turns the reminder off; asking for the reminder while New
/// Patient Message ends up off is refused.
pub fn apply(current: Prefs, change: &Change) -> Result<Prefs, SettingsError> {
    let mut next = current;
    if let Some(on) = change.new_patient_message {
        next.new_patient_message = on;
    }
    if let Some(on) = change.two_way_texting {
        next.two_way_texting = on;
    }
    match change.unread_reminder {
        Some(true) if !next.new_patient_message => {
            return Err(SettingsError::ReminderWithoutNewPatientMessage);
        }
        Some(on) => next.unread_reminder = on,
        None => {}
    }
    if !next.new_patient_message {
        next.unread_reminder = false;
    }
    for (setting, channels) in &change.channels {
        if channels.is_empty() {
            return Err(SettingsError::NoChannel(*setting));
        }
        next.channels[setting.index()] = *channels;
    }
    Ok(next)
}

/// Why email cannot reach a user, if it cannot: the daemon has no email gateway for
/// notifications (checked first: an address would not help), or the user has no
/// email address.
pub fn email_unavailable(
    email: Option<&str>,
    settings: &caremsg_config::Notifications,
) -> Option<&'static str> {
    if settings.email_gateway.is_none() {
        Some("no email gateway configured")
    } else if email.is_none_or(|e| e.trim().is_empty()) {
        Some("no email address")
    } else {
        None
    }
}

/// Where one notification goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Shown in-app: listed as unread and pushed live.
    pub in_app: bool,
    /// Emailed: the gateway instance and the address.
    pub email: Option<(String, String)>,
}

/// Where a notification of `setting` goes for a user with `prefs` and `email`:
/// email when chosen and possible, in-app when chosen — or when email was chosen and
/// is not possible.
pub fn route(
    prefs: &Prefs,
    setting: Setting,
    email: Option<&str>,
    settings: &caremsg_config::Notifications,
) -> Route {
    let chosen = prefs.channels(setting);
    let email = match (chosen.email, email_unavailable(email, settings)) {
        (true, None) => settings
            .email_gateway
            .clone()
            .zip(email.map(|e| e.trim().to_owned())),
        _ => None,
    };
    Route {
        in_app: chosen.in_app || email.is_none(),
        email,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn change(npm: Option<bool>, ur: Option<bool>) -> Change {
        Change {
            new_patient_message: npm,
            unread_reminder: ur,
            ..Change::default()
        }
    }

    /// `(npm, ur)` before, the change, and `(npm, ur)` after or the error.
    fn check(
        before: (bool, bool),
        ask: (Option<bool>, Option<bool>),
        expected: Result<(bool, bool), SettingsError>,
    ) {
        let current = Prefs {
            new_patient_message: before.0,
            unread_reminder: before.1,
            ..Prefs::default()
        };
        let got = apply(current, &change(ask.0, ask.1))
            .map(|p| (p.new_patient_message, p.unread_reminder));
        assert_eq!(got, expected, "{before:?} + {ask:?}");
    }

    #[test]
    fn the_reminder_depends_on_new_patient_message() {
        use SettingsError::ReminderWithoutNewPatientMessage as Refused;
        check((true, false), (None, Some(true)), Ok((true, true)));
        check((false, false), (None, Some(true)), Err(Refused));
        check((true, false), (Some(false), Some(true)), Err(Refused));
        check((false, false), (Some(true), Some(true)), Ok((true, true)));
        check((true, true), (Some(false), None), Ok((false, false)));
        check((true, true), (Some(false), Some(false)), Ok((false, false)));
        check((true, true), (None, None), Ok((true, true)));
        check((true, true), (None, Some(false)), Ok((true, false)));
    }

    #[test]
    fn channels_merge_per_setting_and_may_not_be_empty() {
        let email_only = Channels {
            in_app: false,
            email: true,
        };
        let next = apply(
            Prefs::default(),
            &Change {
                channels: vec![(Setting::UnreadReminder, email_only)],
                ..Change::default()
            },
        )
        .unwrap();
        assert_eq!(next.channels(Setting::UnreadReminder), email_only);
        assert_eq!(next.channels(Setting::NewPatientMessage), Channels::IN_APP);
        let empty = Channels {
            in_app: false,
            email: false,
        };
        assert_eq!(
            apply(
                Prefs::default(),
                &Change {
                    channels: vec![(Setting::TwoWayTexting, empty)],
                    ..Change::default()
                }
            ),
            Err(SettingsError::NoChannel(Setting::TwoWayTexting))
        );
    }

    #[test]
    fn rows_and_columns_round_trip_and_default() {
        assert_eq!(Prefs::from_row(None), Prefs::default());
        assert_eq!(Prefs::from_columns([None; 9]), Prefs::default());
        let prefs = apply(
            Prefs::default(),
            &Change {
                unread_reminder: Some(true),
                two_way_texting: Some(true),
                channels: vec![(
                    Setting::TwoWayTexting,
                    Channels {
                        in_app: true,
                        email: true,
                    },
                )],
                ..Change::default()
            },
        )
        .unwrap();
        let row = prefs.to_row("u1", Utc::now());
        let columns = [
            row.new_patient_message.unwrap(),
            row.unread_reminder.unwrap(),
            row.two_way_texting.unwrap(),
            row.new_patient_message_in_app.unwrap(),
            row.new_patient_message_email.unwrap(),
            row.unread_reminder_in_app.unwrap(),
            row.unread_reminder_email.unwrap(),
            row.two_way_texting_in_app.unwrap(),
            row.two_way_texting_email.unwrap(),
        ];
        assert_eq!(Prefs::from_columns(columns.map(Some)), prefs);
    }

    #[test]
    fn email_falls_back_to_in_app_when_it_cannot_be_sent() {
        let prefs = apply(
            Prefs::default(),
            &Change {
                channels: vec![(
                    Setting::NewPatientMessage,
                    Channels {
                        in_app: false,
                        email: true,
                    },
                )],
                ..Change::default()
            },
        )
        .unwrap();
        let mut settings = caremsg_config::Notifications::default();
        let s = Setting::NewPatientMessage;
        assert_eq!(
            route(&prefs, s, Some("a@b.example"), &settings),
            Route {
                in_app: true,
                email: None
            }
        );
        assert_eq!(
            email_unavailable(Some("a@b.example"), &settings),
            Some("no email gateway configured")
        );
        settings.email_gateway = Some("mail".into());
        assert_eq!(
            route(&prefs, s, None, &settings),
            Route {
                in_app: true,
                email: None
            }
        );
        assert_eq!(email_unavailable(None, &settings), Some("no email address"));
        assert_eq!(
            route(&prefs, s, Some("a@b.example"), &settings),
            Route {
                in_app: false,
                email: Some(("mail".into(), "a@b.example".into()))
            }
        );
        assert_eq!(
            route(&Prefs::default(), s, Some("a@b.example"), &settings),
            Route {
                in_app: true,
                email: None
            }
        );
    }
}
