//! The outbound texts of SMS authentication, and their size on the air.
//!
//! The opt-in text is fixed: SPEC requires the help article's wording exactly, with
//! the practice's display name in place of `[Practice Name]` ([`opt_in`]). The other
//! texts are the configurable templates of `sms_auth.templates` ([`render`]), whose
//! one placeholder is `{practice}`.
//!
//! **No text can carry patient data:** both functions take the practice's name
//! ([`PracticeName`]) and nothing about the patient, so no template, however it is
//! configured, can echo a date of birth or name the patient.
//!
//! [`segments`] (the SDK's) counts GSM-7/UCS-2 parts by the rules SPEC settles
//! (GSM-7: 160, or 153 per part; UCS-2: 70, or 67 per part).

use caremsg_config::SmsTemplates;
use caremsg_entities::practice;

/// The opt-in text, word for word as the help article gives it.
pub const OPT_IN_TEMPLATE: &str = "A member of your care team at [Practice Name] is trying to get \
in contact with you. Please send your date of birth (MM/DD/YYYY) to confirm your identity. If \
you choose to opt out of these messages at any time, please respond 'STOP'. Message and data \
rates may apply.";

/// What [`opt_in`] replaces with the practice's name.
const OPT_IN_PLACEHOLDER: &str = "[Practice Name]";

/// What [`render`] replaces with the practice's name.
const TEMPLATE_PLACEHOLDER: &str = "{practice}";

/// A practice's display name, as texts use it verbatim. The only value a text can be
/// filled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PracticeName<'a>(&'a str);

impl<'a> PracticeName<'a> {
    /// The display name of `practice`.
    pub fn of(practice: &'a practice::Model) -> Self {
        Self(&practice.name)
    }

    /// A practice's display name held elsewhere (a cache of the practice row).
    pub fn new(display_name: &'a str) -> Self {
        Self(display_name)
    }

    /// The name.
    pub fn as_str(self) -> &'a str {
        self.0
    }
}

/// One of the configurable texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Template {
    /// The right date of birth: the patient is enabled.
    Confirmed,
    /// A wrong reply while attempts remain: asks again in MM/DD/YYYY form.
    WrongReply,
    /// The last attempt was wrong: contact the practice.
    Failed,
    /// The answer to HELP or INFO: who is texting and how to opt out.
    Help,
    /// The one confirmation of an opt-out.
    OptedOut,
}

impl Template {
    /// Every template, in the order of the settings.
    pub const ALL: [Template; 5] = [
        Self::Confirmed,
        Self::WrongReply,
        Self::Failed,
        Self::Help,
        Self::OptedOut,
    ];

    /// The field of `sms_auth.templates` that holds it.
    pub const fn setting(self) -> &'static str {
        match self {
            Self::Confirmed => "confirmed",
            Self::WrongReply => "wrong_reply",
            Self::Failed => "failed",
            Self::Help => "help",
            Self::OptedOut => "opted_out",
        }
    }

    /// Its configured wording.
    pub fn wording(self, templates: &SmsTemplates) -> &str {
        match self {
            Self::Confirmed => &templates.confirmed,
            Self::WrongReply => &templates.wrong_reply,
            Self::Failed => &templates.failed,
            Self::Help => &templates.help,
            Self::OptedOut => &templates.opted_out,
        }
    }
}

/// The opt-in text for `practice`.
pub fn opt_in(practice: PracticeName<'_>) -> String {
    OPT_IN_TEMPLATE.replace(OPT_IN_PLACEHOLDER, practice.as_str())
}

/// The text `which` as configured in `templates`, with `{practice}` filled in. A
/// placeholder the configuration does not know stays as written (validation refuses
/// such templates before they are ever used).
pub fn render(templates: &SmsTemplates, which: Template, practice: PracticeName<'_>) -> String {
    which
        .wording(templates)
        .replace(TEMPLATE_PLACEHOLDER, practice.as_str())
}

/// Segment counting is the SDK's (one implementation for the daemon and every
/// plugin): GSM-7 160 or 153 per part, UCS-2 70 or 67.
pub use caremsg_plugin_sdk::sms::{Encoding, Segments, segments};

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    /// A practice name of 40 characters, the length the one-segment promise is kept for.
    const LONG_NAME: &str = "Riverside Family Medicine & Cardiology X";

    /// Default templates that do not fit one SMS with a 40-character practice name:
    /// none. This test fails as soon as the list is wrong in either direction.
    const KNOWN_TOO_LONG: &[Template] = &[];

    #[test]
    fn the_opt_in_text_is_the_articles_wording() {
        assert_eq!(
            opt_in(PracticeName::new("Lakeside Clinic")),
            "A member of your care team at Lakeside Clinic is trying to get in contact with \
             you. Please send your date of birth (MM/DD/YYYY) to confirm your identity. If you \
             choose to opt out of these messages at any time, please respond 'STOP'. Message \
             and data rates may apply."
        );
    }

    #[test]
    fn the_opt_in_text_matches_the_seed_article_when_it_is_at_hand() {
        // The article lives beside the repository (../shared/seed); the literal above
        // is checked either way, this only re-reads the source when present.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/seed/patient-messaging-help-article.txt"
        );
        let Ok(article) = std::fs::read_to_string(path) else {
            assert!(OPT_IN_TEMPLATE.contains(OPT_IN_PLACEHOLDER));
            return;
        };
        assert!(
            article.lines().any(|line| line.trim() == OPT_IN_TEMPLATE),
            "the opt-in text differs from the article"
        );
    }

    #[test]
    fn the_opt_in_text_takes_two_parts_with_a_long_name() {
        let text = opt_in(PracticeName::new(LONG_NAME));
        assert_eq!(LONG_NAME.chars().count(), 40);
        assert_eq!(segments(&text).encoding, Encoding::Gsm7);
        assert_eq!(segments(&text).count, 2);
        assert!(!text.contains(OPT_IN_PLACEHOLDER));
    }

    #[test]
    fn templates_are_filled_with_the_practice_name_only() {
        let templates = SmsTemplates {
            help: "{practice} {practice} {name} {dob} [Practice Name]".to_owned(),
            ..SmsTemplates::default()
        };
        assert_eq!(
            render(&templates, Template::Help, PracticeName::new("Oak")),
            "Oak Oak {name} {dob} [Practice Name]"
        );
        // A name that looks like a placeholder is not expanded again.
        assert_eq!(
            render(&templates, Template::Help, PracticeName::new("{practice}")),
            "{practice} {practice} {name} {dob} [Practice Name]"
        );
    }

    #[test]
    fn practice_name_of_a_row() {
        let at = chrono::DateTime::UNIX_EPOCH;
        let row = practice::Model {
            id: "p1".to_owned(),
            name: "Maple Street Clinic".to_owned(),
            sms_enabled: true,
            portal_enabled: false,
            country: "US".to_owned(),
            timezone: "America/New_York".to_owned(),
            sign_outbound_sms: false,
            active: true,
            created_at: at,
            updated_at: at,
        };
        let text = render(
            &SmsTemplates::default(),
            Template::OptedOut,
            PracticeName::of(&row),
        );
        assert!(text.starts_with("Maple Street Clinic: "), "{text}");
    }

    #[test]
    fn every_template_is_rendered_from_its_own_setting() {
        let templates = SmsTemplates {
            confirmed: "c {practice}".to_owned(),
            wrong_reply: "w {practice}".to_owned(),
            failed: "f {practice}".to_owned(),
            help: "h {practice}".to_owned(),
            opted_out: "o {practice}".to_owned(),
        };
        let got: Vec<String> = Template::ALL
            .iter()
            .map(|t| render(&templates, *t, PracticeName::new("P")))
            .collect();
        assert_eq!(got, ["c P", "w P", "f P", "h P", "o P"]);
        let settings: Vec<&str> = Template::ALL.iter().map(|t| t.setting()).collect();
        assert_eq!(
            settings,
            ["confirmed", "wrong_reply", "failed", "help", "opted_out"]
        );
    }

    #[test]
    fn default_templates_fit_one_gsm7_sms_with_a_40_character_practice_name() {
        assert_eq!(LONG_NAME.chars().count(), 40);
        let templates = caremsg_config::Settings::default().sms_auth.templates;
        let mut too_long = Vec::new();
        for which in Template::ALL {
            let text = render(&templates, which, PracticeName::new(LONG_NAME));
            let size = segments(&text);
            assert_eq!(size.encoding, Encoding::Gsm7, "{}: {text}", which.setting());
            if size.units > 160 || size.count != 1 {
                too_long.push(which);
            }
        }
        assert_eq!(
            too_long, KNOWN_TOO_LONG,
            "default templates over one SMS (160 GSM-7 characters) with a 40-character name"
        );
    }

    #[test]
    fn default_templates_carry_no_date_and_nothing_but_the_practice_name() {
        let templates = caremsg_config::Settings::default().sms_auth.templates;
        for which in Template::ALL {
            let wording = which.wording(&templates);
            let text = render(&templates, which, PracticeName::new(LONG_NAME));
            // No digit at all, so no date of any form.
            assert!(
                !text.chars().any(|c| c.is_ascii_digit()),
                "{}: {text}",
                which.setting()
            );
            assert_eq!(text, wording.replace("{practice}", LONG_NAME));
            assert!(!text.contains('{') && !text.contains('}'), "{text}");
        }
    }

    #[test]
    fn default_help_and_wrong_reply_say_what_spec_requires() {
        let templates = SmsTemplates::default();
        let help = render(&templates, Template::Help, PracticeName::new("Oak Clinic"));
        assert!(
            help.contains("Oak Clinic") && help.contains("STOP"),
            "{help}"
        );
        let again = render(&templates, Template::WrongReply, PracticeName::new("Oak"));
        assert!(again.contains("MM/DD/YYYY"), "{again}");
        let failed = render(&templates, Template::Failed, PracticeName::new("Oak"));
        assert!(failed.contains("contact"), "{failed}");
    }

    fn check(text: &str, encoding: Encoding, count: usize, units: usize) {
        assert_eq!(
            segments(text),
            Segments {
                encoding,
                count,
                units
            },
            "text of {} characters",
            text.chars().count()
        );
    }

    #[test]
    fn segment_counts_agree_with_the_sdk() {
        use Encoding::{Gsm7, Ucs2};
        let rep = |s: &str, n| s.repeat(n);
        check("", Gsm7, 1, 0);
        check(&rep("a", 160), Gsm7, 1, 160);
        check(&rep("a", 161), Gsm7, 2, 161);
        check(&rep("a", 306), Gsm7, 2, 306);
        check(&rep("a", 307), Gsm7, 3, 307);
        check("€", Gsm7, 1, 2);
        check(&rep("€", 80), Gsm7, 1, 160);
        check(&rep("€", 81), Gsm7, 2, 162);
        check(&(rep("a", 152) + "€" + &rep("a", 152)), Gsm7, 3, 306);
        check("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà", Gsm7, 1, 42);
        check("ç", Ucs2, 1, 1);
        check("`", Ucs2, 1, 1);
        check(&rep("я", 70), Ucs2, 1, 70);
        check(&rep("я", 71), Ucs2, 2, 71);
        check(&rep("я", 135), Ucs2, 3, 135);
        check(&rep("😀", 35), Ucs2, 1, 70);
        check(&rep("😀", 36), Ucs2, 2, 72);
    }

    #[test]
    fn a_practice_name_outside_gsm7_switches_the_text_to_ucs2() {
        let text = render(
            &SmsTemplates::default(),
            Template::OptedOut,
            PracticeName::new("Clínica São José"),
        );
        assert_eq!(segments(&text).encoding, Encoding::Ucs2);
        assert_eq!(segments(&text).count, 2);
    }
}
