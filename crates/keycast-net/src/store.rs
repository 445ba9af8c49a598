//! The controller's log in redb: one record per key, written in one transaction per batch of
//! outputs, before any datagram that follows them is sent. Records hold key material (seeds,
//! snapshots): the file is created readable by its owner only, and with a [`DatabaseKey`]
//! (held apart from the database) those records are sealed, so a copy of the file alone opens
//! nothing.

use std::path::Path;

use keycast_core::protocol::{Record, Request};
use keycast_core::MemberId;
use redb::{Database, ReadableTable, TableDefinition};
use serde_json::{json, Value};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(String),
    #[error("a controller is already running on this directory (lock on {}): stop it first, or give this one a database of its own", .0.display())]
    AlreadyRunning(std::path::PathBuf),
    #[error("record {0} is corrupt")]
    Corrupt(u64),
    #[error("the database's secrets are sealed: give its key (database_key in the server config, or KEYCAST_DATABASE_KEY)")]
    Sealed,
    #[error("record {0} does not open under this database key (the wrong key, or a changed record)")]
    WrongKey(u64),
    #[error("database key: {0}")]
    Key(String),
}

/// First byte of a sealed record: then a 12-byte nonce and the AES-256-GCM sealed record.
const SEALED_TAG: u8 = 2;
const DATABASE_KEY_LABEL: &[u8] = b"keycast/v2 database record";

/// The key that seals the database's secret records (AES-256-GCM, a fresh random nonce per
/// record, the record's place as associated data so records cannot be moved).
pub struct DatabaseKey {
    key: aws_lc_rs::aead::LessSafeKey,
    /// Kept (zeroized on drop) so a controller restarted in the same process can reopen.
    bytes: zeroize::Zeroizing<[u8; 32]>,
}

impl Clone for DatabaseKey {
    fn clone(&self) -> DatabaseKey {
        DatabaseKey::from_bytes(&self.bytes)
    }
}

impl core::fmt::Debug for DatabaseKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("DatabaseKey(<redacted>)")
    }
}

impl DatabaseKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> DatabaseKey {
        let key = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, bytes).expect("32-byte key");
        DatabaseKey { key: aws_lc_rs::aead::LessSafeKey::new(key), bytes: zeroize::Zeroizing::new(*bytes) }
    }

    /// A fresh random key (for a group that lives in one process, as `keycast demo`'s).
    pub fn generate() -> DatabaseKey {
        DatabaseKey::from_bytes(&zeroize::Zeroizing::new(crate::entropy()))
    }

    /// 64 hexadecimal digits (surrounding white space ignored).
    pub fn from_hex(text: &str) -> Result<DatabaseKey, StoreError> {
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), &mut bytes[..]).map_err(|_| StoreError::Key("expected 64 hexadecimal digits".into()))?;
        Ok(DatabaseKey::from_bytes(&bytes))
    }

    /// Reads a key file written by [`DatabaseKey::create_file`].
    pub fn load(path: &Path) -> Result<DatabaseKey, StoreError> {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| StoreError::Key(format!("cannot read {}: {e}", path.display())))?,
        );
        DatabaseKey::from_hex(&text).map_err(|e| StoreError::Key(format!("{}: {e}", path.display())))
    }

    /// Writes a fresh random key to `path` (readable by its owner only; never overwrites).
    pub fn create_file(path: &Path) -> std::io::Result<()> {
        let bytes = zeroize::Zeroizing::new(crate::entropy());
        let text = zeroize::Zeroizing::new(hex::encode(&bytes[..]) + "\n");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        std::io::Write::write_all(&mut options.open(path)?, text.as_bytes())
    }

    fn aad(place: u64) -> aws_lc_rs::aead::Aad<[u8; DATABASE_KEY_LABEL.len() + 8]> {
        let mut aad = [0u8; DATABASE_KEY_LABEL.len() + 8];
        aad[..DATABASE_KEY_LABEL.len()].copy_from_slice(DATABASE_KEY_LABEL);
        aad[DATABASE_KEY_LABEL.len()..].copy_from_slice(&place.to_be_bytes());
        aws_lc_rs::aead::Aad::from(aad)
    }

    fn seal(&self, place: u64, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&crate::entropy()[..12]);
        let mut out = Vec::with_capacity(1 + 12 + plain.len() + 16);
        out.push(SEALED_TAG);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .key
            .seal_in_place_separate_tag(aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce), Self::aad(place), &mut out[13..])
            .expect("AES-256-GCM seals any record");
        out.extend_from_slice(tag.as_ref());
        out
    }

    fn open(&self, place: u64, sealed: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, StoreError> {
        let (nonce, body) = sealed.split_at_checked(12).ok_or(StoreError::Corrupt(place))?;
        let mut buffer = zeroize::Zeroizing::new(body.to_vec());
        let nonce = aws_lc_rs::aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| StoreError::Corrupt(place))?;
        let len = self.key.open_in_place(nonce, Self::aad(place), &mut buffer[..]).map_err(|_| StoreError::WrongKey(place))?.len();
        buffer.truncate(len);
        Ok(buffer)
    }
}

/// Records that hold secrets (seeds, keys): sealed when the store has a key.
fn is_secret(record: &Record) -> bool {
    matches!(record, Record::Genesis { .. } | Record::Batch { .. } | Record::Snapshot(_) | Record::SigningKey { .. } | Record::Merged(_) | Record::Split { .. } | Record::Switched { .. })
}

fn failed<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

pub struct Store {
    db: Database,
    next: u64,
    key: Option<DatabaseKey>,
}

impl Store {
    /// Opens (or creates) a log whose records are not sealed; see [`Store::open_sealed`].
    pub fn open(path: &Path) -> Result<(Store, Vec<Record>), StoreError> {
        Store::open_sealed(path, None)
    }

    /// Opens (or creates) the log and returns its records in order. With `key`, records that
    /// hold secrets are sealed under it from now on (and sealed ones are opened).
    pub fn open_sealed(path: &Path, key: Option<DatabaseKey>) -> Result<(Store, Vec<Record>), StoreError> {
        if !path.exists() {
            create_private(path).map_err(failed)?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::AlreadyRunning(path.to_path_buf()),
            e => failed(e),
        })?;
        let txn = db.begin_write().map_err(failed)?;
        let mut records = Vec::new();
        let mut next = 0;
        {
            let table = txn.open_table(LOG).map_err(failed)?;
            for entry in table.iter().map_err(failed)? {
                let (k, v) = entry.map_err(failed)?;
                next = k.value() + 1;
                // Heartbeat reservations of earlier versions: seqs now follow the clock.
                if v.value().starts_with(br#"{"heartbeats""#) {
                    continue;
                }
                let plain = match v.value().split_first() {
                    Some((&SEALED_TAG, sealed)) => key.as_ref().ok_or(StoreError::Sealed)?.open(k.value(), sealed)?,
                    _ => zeroize::Zeroizing::new(v.value().to_vec()),
                };
                records.push(decode(&plain).ok_or(StoreError::Corrupt(k.value()))?);
            }
        }
        txn.commit().map_err(failed)?;
        Ok((Store { db, next, key }, records))
    }

    /// A log over any redb backend: tests use one whose writes fail on demand.
    #[cfg(test)]
    pub(crate) fn with_backend(backend: impl redb::StorageBackend) -> Store {
        let db = redb::Builder::new().create_with_backend(backend).expect("a database on the test backend");
        Store { db, next: 0, key: None }
    }

    /// Appends `records` durably, all or none. A snapshot replaces every record before it, in
    /// the same transaction: a crash leaves either the old log or the snapshot and what follows.
    pub fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(failed)?;
        let mut compacted = false;
        {
            let mut table = txn.open_table(LOG).map_err(failed)?;
            for (i, r) in records.iter().enumerate() {
                let place = self.next + i as u64;
                let plain = encode(r);
                match &self.key {
                    Some(key) if is_secret(r) => table.insert(place, key.seal(place, &plain).as_slice()),
                    _ => table.insert(place, plain.as_slice()),
                }
                .map_err(failed)?;
                if matches!(r, Record::Snapshot(_)) {
                    table.retain_in(..place, |_, _| false).map_err(failed)?;
                    compacted = true;
                }
            }
        }
        txn.commit().map_err(failed)?;
        self.next += records.len() as u64;
        if compacted {
            // Freed pages may still hold the dropped records (old seeds): rewrite the file.
            self.db.compact().map_err(failed)?;
        }
        Ok(())
    }
}

fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop)
}

/// First byte of a snapshot's value (JSON records start with `{`).
const SNAPSHOT_TAG: u8 = 1;
/// First byte of a merge record's value (it holds the absorbed group's graph, in binary; 2 is `SEALED_TAG`).
const MERGE_TAG: u8 = 3;

fn tagged(tag: u8, body: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(1 + body.len()));
    out.push(tag);
    out.extend_from_slice(body);
    out
}

fn encode(record: &Record) -> zeroize::Zeroizing<Vec<u8>> {
    match record {
        Record::Snapshot(snapshot) => return tagged(SNAPSHOT_TAG, &snapshot.encode()),
        Record::Merged(merge) => return tagged(MERGE_TAG, &merge.encode()),
        _ => {}
    }
    let value = match record {
        Record::Genesis { created_ms, graph_seed, signing_seed, fixed } => {
            let mut genesis = json!({"created_ms": created_ms, "graph_seed": hex(graph_seed), "signing_seed": hex(signing_seed)});
            if let Some(fixed) = fixed {
                genesis["fixed"] = fixed_policy::encode(fixed);
            }
            json!({"genesis": genesis})
        }
        Record::Requested(Request::Leave { member }) => json!({"leave": member.0}),
        Record::Requested(Request::Evict { member }) => json!({"evict": member.0}),
        Record::Requested(Request::Join { member, identity }) => json!({"join": {"member": member.0, "identity": identity}}),
        Record::Batch { seq, epoch, activation, joins, leaves, seed } => json!({"batch": {
            "seq": seq, "epoch": epoch, "activation": activation,
            "joins": joins.iter().map(|(m, i)| json!([m.0, i])).collect::<Vec<_>>(),
            "leaves": leaves.iter().map(|m| m.0).collect::<Vec<_>>(),
            "seed": hex(seed),
        }}),
        Record::Revoked(identity) => json!({"revoked": identity}),
        Record::Readmitted(identity) => json!({"readmitted": identity}),
        Record::AclAdded(identity) => json!({"acl_added": identity}),
        Record::AclRemoved(identity) => json!({"acl_removed": identity}),
        Record::SeqFloor(n) => json!({"seq_floor": n}),
        Record::Snapshot(_) | Record::Merged(_) => unreachable!("encoded above"),
        Record::Split { seq, epoch, seed } => json!({"split": {"seq": seq, "epoch": epoch, "seed": hex(seed)}}),
        Record::HandedOff { to, seq, notice } => json!({"handed_off": {"to": to.0, "seq": seq, "notice": hex::encode(notice)}}),
        Record::SigningKey { change, seed } => json!({"signing_key": {"change": change, "seed": hex(seed)}}),
        Record::Switched { seq, epoch, to, seed } => {
            // id_bits 0 stands for the tree (a flat table has at least one ID bit).
            let id_bits = match to {
                keycast_core::protocol::SchemeTarget::Tree => 0,
                keycast_core::protocol::SchemeTarget::Flat { id_bits } => *id_bits,
            };
            json!({"switched": {"seq": seq, "epoch": epoch, "flat_id_bits": id_bits, "seed": hex(seed)}})
        }
    };
    zeroize::Zeroizing::new(serde_json::to_vec(&value).expect("JSON of plain values"))
}

fn decode(bytes: &[u8]) -> Option<Record> {
    if let Some(body) = bytes.strip_prefix(&[SNAPSHOT_TAG]) {
        return keycast_core::protocol::Snapshot::decode(body).ok().map(|s| Record::Snapshot(Box::new(s)));
    }
    if let Some(body) = bytes.strip_prefix(&[MERGE_TAG]) {
        return keycast_core::protocol::merge_state::MergeRecord::decode(body).ok().map(|m| Record::Merged(Box::new(m)));
    }
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let u = |v: &Value| v.as_u64();
    if let Some(split) = v.get("split") {
        return Some(Record::Split { seq: u(&split["seq"])?, epoch: u(&split["epoch"])?, seed: unhex(&split["seed"])? });
    }
    if let Some(w) = v.get("switched") {
        let to = match u8::try_from(u(&w["flat_id_bits"])?).ok()? {
            0 => keycast_core::protocol::SchemeTarget::Tree,
            id_bits => keycast_core::protocol::SchemeTarget::Flat { id_bits },
        };
        return Some(Record::Switched { seq: u(&w["seq"])?, epoch: u(&w["epoch"])?, to, seed: unhex(&w["seed"])? });
    }
    if let Some(h) = v.get("handed_off") {
        let notice = hex::decode(h["notice"].as_str()?).ok()?;
        return Some(Record::HandedOff { to: keycast_core::wire::GroupId(u(&h["to"])?), seq: u(&h["seq"])?, notice });
    }
    if let Some(g) = v.get("genesis") {
        return Some(Record::Genesis {
            created_ms: u(&g["created_ms"])?,
            graph_seed: unhex(&g["graph_seed"])?,
            signing_seed: unhex(&g["signing_seed"])?,
            fixed: match g.get("fixed") {
                Some(f) => Some(fixed_policy::decode(f)?),
                None => None,
            },
        });
    }
    if let Some(m) = v.get("leave") {
        return Some(Record::Requested(Request::Leave { member: MemberId(u(m)?) }));
    }
    if let Some(m) = v.get("evict") {
        return Some(Record::Requested(Request::Evict { member: MemberId(u(m)?) }));
    }
    if let Some(j) = v.get("join") {
        let identity = j["identity"].as_str()?.to_owned();
        return Some(Record::Requested(Request::Join { member: MemberId(u(&j["member"])?), identity }));
    }
    if let Some(b) = v.get("batch") {
        let joins = b["joins"]
            .as_array()?
            .iter()
            .map(|p| Some((MemberId(u(&p[0])?), p[1].as_str()?.to_owned())))
            .collect::<Option<Vec<_>>>()?;
        let leaves = b["leaves"].as_array()?.iter().map(|m| u(m).map(MemberId)).collect::<Option<Vec<_>>>()?;
        return Some(Record::Batch {
            seq: u(&b["seq"])?,
            epoch: u(&b["epoch"])?,
            activation: u(&b["activation"])?,
            joins,
            leaves,
            seed: unhex(&b["seed"])?,
        });
    }
    let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    if let Some(identity) = text("revoked") {
        return Some(Record::Revoked(identity));
    }
    if let Some(identity) = text("readmitted") {
        return Some(Record::Readmitted(identity));
    }
    if let Some(identity) = text("acl_added") {
        return Some(Record::AclAdded(identity));
    }
    if let Some(identity) = text("acl_removed") {
        return Some(Record::AclRemoved(identity));
    }
    if let Some(k) = v.get("signing_key") {
        return Some(Record::SigningKey { change: u(&k["change"])?, seed: unhex(&k["seed"])? });
    }
    if let Some(floor) = v.get("seq_floor").and_then(u) {
        return Some(Record::SeqFloor(floor));
    }
    None
}

/// The group's fixed settings in the genesis record.
mod fixed_policy {
    use keycast_core::protocol::FixedPolicy;
    use keycast_core::wire::GroupId;
    use keycast_core::{FlatIds, GraphConfig, JoinPolicy, Scheme};
    use serde_json::{json, Value};

    pub(super) fn encode(fixed: &FixedPolicy) -> Value {
        let scheme = match fixed.graph.scheme {
            Scheme::Star => json!({"star": {}}),
            Scheme::Tree { degree } => json!({"tree": {"degree": degree}}),
            Scheme::Flat { id_bits, ids } => {
                json!({"flat": {"id_bits": id_bits, "ids": if ids == FlatIds::Sequential { "sequential" } else { "member_id" }}})
            }
        };
        json!({"group": fixed.group.0, "scheme": scheme, "join_policy": fixed.graph.join_policy.name(), "epoch_ms": fixed.epoch_ms})
    }

    pub(super) fn decode(v: &Value) -> Option<FixedPolicy> {
        let s = &v["scheme"];
        let scheme = if s.get("star").is_some() {
            Scheme::Star
        } else if let Some(t) = s.get("tree") {
            Scheme::Tree { degree: u32::try_from(t["degree"].as_u64()?).ok()? }
        } else {
            let f = s.get("flat")?;
            let ids = match f["ids"].as_str()? {
                "sequential" => FlatIds::Sequential,
                "member_id" => FlatIds::FromMemberId,
                _ => return None,
            };
            Scheme::Flat { id_bits: u8::try_from(f["id_bits"].as_u64()?).ok()?, ids }
        };
        let join_policy = JoinPolicy::from_name(v["join_policy"].as_str()?)?;
        Some(FixedPolicy { group: GroupId(v["group"].as_u64()?), graph: GraphConfig { scheme, join_policy }, epoch_ms: v["epoch_ms"].as_u64()? })
    }
}

fn hex(bytes: &[u8; 32]) -> String {
    hex::encode(bytes)
}

fn unhex(v: &Value) -> Option<[u8; 32]> {
    hex::decode(v.as_str()?).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A merge record with a small absorbed group (its graph bytes are not imported here).
    fn merge_record() -> keycast_core::protocol::merge_state::MergeRecord {
        use keycast_core::protocol::merge_state::{MergeRecord, MergeSide, RightGroup};
        let fixed = keycast_core::protocol::FixedPolicy {
            group: keycast_core::wire::GroupId(8),
            graph: keycast_core::GraphConfig { scheme: keycast_core::Scheme::Tree { degree: 3 }, join_policy: keycast_core::JoinPolicy::NewVersion },
            epoch_ms: 100,
        };
        let right = RightGroup {
            fixed,
            signer: keycast_core::wire::VerifyingKey([7; 32]),
            created_ms: 1,
            rekey_seq: 4,
            next_member: 3,
            contact: keycast_core::protocol::merge::Contact {
                controller: "127.0.0.1:7000".parse().unwrap(),
                server_name: "right.keycast.test".parse().unwrap(),
                multicast: "239.255.0.9:7001".parse().unwrap(),
            },
        };
        let side = MergeSide {
            right,
            graph: zeroize::Zeroizing::new(vec![1, 2, 3]),
            members: vec![(MemberId(1), "right-1".into()), (MemberId(2), "right-2".into())],
            pending: vec![Request::Leave { member: MemberId(2) }],
        };
        MergeRecord { seq: 16, epoch: 17, offset: 9, seed: [6; 32], side }
    }

    #[test]
    fn records_survive_a_reopen_in_order() {
        let dir = std::env::temp_dir().join(format!("keycast-store-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let records = vec![
            Record::Genesis {
                created_ms: 5,
                graph_seed: [1; 32],
                signing_seed: [2; 32],
                fixed: Some(keycast_core::protocol::FixedPolicy {
                    group: keycast_core::wire::GroupId(3),
                    graph: keycast_core::GraphConfig {
                        scheme: keycast_core::Scheme::Flat { id_bits: 12, ids: keycast_core::FlatIds::Sequential },
                        join_policy: keycast_core::JoinPolicy::Revision,
                    },
                    epoch_ms: 250,
                }),
            },
            Record::Requested(Request::Leave { member: MemberId(3) }),
            Record::Batch {
                seq: 1,
                epoch: 2,
                activation: 3,
                joins: vec![(MemberId(4), "member-4".into())],
                leaves: vec![MemberId(3)],
                seed: [9; 32],
            },
            Record::Revoked("member-4".into()),
            Record::Readmitted("member-4".into()),
            Record::AclAdded("member-9".into()),
            Record::AclRemoved("member-9".into()),
            Record::SeqFloor(12),
            Record::SigningKey { change: 2, seed: [4; 32] },
            Record::Split { seq: 13, epoch: 14, seed: [5; 32] },
            Record::Switched { seq: 14, epoch: 15, to: keycast_core::protocol::SchemeTarget::Tree, seed: [0; 32] },
            Record::Switched { seq: 15, epoch: 16, to: keycast_core::protocol::SchemeTarget::Flat { id_bits: 6 }, seed: [6; 32] },
            Record::HandedOff { to: keycast_core::wire::GroupId(8), seq: 15, notice: vec![2, 19, 1] },
            Record::Merged(Box::new(merge_record())),
        ];
        {
            let (mut store, old) = Store::open(&dir).unwrap();
            assert!(old.is_empty());
            store.append(&records[..2]).unwrap();
            store.append(&records[2..]).unwrap();
        }
        let (_, read) = Store::open(&dir).unwrap();
        assert_eq!(read, records);
        std::fs::remove_file(&dir).unwrap();
    }
}
