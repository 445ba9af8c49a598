//! The peer of `keycast bench`: one member removed from an MLS group (RFC 9420) by mls-rs
//! with its aws-lc-rs provider (the same crypto library as keycast), cipher suite
//! MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519.
//!
//! The committer's commits leave out the ratchet tree extension (on by default in mls-rs): with
//! it every commit also encodes the whole tree into a signed GroupInfo, work a remove does not
//! need (measured from outside: 28-29 ms at n = 10,000 with it, 20-21 ms without).
//!
//! Setup: the committer creates the group and adds the n - 1 others in one commit. That leaves
//! the ratchet tree's parent nodes blank, which would make a remove encrypt to every leaf of
//! each blank subtree (O(n)): to compare against a fully populated tree, the members that own
//! the nodes a remove needs (every copath node of the committer and of the removed member)
//! then commit an update each, so the remove costs what it costs in a fully populated tree
//! (O(log n) HPKE encryptions). Measured: building the remove commit (proposal, new path,
//! encryptions, signature, confirmation), as the median of several builds each discarded
//! with `clear_pending_commit`.

use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use mls_rs::client_builder::MlsConfig;
use mls_rs::error::MlsError;
use mls_rs::identity::basic::{BasicCredential, BasicIdentityProvider};
use mls_rs::identity::SigningIdentity;
use mls_rs::mls_rules::{CommitOptions, DefaultMlsRules};
use mls_rs::{CipherSuite, CipherSuiteProvider, Client, CryptoProvider, Group};
use mls_rs_crypto_awslc::AwsLcCryptoProvider;
use rayon::prelude::*;

const SUITE: CipherSuite = CipherSuite::CURVE25519_AES128;

/// What removing one member of an n-member MLS group cost.
pub struct MlsRemove {
    pub setup: Duration,
    pub remove: Duration,
    /// Members that committed an update to populate the nodes the remove uses.
    pub committers: usize,
    pub commit_bytes: usize,
}

fn client(index: u64) -> Result<Client<impl MlsConfig>, MlsError> {
    let crypto = AwsLcCryptoProvider::default();
    let suite = crypto.cipher_suite_provider(SUITE).ok_or(MlsError::UnsupportedCipherSuite(SUITE))?;
    let (secret, public) = suite.signature_key_generate().map_err(|_| MlsError::UnsupportedCipherSuite(SUITE))?;
    let credential = BasicCredential::new(format!("member {index:08}").into_bytes());
    Ok(Client::builder()
        .identity_provider(BasicIdentityProvider)
        .crypto_provider(crypto)
        .mls_rules(DefaultMlsRules::new().with_commit_options(
            // A remove needs no GroupInfo carrying the whole tree (mls-rs builds and signs one
            // by default): leaving it on would charge the remove with an O(n) encoding.
            CommitOptions::new().with_path_required(true).with_ratchet_tree_extension(false),
        ))
        .signing_identity(SigningIdentity::new(credential.into_credential(), public), secret, SUITE)
        .build())
}

/// Leaves (other than `skip`) whose update fills every copath node of `leaves` in a tree of `n`.
fn copath_owners(leaves: &[u32], skip: &[u32], n: u32) -> Vec<u32> {
    let levels = n.next_power_of_two().trailing_zeros();
    let mut owners = Vec::new();
    for &leaf in leaves {
        for level in 0..levels {
            let start = ((leaf >> level) ^ 1) << level;
            let owner = (start..(start + (1 << level)).min(n)).find(|l| !skip.contains(l));
            if let Some(owner) = owner.filter(|o| !owners.contains(o)) {
                owners.push(owner);
            }
        }
    }
    owners
}

fn err(e: MlsError) -> String {
    format!("mls-rs: {e}")
}

/// Builds an n-member group as described above and times removing one member.
pub fn remove_one(n: u64, reps: usize, bar: &ProgressBar) -> Result<MlsRemove, String> {
    let started = Instant::now();
    let (mut group, removed, committers) = populated_group(n, bar)?;
    let setup = started.elapsed();
    bar.set_message(format!("mls-rs n = {n}: timing the remove"));
    let (times, commit_bytes) = time_removes(&mut group, removed, reps)?;
    Ok(MlsRemove { setup, remove: crate::measure::middle(times), committers, commit_bytes })
}

/// For profiling (`keycast bench --mls-profile N`): builds the group as `remove_one` does, then
/// builds its remove commit `reps` times on a thread named `mls-remove`, so that
/// `perf report --comm mls-remove` shows the removes without the setup.
pub fn profile_remove(n: u64, reps: usize) -> Result<Duration, String> {
    let (mut group, removed, _) = populated_group(n, &ProgressBar::hidden())?;
    let timed = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("mls-remove".into())
            .spawn_scoped(s, || time_removes(&mut group, removed, reps))
            .map_err(|e| e.to_string())?
            .join()
            .map_err(|_| "the remove thread panicked".to_string())?
    })?;
    Ok(crate::measure::middle(timed.0))
}

/// The committer's group with both paths populated, the leaf to remove and how many members
/// committed updates to populate them.
fn populated_group(n: u64, bar: &ProgressBar) -> Result<(Group<impl MlsConfig>, u32, usize), String> {
    let mut group = client(0).map_err(err)?.create_group(Default::default(), Default::default(), None).map_err(err)?;
    bar.set_message(format!("mls-rs n = {n}: key packages"));
    let clients: Vec<_> = (1..n).into_par_iter().map(client).collect::<Result<_, _>>().map_err(err)?;
    let packages: Vec<_> = clients
        .par_iter()
        .map(|c| c.generate_key_package_message(Default::default(), Default::default(), None))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    bar.set_message(format!("mls-rs n = {n}: adding {} members in one commit", n - 1));
    let mut builder = group.commit_builder();
    for package in packages {
        builder = builder.add_member(package).map_err(err)?;
    }
    let welcome = builder.build().map_err(err)?.welcome_messages.remove(0);
    group.apply_pending_commit().map_err(err)?;
    // Without the ratchet tree extension, joiners get the tree beside the welcome.
    let tree = group.export_tree().into_owned();
    let removed = (n * 2 / 3) as u32;
    let owners = copath_owners(&[0, removed], &[0, removed], n as u32);
    bar.set_message(format!("mls-rs n = {n}: {} members join and commit updates", owners.len()));
    let mut states: Vec<Group<_>> = owners
        .par_iter()
        .map(|&leaf| clients[leaf as usize - 1].join_group(Some(tree.clone()), &welcome, None).map(|(g, _)| g))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    for (i, leaf) in owners.iter().enumerate() {
        if states[i].current_member_index() != *leaf {
            return Err(format!("mls-rs placed member {leaf} at leaf {}", states[i].current_member_index()));
        }
        let update = states[i].commit(vec![]).map_err(err)?;
        states[i].apply_pending_commit().map_err(err)?;
        states.par_iter_mut().enumerate().filter(|(j, _)| *j != i).try_for_each(|(_, s)| {
            s.process_incoming_message(update.commit_message.clone()).map(drop)
        }).map_err(err)?;
        group.process_incoming_message(update.commit_message).map_err(err)?;
    }
    Ok((group, removed, owners.len()))
}

/// `reps` builds of the commit removing `removed`, each discarded: their times and the
/// commit's bytes.
fn time_removes<C: MlsConfig>(group: &mut Group<C>, removed: u32, reps: usize) -> Result<(Vec<Duration>, usize), String> {
    let mut times = Vec::with_capacity(reps);
    let mut commit_bytes = 0;
    for _ in 0..reps {
        let start = Instant::now();
        let commit = group.commit_builder().remove_member(removed).map_err(err)?.build().map_err(err)?;
        times.push(start.elapsed());
        commit_bytes = commit.commit_message.to_bytes().map_err(err)?.len();
        group.clear_pending_commit();
    }
    Ok((times, commit_bytes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn copath_owners_cover_both_paths() {
        // 8 leaves, committer 0, removed 5: copath of 0 is {1}, {2,3}, {4..8}; of 5: {4}, {6,7}, {0..4}.
        assert_eq!(super::copath_owners(&[0, 5], &[0, 5], 8), vec![1, 2, 4, 6]);
    }
}
