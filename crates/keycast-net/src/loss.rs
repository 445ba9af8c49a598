//! Loss injected on a member's multicast receive path, so tests and `keycast demo --loss` run
//! under loss deterministically in one process, each member losing its own datagrams (a
//! kernel drop before fan-out makes every receiver lose the same ones).

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// How a receiver loses datagrams: each one independently with probability `rate`, or in
/// bursts (Gilbert-Elliott: a good state that loses nothing and a bad state that loses
/// everything, staying bad for `burst` datagrams on average; the long-run rate is `rate`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossModel {
    pub rate: f64,
    /// Mean length of a loss burst (at least 1); `None`: independent losses.
    pub burst: Option<f64>,
    /// The receiver's own seed: the same seed loses the same datagrams.
    pub seed: u64,
}

impl LossModel {
    /// A rate in [0, 1) and a burst of at least one datagram, or why not.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.rate) {
            return Err(format!("loss rate {} is not in [0, 1)", self.rate));
        }
        match self.burst {
            Some(b) if !(b >= 1.0 && b.is_finite()) => Err(format!("mean burst length {b} is below 1 datagram")),
            Some(b) if self.rate / (b * (1.0 - self.rate)) > 1.0 => {
                Err(format!("a loss rate of {} cannot come in bursts of {b}: raise the burst length", self.rate))
            }
            _ => Ok(()),
        }
    }

    /// The same model for receiver `index`, with a seed of its own.
    pub fn for_receiver(&self, index: u64) -> LossModel {
        LossModel { seed: self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15), ..*self }
    }
}

/// Draws, datagram by datagram, whether a receiver loses it.
pub struct LossInjector {
    model: LossModel,
    rng: ChaCha8Rng,
    bad: bool,
}

impl LossInjector {
    pub fn new(model: LossModel) -> LossInjector {
        LossInjector { model, rng: ChaCha8Rng::seed_from_u64(model.seed), bad: false }
    }

    /// Whether the next datagram is lost.
    pub fn drops(&mut self) -> bool {
        let LossModel { rate, burst, .. } = self.model;
        match burst {
            None => self.uniform() < rate,
            Some(burst) => {
                // Leaving the bad state after `burst` datagrams on average; entering it so
                // that the fraction of time spent there is `rate`.
                let (leave, enter) = (1.0 / burst, rate / (burst * (1.0 - rate)));
                let flip = if self.bad { leave } else { enter };
                if self.uniform() < flip {
                    self.bad = !self.bad;
                }
                self.bad
            }
        }
    }

    /// Uniform in [0, 1), from the top 53 bits of a draw.
    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(model: LossModel, n: usize) -> Vec<bool> {
        let mut injector = LossInjector::new(model);
        (0..n).map(|_| injector.drops()).collect()
    }

    fn mean_burst(losses: &[bool]) -> f64 {
        let bursts = losses.windows(2).filter(|w| !w[0] && w[1]).count() + usize::from(losses[0]);
        losses.iter().filter(|&&l| l).count() as f64 / bursts.max(1) as f64
    }

    #[test]
    fn independent_losses_come_at_the_rate_and_alone() {
        let losses = run(LossModel { rate: 0.2, burst: None, seed: 1 }, 200_000);
        let rate = losses.iter().filter(|&&l| l).count() as f64 / losses.len() as f64;
        assert!((rate - 0.2).abs() < 0.005, "{rate}");
        assert!((mean_burst(&losses) - 1.25).abs() < 0.03, "independent bursts average 1/(1-p)");
    }

    #[test]
    fn bursty_losses_keep_the_rate_and_the_burst_length() {
        let losses = run(LossModel { rate: 0.2, burst: Some(4.0), seed: 2 }, 400_000);
        let rate = losses.iter().filter(|&&l| l).count() as f64 / losses.len() as f64;
        assert!((rate - 0.2).abs() < 0.01, "{rate}");
        assert!((mean_burst(&losses) - 4.0).abs() < 0.2, "{}", mean_burst(&losses));
    }

    #[test]
    fn receivers_lose_different_datagrams_and_a_seed_repeats() {
        let model = LossModel { rate: 0.3, burst: None, seed: 9 };
        assert_eq!(run(model.for_receiver(1), 1000), run(model.for_receiver(1), 1000));
        assert_ne!(run(model.for_receiver(1), 1000), run(model.for_receiver(2), 1000));
    }

    #[test]
    fn impossible_models_are_refused_with_a_reason() {
        assert!(LossModel { rate: 1.0, burst: None, seed: 0 }.check().is_err());
        assert!(LossModel { rate: 0.2, burst: Some(0.5), seed: 0 }.check().unwrap_err().contains("below 1"));
        assert!(LossModel { rate: 0.9, burst: Some(1.0), seed: 0 }.check().unwrap_err().contains("bursts"));
        assert!(LossModel { rate: 0.2, burst: Some(3.0), seed: 0 }.check().is_ok());
    }
}
