//! How long mimalloc keeps freed memory before handing it back to the kernel.
//!
//! A controller rekeys once an epoch (1 s by default), and a large rekey allocates and frees
//! about 100 MB. mimalloc's default purge delay (1 s) returned that memory between two rekeys,
//! so each rekey faulted it back in as fresh zeroed pages: 122,000 minor faults in one
//! `keycast bench` run, about 0.2 of the 10% batch's floor. Kept for 10 s, the pages of one
//! epoch's rekey serve the next, and an idle controller still shrinks back after 10 s.

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (mimalloc.h); the sys crate names no
/// constant for it. The unit test checks the index against the option's documented default.
const PURGE_DELAY: mi_option_t = 15;
const KEEP_MS: i64 = 10_000;

/// Sets the purge delay to [`KEEP_MS`] unless the operator chose one (`MIMALLOC_PURGE_DELAY`).
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set stores a value in mimalloc's static option table; it is valid
        // at any time from any thread, and PURGE_DELAY is within the table (checked by test).
        unsafe { mi_option_set(PURGE_DELAY, KEEP_MS as _) };
    }
}

/// The purge delay in force, in ms.
pub fn purge_delay_ms() -> i64 {
    // SAFETY: mi_option_get reads mimalloc's static option table; PURGE_DELAY is within it.
    unsafe { mi_option_get(PURGE_DELAY) as i64 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_option_index_is_the_purge_delay() {
        // Before anything sets it, the option at the index has mimalloc v3's default purge
        // delay (1000 ms); after keep_freed_memory, the delay chosen here.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        assert_eq!(super::purge_delay_ms(), 1000, "mimalloc.h's mi_option_purge_delay moved");
        super::keep_freed_memory();
        assert_eq!(super::purge_delay_ms(), super::KEEP_MS);
    }
}
