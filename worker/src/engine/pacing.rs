//! How many claims and resumes one tick may send.
//!
//! A new engine sends at most [`FIRST_LIMIT`] a tick, doubling with every tick whose writes
//! all got answers until the limit is lifted: the workers of a new group all start at once,
//! and thousands of claims in one burst would queue up the group's one partition (a
//! DynamoDB partition takes 1,000 write units a second), heartbeats included. While the
//! state store answers, no limit: a worker takes over a dead peer's shards in one tick.
//! Once some of a tick's claims or resumes got no answer (a timeout, throttling), the
//! store (or the group's one partition) is overloaded, and sending the same writes again at
//! every tick, from every worker, keeps it so: heartbeats queue behind them, readers fence
//! themselves, and their resumes add more writes. So the next tick sends half as many as the
//! last one did, and every tick whose writes all got answers doubles the limit, until it is
//! lifted again. Actions left out are planned again at the next tick.

/// The fewest claims and resumes a tick may send, however overloaded the store looks.
pub(super) const MIN_WRITES_PER_TICK: usize = 4;

/// The limit of a new engine's first tick: more than any worker of a group of 1,000 shards
/// and 20 workers claims when it joins.
pub(super) const FIRST_LIMIT: usize = 64;

/// A limit that doubles past this is lifted.
pub(super) const LIFT_LIMIT_AT: usize = 256;

/// The limit on one tick's claims and resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct WritePacing {
    /// `None`: no limit.
    limit: Option<usize>,
}

impl Default for WritePacing {
    fn default() -> Self {
        Self {
            limit: Some(FIRST_LIMIT),
        }
    }
}

impl WritePacing {
    /// How many claims and resumes this tick may send.
    pub(super) fn limit(&self) -> usize {
        self.limit.unwrap_or(usize::MAX)
    }

    /// Learns from a tick that sent `sent` claims and resumes, of which `unanswered` got no
    /// answer from the store.
    pub(super) fn record(&mut self, sent: usize, unanswered: usize) {
        if sent == 0 {
            return;
        }
        self.limit = if unanswered > 0 {
            Some((sent / 2).max(MIN_WRITES_PER_TICK))
        } else {
            self.limit.map(|l| l * 2).filter(|&l| l <= LIFT_LIMIT_AT)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_halves_on_trouble_and_doubles_back_to_none() {
        // (sent, unanswered) of successive ticks, and the limit after each.
        let cases: &[(&str, usize, usize, Option<usize>)] = &[
            ("first tick answered: 128", 64, 0, Some(128)),
            ("256", 100, 0, Some(256)),
            ("healthy: no limit", 50, 0, None),
            ("nothing sent: unchanged", 0, 0, None),
            ("50 sent, 3 unanswered: 25", 50, 3, Some(25)),
            ("still trouble: 12", 25, 25, Some(12)),
            ("still trouble: 6", 12, 1, Some(6)),
            ("never below the floor", 6, 6, Some(MIN_WRITES_PER_TICK)),
            ("floor holds", 4, 4, Some(MIN_WRITES_PER_TICK)),
            ("nothing sent keeps it", 0, 0, Some(MIN_WRITES_PER_TICK)),
            ("answered: doubles", 4, 0, Some(8)),
            (
                "answered, fewer sent than allowed: doubles too",
                2,
                0,
                Some(16),
            ),
            ("32", 16, 0, Some(32)),
            ("64", 32, 0, Some(64)),
            ("128", 64, 0, Some(128)),
            ("256", 128, 0, Some(256)),
            ("past 256: lifted", 256, 0, None),
        ];
        let mut p = WritePacing::default();
        assert_eq!(p.limit(), FIRST_LIMIT);
        for (name, sent, unanswered, want) in cases {
            p.record(*sent, *unanswered);
            assert_eq!(p.limit, *want, "{name}");
        }
    }
}
