//! SMS helpers: GSM-7 versus UCS-2 detection and segment counting.
//!
//! A text that uses only the GSM 03.38 basic alphabet and its extension table is sent
//! in GSM-7: 160 septets in a single part, 153 per part when concatenated (the user
//! data header takes the rest). Extension characters (`^ { } \ [ ~ ] | €` and form
//! feed) cost two septets (escape + character), and a part never ends between the two.
//!
//! Any other character switches the whole text to UCS-2: 70 units in a single part,
//! 67 per part when concatenated. Units are UTF-16 code units, which equal code points
//! for the Basic Multilingual Plane; a character outside it (most emoji) takes two
//! units, because that is what carriers send and bill, and a part never ends between
//! the two halves of a surrogate pair.
//!
//! An empty text still goes out as one part.

/// How a text is encoded on the air.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// The GSM 03.38 7-bit default alphabet (with its extension table).
    Gsm7,
    /// UCS-2 / UTF-16.
    Ucs2,
}

/// The encoding and size of a text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segments {
    /// The encoding the text needs.
    pub encoding: Encoding,
    /// Number of parts (SMS segments) it takes, at least 1.
    pub count: usize,
    /// Septets (GSM-7) or UTF-16 code units (UCS-2) of the whole text.
    pub units: usize,
}

/// The GSM 03.38 basic character set, in table order (0x1B, the escape, left out).
const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// The GSM 03.38 extension table (each costs an escape septet plus itself).
const GSM7_EXTENSION: &str = "\u{000C}^{}\\[~]|€";

/// Septets `c` takes in GSM-7, or `None` if GSM-7 cannot carry it.
pub fn gsm7_septets(c: char) -> Option<usize> {
    if GSM7_BASIC.contains(c) {
        Some(1)
    } else if GSM7_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Whether the whole text can be sent in GSM-7.
pub fn is_gsm7(body: &str) -> bool {
    body.chars().all(|c| gsm7_septets(c).is_some())
}

/// The encoding and number of parts of `body`.
pub fn segments(body: &str) -> Segments {
    if is_gsm7(body) {
        let widths = body.chars().filter_map(gsm7_septets);
        let (count, units) = pack(widths, 160, 153);
        Segments {
            encoding: Encoding::Gsm7,
            count,
            units,
        }
    } else {
        let widths = body.chars().map(char::len_utf16);
        let (count, units) = pack(widths, 70, 67);
        Segments {
            encoding: Encoding::Ucs2,
            count,
            units,
        }
    }
}

/// Packs unsplittable characters of the given widths into parts: one part of
/// `single` units if everything fits, else parts of `multi` units. Returns
/// `(parts, total units)`.
fn pack(
    widths: impl Iterator<Item = usize> + Clone,
    single: usize,
    multi: usize,
) -> (usize, usize) {
    let total: usize = widths.clone().sum();
    if total <= single {
        return (1, total);
    }
    let mut parts = 1;
    let mut used = 0;
    for width in widths {
        if used + width > multi {
            parts += 1;
            used = 0;
        }
        used += width;
    }
    (parts, total)
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::Encoding::{Gsm7, Ucs2};
    use super::*;

    fn check(body: &str, encoding: Encoding, count: usize, units: usize) {
        let got = segments(body);
        assert_eq!(
            got,
            Segments {
                encoding,
                count,
                units
            },
            "body of {} chars starting {:?}",
            body.chars().count(),
            body.chars().take(12).collect::<String>()
        );
    }

    fn rep(s: &str, n: usize) -> String {
        s.repeat(n)
    }

    #[test]
    fn empty_is_one_part() {
        check("", Gsm7, 1, 0);
    }

    #[test]
    fn gsm7_single_and_multipart_boundaries() {
        check("Hello, your appointment is at 10:30.", Gsm7, 1, 36);
        check(&rep("a", 160), Gsm7, 1, 160);
        check(&rep("a", 161), Gsm7, 2, 161);
        check(&rep("a", 306), Gsm7, 2, 306);
        check(&rep("a", 307), Gsm7, 3, 307);
        check(&rep("a", 459), Gsm7, 3, 459);
        check(&rep("a", 460), Gsm7, 4, 460);
    }

    #[test]
    fn gsm7_basic_table_specials_cost_one_septet() {
        check("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà", Gsm7, 1, 42);
        check("line\nbreak\r", Gsm7, 1, 11);
    }

    #[test]
    fn gsm7_extension_costs_two_septets() {
        check("€", Gsm7, 1, 2);
        check("^{}\\[~]|€\u{000C}", Gsm7, 1, 20);
        check(&rep("€", 80), Gsm7, 1, 160);
        // 162 septets: 76 euro signs fit in 152 of a part's 153 septets.
        check(&rep("€", 81), Gsm7, 2, 162);
        check(&(rep("a", 159) + "€"), Gsm7, 2, 161);
    }

    #[test]
    fn gsm7_escape_pair_is_never_split() {
        // 306 septets would fit in two parts of 153, but the euro sign at septets
        // 153-154 must move to the second part, which then overflows into a third.
        let body = rep("a", 152) + "€" + &rep("a", 152);
        check(&body, Gsm7, 3, 306);
    }

    #[test]
    fn any_other_character_switches_to_ucs2() {
        check("ç", Ucs2, 1, 1);
        check("Привет", Ucs2, 1, 6);
        check(&(rep("a", 100) + "ł"), Ucs2, 2, 101);
        check(&rep("я", 70), Ucs2, 1, 70);
        check(&rep("я", 71), Ucs2, 2, 71);
        check(&rep("я", 134), Ucs2, 2, 134);
        check(&rep("я", 135), Ucs2, 3, 135);
    }

    #[test]
    fn astral_characters_take_two_units_and_are_never_split() {
        check("Hello 😀", Ucs2, 1, 8);
        check(&rep("😀", 35), Ucs2, 1, 70);
        // 67-unit parts hold 33 emoji (66 units) each.
        check(&rep("😀", 36), Ucs2, 2, 72);
        check(&rep("😀", 67), Ucs2, 3, 134);
    }

    #[test]
    fn gsm7_septets_of_single_characters() {
        let cases = [
            ('a', Some(1)),
            ('@', Some(1)),
            ('€', Some(2)),
            ('|', Some(2)),
            ('ç', None),
            ('`', None),
        ];
        for (c, expected) in cases {
            assert_eq!(gsm7_septets(c), expected, "{c:?}");
        }
    }
}
