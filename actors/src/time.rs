//! Timestamps as the protocol writes them: RFC 3339, UTC, milliseconds.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

/// Why a text is not a timestamp.
#[derive(Debug, thiserror::Error)]
pub enum TimestampError {
    /// Not RFC 3339.
    #[error("not an RFC 3339 time: {0}")]
    Parse(#[from] time::error::Parse),
    /// In UTC, outside the years the protocol writes.
    #[error("the year {0} in UTC is outside 0000 to 9999")]
    OutOfRange(i32),
}

/// A point in time, written `2026-11-22T12:00:00.000Z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

impl Timestamp {
    /// Now.
    pub fn now() -> Self {
        Self::truncated(OffsetDateTime::now_utc())
    }

    /// Keeps milliseconds only, so that a time survives its text form.
    fn truncated(t: OffsetDateTime) -> Self {
        let ms = t.nanosecond() / 1_000_000 * 1_000_000;
        Self(t.replace_nanosecond(ms).unwrap_or(t))
    }

    /// Parses any RFC 3339 time that falls in the years 0000 to 9999 in
    /// UTC, the times the protocol can write (`0000-01-01T00:00:00+01:00`
    /// is in the year -1).
    pub fn parse(s: &str) -> Result<Self, TimestampError> {
        let parsed = OffsetDateTime::parse(s, &Rfc3339)?;
        // `to_offset` panics past the years the time crate can hold.
        let t = parsed
            .checked_to_offset(time::UtcOffset::UTC)
            .ok_or(TimestampError::OutOfRange(parsed.year()))?;
        if !(0..=9999).contains(&t.year()) {
            return Err(TimestampError::OutOfRange(t.year()));
        }
        Ok(Self::truncated(t))
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> i128 {
        self.0.unix_timestamp_nanos() / 1_000_000
    }

    /// Milliseconds from `self` to `later` (0 if `later` is earlier).
    pub fn ms_until(&self, later: Timestamp) -> u64 {
        (later.unix_ms() - self.unix_ms()).max(0) as u64
    }

    /// The inner time.
    pub fn as_offset_date_time(&self) -> OffsetDateTime {
        self.0
    }
}

impl Timestamp {
    /// The text form, written by hand (every event and record carries one
    /// or more), for years 0 to 9999.
    fn text(&self) -> Option<[u8; 24]> {
        let (year, month, day) = self.0.to_calendar_date();
        if !(0..=9999).contains(&year) {
            return None;
        }
        let (hour, minute, second, milli) = self.0.to_hms_milli();
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, value: u32, digits: usize| {
            let mut v = value;
            for i in (0..digits).rev() {
                out[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, year as u32, 4);
        put(5, u32::from(u8::from(month)), 2);
        put(8, u32::from(day), 2);
        put(11, u32::from(hour), 2);
        put(14, u32::from(minute), 2);
        put(17, u32::from(second), 2);
        put(20, u32::from(milli), 3);
        Some(out)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(text) = self.text() {
            // Only ASCII digits and separators.
            return f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?);
        }
        let format = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        match self.0.format(&format) {
            Ok(s) => f.write_str(&s),
            Err(_) => Err(fmt::Error),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.text() {
            Some(text) => match std::str::from_utf8(&text) {
                Ok(text) => serializer.serialize_str(text),
                Err(_) => serializer.collect_str(self),
            },
            None => serializer.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_general_formatter() {
        let format = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        for text in [
            "1970-01-01T00:00:00.000Z",
            "2026-12-02T09:05:07.008Z",
            "2024-02-29T23:59:59.999Z",
            "0001-01-01T00:00:00.001Z",
            "9999-12-31T23:59:59.990Z",
        ] {
            let t = Timestamp::parse(text).unwrap();
            assert_eq!(t.to_string(), text);
            assert_eq!(t.to_string(), t.0.format(&format).unwrap());
        }
        let now = Timestamp::now();
        assert_eq!(now.to_string(), now.0.format(&format).unwrap());
    }

    #[test]
    fn formats_with_milliseconds_in_utc() {
        let t = Timestamp::parse("2026-11-22T13:00:00.123456+01:00").unwrap();
        assert_eq!(t.to_string(), "2026-11-22T12:00:00.123Z");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2026-11-22T12:00:00.123Z\"");
        let back: Timestamp = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_string(), t.to_string());
    }

    /// Caught by the round trip the fuzz target `wire_bodies` checks: such
    /// a time was read, then written as `-0001-12-31T00:01:00.000Z`, which
    /// does not read back.
    #[test]
    fn a_time_outside_the_years_it_can_write_is_refused() {
        for text in ["0000-01-01T00:00:00+23:59", "9999-12-31T23:59:59-00:01"] {
            assert!(Timestamp::parse(text).is_err(), "{text}");
        }
        let edge = Timestamp::parse("0000-01-01T00:00:00-23:59").unwrap();
        assert_eq!(edge.to_string(), "0000-01-01T23:59:00.000Z");
    }
}
