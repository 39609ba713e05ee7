//! Exponential backoff with jitter for redialing an address. Pure: the caller supplies the
//! randomness and does the sleeping.

use std::time::Duration;

/// The delay starts at `delay_min`, doubles after every wait up to `delay_max`, and each wait
/// adds a random 0 to 25 % on top so that nodes restarted together do not dial in lockstep.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    delay_min: Duration,
    delay_max: Duration,
    /// The base of the next wait, before jitter.
    delay_next: Duration,
}

impl Backoff {
    pub(crate) fn new(delay_min: Duration, delay_max: Duration) -> Backoff {
        let delay_max = delay_max.max(delay_min);
        Backoff { delay_min, delay_max, delay_next: delay_min }
    }

    /// The next wait, given a random number; doubles the base for the wait after it.
    pub(crate) fn next_delay(&mut self, random: u64) -> Duration {
        let base = self.delay_next;
        self.delay_next = base.saturating_mul(2).min(self.delay_max);
        let jitter_nanos_max = (base.as_nanos() / 4) as u64;
        let jitter = if jitter_nanos_max == 0 { 0 } else { random % (jitter_nanos_max + 1) };
        base + Duration::from_nanos(jitter)
    }

    /// Back to `delay_min`, after a connection that got through the handshake.
    pub(crate) fn reset(&mut self) {
        self.delay_next = self.delay_min;
    }
}

/// A random u64 from the operating system, or zero (no jitter) if it has none to give.
pub(crate) fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    match getrandom::fill(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    #[test]
    fn delays_double_up_to_the_maximum() {
        let mut backoff = Backoff::new(MIN, MAX);
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay(0)).collect();
        assert_eq!(delays[0], MIN);
        assert_eq!(delays[1], MIN * 2);
        assert_eq!(delays[6], MIN * 64);
        assert_eq!(delays[7], MAX, "capped: 12.8 s would exceed 10 s");
        assert_eq!(delays[9], MAX);
    }

    #[test]
    fn jitter_adds_at_most_a_quarter() {
        let mut backoff = Backoff::new(MIN, MAX);
        assert_eq!(backoff.next_delay(u64::MAX), MIN + Duration::from_nanos(u64::MAX % (25_000_000 + 1)));
        for random in [1, 12_345, u64::MAX / 3] {
            let mut backoff = Backoff::new(MIN, MAX);
            let delay = backoff.next_delay(random);
            assert!(delay >= MIN && delay <= MIN + MIN / 4);
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(MIN, MAX);
        backoff.next_delay(0);
        backoff.next_delay(0);
        backoff.reset();
        assert_eq!(backoff.next_delay(0), MIN);
    }
}
