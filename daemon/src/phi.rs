//! Protected health information in newtypes that never print themselves.
//!
//! Names, dates of birth, phone numbers and message bodies are wrapped in [`Phi`] as
//! soon as they are parsed. `Debug` and `Display` print `[redacted]`, so a value that
//! reaches a log line, a panic message or an error by accident shows nothing.
//! Code that really needs the value (the database, a gateway) calls
//! [`Phi::expose`], which is easy to find in review.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value that is PHI. The type parameter is the plain value.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Phi<T>(T);

/// A patient's or user's name.
pub type Name = Phi<String>;
/// A phone number (E.164 once parsed).
pub type Phone = Phi<String>;
/// A date of birth.
pub type DateOfBirth = Phi<chrono::NaiveDate>;
/// A message body.
pub type Body = Phi<String>;

impl<T> Phi<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The plain value, for the database or a gateway. Never log it.
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// The plain value, consuming the wrapper.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for Phi<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Phi<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Phi<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Phi)
    }
}

impl<T: Serialize> Serialize for Phi<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let name: Name = Phi::new("Canary Zyxwv".to_owned());
        assert_eq!(format!("{name:?}"), "[redacted]");
        assert_eq!(format!("{name}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&name)), "Some([redacted])");
        assert_eq!(name.expose(), "Canary Zyxwv");
    }

    #[test]
    fn serde_is_transparent() {
        let body: Body = serde_json::from_str("\"hello\"").unwrap();
        assert_eq!(body.expose(), "hello");
        assert_eq!(serde_json::to_string(&body).unwrap(), "\"hello\"");
    }
}
