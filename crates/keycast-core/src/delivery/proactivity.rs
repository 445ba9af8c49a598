//! The proactivity factor rho (Zhang, Lam, Lee and Yang, ToN 2003, section on adaptive
//! proactive FEC): in round 1 the server sends ceil(rho * k) packets of each block of k, and
//! adapts rho after each rekey from the NAKs that round drew, toward a target NAK count.
//!
//! Rho is kept as whole packets per block (`rho = per_block / k`), as the server sends whole
//! packets. After a rekey whose first round drew the NAKs `needed` (each the number of
//! packets one member still needed):
//!
//! - more NAKs than the target: add the (target + 1)-th largest `needed` to the packets per
//!   block, so that, had the rekey been sent so, about `target` members would still have NAKed;
//! - fewer than the target: take one packet per block away (slowly: a step up is as large as
//!   the NAKs ask, a step down one packet);
//! - exactly the target: keep rho.
//!
//! Rho stays within [1, rho_max]. Sans-IO: no clock, no randomness.

/// Why a proactivity controller could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProactivityError {
    #[error("block size {0} is not between 1 and {max}", max = super::fec::MAX_ORIGINALS)]
    BlockSize(usize),
    #[error("rho {0} is not a finite number between 1 and rho_max")]
    Rho(String),
    #[error("rho_max {0} is not a finite number between 1 and {MAX_RHO}")]
    RhoMax(String),
    #[error("loss rate {0} is not in [0, 1)")]
    Loss(String),
}

/// Largest rho_max accepted: eight times the block, far past any useful redundancy.
pub const MAX_RHO: f64 = 8.0;

/// What an update did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adjustment {
    Raised { by_packets: u32 },
    Lowered,
    Kept,
}

/// Rho for one group's rekeys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proactivity {
    /// k: original packets per full block.
    block: u32,
    /// Packets of a full block sent in round 1 (originals and parity), k..=max_per_block.
    per_block: u32,
    max_per_block: u32,
    target_naks: u32,
}

impl Proactivity {
    /// Starts at `rho`, for blocks of `block` packets.
    pub fn new(block: usize, target_naks: u32, rho: f64, rho_max: f64) -> Result<Self, ProactivityError> {
        if block == 0 || block > super::fec::MAX_ORIGINALS {
            return Err(ProactivityError::BlockSize(block));
        }
        if !rho_max.is_finite() || !(1.0..=MAX_RHO).contains(&rho_max) {
            return Err(ProactivityError::RhoMax(rho_max.to_string()));
        }
        if !rho.is_finite() || !(1.0..=rho_max).contains(&rho) {
            return Err(ProactivityError::Rho(rho.to_string()));
        }
        let block = block as u32;
        let max_per_block = (rho_max * f64::from(block)).floor() as u32;
        let per_block = ((rho * f64::from(block)).ceil() as u32).clamp(block, max_per_block);
        Ok(Proactivity { block, per_block, max_per_block, target_naks })
    }

    /// A sane start for `receivers` members losing a fraction `loss` of packets each: the
    /// smallest rho at which the expected first-round NAKs are within the target (a member
    /// NAKs when it loses its own packet and gets fewer than k of the block's others).
    pub fn for_loss(block: usize, target_naks: u32, rho_max: f64, loss: f64, receivers: u64) -> Result<Self, ProactivityError> {
        if !loss.is_finite() || !(0.0..1.0).contains(&loss) {
            return Err(ProactivityError::Loss(loss.to_string()));
        }
        let mut controller = Proactivity::new(block, target_naks, 1.0, rho_max)?;
        controller.per_block = controller.per_block_for_loss(loss, receivers);
        Ok(controller)
    }

    /// Packets per block at which `receivers` members losing `loss` each are expected to send
    /// at most the target NAKs.
    fn per_block_for_loss(&self, loss: f64, receivers: u64) -> u32 {
        let k = self.block;
        let expected_naks = |sent: u32| receivers as f64 * loss * binomial_cdf(sent - 1, 1.0 - loss, k - 1);
        (k..=self.max_per_block).find(|&sent| expected_naks(sent) <= f64::from(self.target_naks)).unwrap_or(self.max_per_block)
    }

    /// Raises rho to at least the sane start for `loss` (a measured lower bound on the loss
    /// rate): one rekey at rho 1 then says how much parity the group needs, where the
    /// NAK-driven steps alone would take several rekeys to get there.
    pub fn raise_for_loss(&mut self, loss: f64, receivers: u64) {
        if loss.is_finite() && (0.0..1.0).contains(&loss) {
            self.per_block = self.per_block.max(self.per_block_for_loss(loss, receivers));
        }
    }

    pub fn rho(&self) -> f64 {
        f64::from(self.per_block) / f64::from(self.block)
    }

    pub fn target_naks(&self) -> u32 {
        self.target_naks
    }

    /// Packets to send in round 1 for a block of `originals` packets (the last block of a
    /// rekey may be short, and a small rekey is one short block): the originals and as many
    /// parity packets as a full block gets. A member fails a block when it lost its own packet
    /// and more of the others than there are parity packets; with the same parity a short block
    /// has fewer packets to lose, so it is never less protected than a full one. (Scaling the
    /// parity with the block, ceil(rho * originals), left a one-packet rekey at rho 1.7 one
    /// parity packet: 4% of members failed it at 20% loss, against 0.5% for a full block.)
    pub fn round_one_packets(&self, originals: usize) -> usize {
        originals + (self.per_block - self.block) as usize
    }

    /// Adapts rho to one rekey's first-round NAKs, each the packets one member still needed
    /// (values above k are taken as k: no member needs more).
    pub fn update(&mut self, needed: &[u16]) -> Adjustment {
        let naks = needed.len();
        let target = self.target_naks as usize;
        if naks > target {
            let by = self.nth_largest_needed(needed, target);
            let before = self.per_block;
            self.per_block = self.per_block.saturating_add(by).min(self.max_per_block);
            return match self.per_block - before {
                0 => Adjustment::Kept,
                by_packets => Adjustment::Raised { by_packets },
            };
        }
        if naks < target && self.per_block > self.block {
            self.per_block -= 1;
            return Adjustment::Lowered;
        }
        Adjustment::Kept
    }

    /// The (n + 1)-th largest value of `needed` (0-based n), clamped to k.
    fn nth_largest_needed(&self, needed: &[u16], n: usize) -> u32 {
        let mut values: Vec<u32> = needed.iter().map(|&v| u32::from(v).min(self.block)).collect();
        let (_, nth, _) = values.select_nth_unstable_by(n, |a, b| b.cmp(a));
        *nth
    }
}

/// P(X <= at_most) for X ~ Binomial(trials, p), summed in log space (trials is small).
fn binomial_cdf(trials: u32, p: f64, at_most: u32) -> f64 {
    if at_most >= trials {
        return 1.0;
    }
    let (ln_p, ln_q) = (p.ln(), (1.0 - p).ln());
    let mut ln_choose = 0.0; // ln C(trials, 0)
    let mut sum = 0.0;
    for i in 0..=at_most {
        if i > 0 {
            ln_choose += f64::from(trials - i + 1).ln() - f64::from(i).ln();
        }
        let term = ln_choose + f64::from(i) * ln_p + f64::from(trials - i) * ln_q;
        sum += term.exp();
    }
    sum.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_naks_raise_rho_by_the_target_plus_first_largest_need() {
        let mut rho = Proactivity::new(10, 3, 1.0, 4.0).unwrap();
        // Five NAKs, target 3: the 4th largest need (2) is added.
        assert_eq!(rho.update(&[5, 1, 2, 9, 2]), Adjustment::Raised { by_packets: 2 });
        assert_eq!(rho.rho(), 1.2);
        assert_eq!(rho.round_one_packets(10), 12);
        assert_eq!(rho.round_one_packets(3), 5, "a short block gets a full block's parity");
    }

    #[test]
    fn few_naks_lower_rho_one_packet_at_a_time_down_to_one() {
        let mut rho = Proactivity::new(10, 20, 1.2, 2.0).unwrap();
        assert_eq!(rho.update(&[1; 5]), Adjustment::Lowered);
        assert_eq!(rho.update(&[]), Adjustment::Lowered);
        assert_eq!(rho.update(&[]), Adjustment::Kept);
        assert_eq!(rho.rho(), 1.0);
        assert_eq!(rho.update(&[1; 20]), Adjustment::Kept, "exactly the target keeps rho");
    }

    #[test]
    fn rho_is_clamped_and_hostile_needs_are_capped_at_k() {
        let mut rho = Proactivity::new(10, 0, 1.0, 1.5).unwrap();
        assert_eq!(rho.update(&[u16::MAX; 4]), Adjustment::Raised { by_packets: 5 });
        assert_eq!(rho.rho(), 1.5);
        assert_eq!(rho.update(&[u16::MAX; 4]), Adjustment::Kept);
        assert!(Proactivity::new(10, 1, 0.5, 2.0).is_err());
        assert!(Proactivity::new(10, 1, 1.0, f64::NAN).is_err());
        assert!(Proactivity::new(0, 1, 1.0, 2.0).is_err());
        assert!(Proactivity::for_loss(10, 1, 2.0, 1.0, 10).is_err());
    }

    #[test]
    fn the_default_for_a_loss_rate_grows_with_loss_and_group() {
        let rho = |loss, n| Proactivity::for_loss(10, 20, 4.0, loss, n).unwrap().rho();
        assert_eq!(rho(0.0, 1 << 20), 1.0);
        assert!(rho(0.2, 4096) > rho(0.02, 4096));
        assert!(rho(0.2, 1 << 20) > rho(0.2, 4096));
        // 1/(1-p) is the floor of any code: more is needed for a per-member tail.
        assert!(rho(0.2, 4096) > 1.25);
    }

    #[test]
    fn a_measured_loss_raises_rho_to_its_default_and_never_lowers_it() {
        let mut rho = Proactivity::new(10, 2, 1.0, 4.0).unwrap();
        rho.raise_for_loss(0.2, 300);
        assert_eq!(rho.rho(), Proactivity::for_loss(10, 2, 4.0, 0.2, 300).unwrap().rho());
        assert!(rho.rho() > 1.5, "rho {} for 20% loss", rho.rho());
        let before = rho.rho();
        rho.raise_for_loss(0.01, 300);
        rho.raise_for_loss(f64::NAN, 300);
        assert_eq!(rho.rho(), before);
    }

    /// A member's chance to miss its packet of a block sent as `sent` packets of `originals`.
    fn member_fails(sent: usize, originals: usize, loss: f64) -> f64 {
        loss * binomial_cdf(sent as u32 - 1, 1.0 - loss, originals as u32 - 1)
    }

    #[test]
    fn no_short_block_is_less_protected_than_a_full_one() {
        for loss in [0.02, 0.2, 0.4] {
            let rho = Proactivity::for_loss(10, 20, 4.0, loss, 2000).unwrap();
            let full = member_fails(rho.round_one_packets(10), 10, loss);
            for originals in 1..10 {
                let short = member_fails(rho.round_one_packets(originals), originals, loss);
                assert!(short <= full, "loss {loss}: a block of {originals} fails {short}, a full block {full}");
            }
        }
    }

    #[test]
    fn binomial_cdf_matches_small_cases() {
        assert!((binomial_cdf(2, 0.5, 0) - 0.25).abs() < 1e-12);
        assert!((binomial_cdf(2, 0.5, 1) - 0.75).abs() < 1e-12);
        assert_eq!(binomial_cdf(3, 0.1, 3), 1.0);
    }
}
