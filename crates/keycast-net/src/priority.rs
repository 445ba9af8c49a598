//! Real-time priority for the few threads whose timing is the product (heartbeats) or its
//! measurement (a bench's listener).

/// Puts the calling thread under the lowest real-time priority, so it runs as soon as it
/// wakes whatever else keeps the cores busy (on a loaded 2-core machine the heartbeats waited
/// up to 25 ms for a core, 2 ms with it). Only for threads that sleep most of the time and do
/// little when awake: they cannot starve anything. Needs CAP_SYS_NICE or an RLIMIT_RTPRIO;
/// without, the thread runs as before. Returns whether it took.
pub fn run_ahead_of_the_rest(what: &str) -> bool {
    use thread_priority::unix::{set_thread_priority_and_policy, thread_native_id, RealtimeThreadSchedulePolicy, ThreadSchedulePolicy};
    let fifo = ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo);
    match set_thread_priority_and_policy(thread_native_id(), thread_priority::ThreadPriority::Min, fifo) {
        Ok(()) => {
            tracing::debug!(what, "running under real-time priority");
            true
        }
        Err(e) => {
            tracing::info!(what, error = ?e, "running under normal priority (real-time needs CAP_SYS_NICE or RLIMIT_RTPRIO): under load it may run late");
            false
        }
    }
}
