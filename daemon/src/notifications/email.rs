//! Notification emails: subject and body from the configured templates, which may use
//! `{practice}` (the practice's display name), `{kind}` (e.g. "New patient message")
//! and `{link}` (`notifications.link_base_url` + the platform's patient id) — and
//! nothing else. No patient name, message text, phone number or date of birth is
//! ever handed to the renderer, so no template can put one in an email.

use caremsg_entities::NotificationKind;

/// What a notification of `kind` is called in an email.
pub fn kind_label(kind: NotificationKind) -> &'static str {
    match kind {
        NotificationKind::NewPatientMessage => "New patient message",
        NotificationKind::UnreadReminder => "Unread message reminder",
        NotificationKind::SmsStatus => "Text message status change",
    }
}

/// The link to a patient's conversation: the configured base and the patient id,
/// percent-encoded where a URL needs it.
pub fn link(base: &str, patient_id: &str) -> String {
    let mut out = String::with_capacity(base.len() + patient_id.len());
    out.push_str(base);
    for byte in patient_id.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `template` with `{practice}`, `{kind}` and `{link}` replaced, in one pass (a value
/// that itself contains a placeholder is not expanded again). Other text, braces
/// included, is kept as written.
pub fn render(template: &str, practice: &str, kind: &str, link: &str) -> String {
    let mut out = String::with_capacity(template.len() + practice.len() + link.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let (value, len) = if tail.starts_with("{practice}") {
            (practice, "{practice}".len())
        } else if tail.starts_with("{kind}") {
            (kind, "{kind}".len())
        } else if tail.starts_with("{link}") {
            (link, "{link}".len())
        } else {
            ("{", 1)
        };
        out.push_str(value);
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// A rendered email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    /// One line: control characters (a line break in a practice name) become spaces.
    pub subject: String,
    /// Plain text.
    pub body: String,
}

/// The email of a notification of `kind` about the patient `patient_id` of the
/// practice named `practice`.
pub fn compose(
    settings: &caremsg_config::Notifications,
    practice: &str,
    kind: NotificationKind,
    patient_id: &str,
) -> Email {
    let link = link(&settings.link_base_url, patient_id);
    let label = kind_label(kind);
    let subject = render(&settings.email_subject, practice, label, &link)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Email {
        subject,
        body: render(&settings.email_body, practice, label, &link),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(template: &str, expected: &str) {
        assert_eq!(
            render(
                template,
                "Sunrise {kind} Clinic",
                "New patient message",
                "https://x/p1"
            ),
            expected
        );
    }

    #[test]
    fn placeholders_are_replaced_once() {
        check(
            "{practice}: {kind}",
            "Sunrise {kind} Clinic: New patient message",
        );
        check("Open {link} now", "Open https://x/p1 now");
        check("{unknown} {link", "{unknown} {link");
        check("{{kind}}", "{New patient message}");
        check("", "");
        check("no placeholders", "no placeholders");
    }

    #[test]
    fn the_link_appends_the_encoded_patient_id() {
        assert_eq!(
            link("https://app.example/patients/", "p-1_2"),
            "https://app.example/patients/p-1_2"
        );
        assert_eq!(
            link("https://app.example/p/", "a/b c"),
            "https://app.example/p/a%2Fb%20c"
        );
    }

    #[test]
    fn the_default_email_names_the_practice_the_kind_and_the_link_only() {
        let settings = caremsg_config::Notifications::default();
        let email = compose(
            &settings,
            "Sunrise\nClinic",
            NotificationKind::UnreadReminder,
            "pat1",
        );
        assert_eq!(email.subject, "Sunrise Clinic: Unread message reminder");
        assert!(
            email.body.contains("Unread message reminder"),
            "{}",
            email.body
        );
        assert!(
            email.body.contains("http://127.0.0.1:3000/patients/pat1"),
            "{}",
            email.body
        );
        assert!(!email.body.contains('{'), "{}", email.body);
    }
}
