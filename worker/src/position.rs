//! A position in a shard: a Kinesis sequence number and, for a user record of a KPL
//! aggregate, its index inside the aggregate (the sub-sequence number).
//!
//! Positions are what checkpoints hold: `(sequence, None)` means "the whole Kinesis record
//! is done", `(sequence, Some(k))` means "user records 0..=k of that aggregate are done".

use std::cmp::Ordering;
use std::fmt;

/// Where a shard was processed up to (inclusive).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Position {
    /// Kinesis sequence number (a decimal string, up to 128 bits and more).
    pub sequence: String,
    /// Index of the user record inside a KPL aggregate; `None` for a whole record (a
    /// non-aggregated record, or an aggregate done to its last user record).
    pub sub_sequence: Option<u64>,
}

impl Position {
    /// The position of a whole Kinesis record.
    pub fn whole(sequence: impl Into<String>) -> Self {
        Self {
            sequence: sequence.into(),
            sub_sequence: None,
        }
    }

    /// The position of user record `sub_sequence` of the aggregate at `sequence`.
    pub fn sub(sequence: impl Into<String>, sub_sequence: u64) -> Self {
        Self {
            sequence: sequence.into(),
            sub_sequence: Some(sub_sequence),
        }
    }

    /// Whether the user record `sub_sequence` of the Kinesis record `sequence` is at or
    /// before this position, i.e. already processed when this position is a checkpoint.
    pub fn covers(&self, sequence: &str, sub_sequence: Option<u64>) -> bool {
        match compare_sequence(sequence, &self.sequence) {
            Ordering::Less => true,
            Ordering::Greater => false,
            Ordering::Equal => match (self.sub_sequence, sub_sequence) {
                // A whole record covers all of its user records.
                (None, _) => true,
                // Part of an aggregate: not the raw record, only user records up to it.
                (Some(_), None) => false,
                (Some(done), Some(s)) => s <= done,
            },
        }
    }
}

/// Orders by sequence number (as a big integer), then sub-sequence, where a whole record
/// (`None`) comes after every one of its user records.
impl Ord for Position {
    fn cmp(&self, other: &Self) -> Ordering {
        compare_sequence(&self.sequence, &other.sequence).then_with(|| {
            match (self.sub_sequence, other.sub_sequence) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => a.cmp(&b),
            }
        })
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sub_sequence {
            Some(s) => write!(f, "{}/{}", self.sequence, s),
            None => f.write_str(&self.sequence),
        }
    }
}

#[cfg(test)]
impl Position {
    /// Test shorthand, the inverse of `Display`: `"10"` is the whole record 10, `"10/2"`
    /// user record 2 of the aggregate at 10.
    pub(crate) fn parse(s: &str) -> Self {
        match s.split_once('/') {
            Some((seq, sub)) => Self::sub(seq, sub.parse().expect("sub-sequence")),
            None => Self::whole(s),
        }
    }
}

/// Compares two Kinesis sequence numbers as the unsigned decimal integers they are (they
/// exceed u128, so not by parsing): fewer significant digits is smaller, equal lengths
/// compare digit by digit.
pub fn compare_sequence(a: &str, b: &str) -> Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_sequence_table() {
        // (a, b, want)
        let cases = [
            ("1", "2", Ordering::Less),
            ("9", "10", Ordering::Less), // not lexicographic
            ("10", "9", Ordering::Greater),
            ("007", "7", Ordering::Equal),
            ("0", "", Ordering::Equal),
            (
                "49590338271490256608559692538361571095921575989136588898",
                "49590338271490256608559692540925702759324208523137515618",
                Ordering::Less,
            ),
            (
                "495903382714902566085596925383615710959215759891365888980",
                "49590338271490256608559692540925702759324208523137515618",
                Ordering::Greater,
            ),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_sequence(a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn position_order_table() {
        let w = Position::whole;
        let s = Position::sub;
        // (a, b, want)
        let cases = [
            (w("9"), w("10"), Ordering::Less),
            (s("9", 5), w("10"), Ordering::Less),
            (s("10", 0), s("10", 1), Ordering::Less),
            (s("10", 2), s("10", 2), Ordering::Equal),
            (s("10", 99), w("10"), Ordering::Less), // whole = every user record done
            (w("10"), s("10", 0), Ordering::Greater),
            (s("11", 0), w("10"), Ordering::Greater),
        ];
        for (a, b, want) in cases {
            assert_eq!(a.cmp(&b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn covers_table() {
        let w = Position::whole;
        let s = Position::sub;
        // (checkpoint, record sequence, record sub-sequence, already processed)
        let cases = [
            (w("10"), "9", None, true),
            (w("10"), "10", None, true),
            (w("10"), "10", Some(3), true),
            (w("10"), "11", Some(0), false),
            (s("10", 2), "10", Some(2), true),
            (s("10", 2), "10", Some(3), false),
            (s("10", 2), "10", None, false), // the raw aggregate was not processed whole
            (s("10", 2), "9", Some(7), true),
            (s("10", 2), "100", Some(0), false),
        ];
        for (cp, seq, sub, want) in cases {
            assert_eq!(cp.covers(seq, sub), want, "{cp} covers {seq}/{sub:?}");
        }
    }

    #[test]
    fn display_and_parse() {
        for (p, shown) in [
            (Position::whole("42"), "42"),
            (Position::sub("42", 3), "42/3"),
        ] {
            assert_eq!(p.to_string(), shown);
            assert_eq!(Position::parse(shown), p);
        }
    }
}
