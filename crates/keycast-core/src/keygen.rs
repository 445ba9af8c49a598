//! Fresh key material from caller-supplied entropy.
//!
//! The pure layer never reads the OS: each batch receives a [`BatchSeed`] (from the OS RNG in
//! the drivers, from a fixed seed in tests and simulations) and expands it with ChaCha20.
//! Independent streams let large batches generate keys on every core and still be
//! reproducible from the seed.

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::key::{Key, KEY_LEN};

/// 32 bytes of entropy for one batch.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct BatchSeed([u8; 32]);

impl BatchSeed {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        BatchSeed(bytes)
    }

    /// A seed for simulations and tests: expands a number into 32 bytes.
    pub fn from_u64(seed: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        BatchSeed(bytes)
    }

    /// Draws the seed of the next batch from this one (for seeded runs of many batches).
    pub fn next(&self) -> BatchSeed {
        let mut rng = ChaCha20Rng::from_seed(self.0);
        rng.set_stream(u64::MAX);
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        BatchSeed(bytes)
    }
}

impl core::fmt::Debug for BatchSeed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("BatchSeed(<redacted>)")
    }
}

/// Key stream of a batch's nonce salt, apart from every stream that draws keys.
const SALT_STREAM: u64 = u64::MAX - 2;

/// The nonce salt of the rekey made from `seed` (see [`crate::wrap`]): replaying a logged batch
/// redraws it, a new batch draws a fresh one.
pub fn nonce_salt(seed: &BatchSeed) -> crate::wrap::NonceSalt {
    let mut rng = ChaCha20Rng::from_seed(seed.0);
    rng.set_stream(SALT_STREAM);
    let mut salt = [0u8; crate::wrap::SALT_LEN];
    rng.fill_bytes(&mut salt);
    salt
}

/// Key stream of a batch's joiners' key (the reflector's), apart from every other stream.
const JOINERS_STREAM: u64 = u64::MAX - 3;

/// The joiners' key of the batch made from `seed`: as fresh as the batch's keys, independent of
/// them, and drawn again when a logged batch is replayed.
pub fn joiners_key(seed: &BatchSeed) -> Key {
    KeyGen::new(seed, JOINERS_STREAM).next_key()
}

/// A stream of fresh keys.
pub struct KeyGen {
    rng: ChaCha20Rng,
}

impl KeyGen {
    /// Stream `stream` of the batch's seed; distinct streams never overlap.
    pub fn new(seed: &BatchSeed, stream: u64) -> Self {
        let mut rng = ChaCha20Rng::from_seed(seed.0);
        rng.set_stream(stream);
        KeyGen { rng }
    }

    pub fn next_key(&mut self) -> Key {
        let mut bytes = [0u8; KEY_LEN];
        self.rng.fill_bytes(&mut bytes);
        let key = Key::from_bytes(bytes);
        bytes.zeroize();
        key
    }
}
