//! The controller's log in redb: one record per key, written in one transaction per batch of
//! outputs, before any datagram that follows them is sent. Records hold key material (seeds):
//! the file is created readable by its owner only.

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
    #[error("record {0} is corrupt")]
    Corrupt(u64),
}

fn failed<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

pub struct Store {
    db: Database,
    next: u64,
}

impl Store {
    /// Opens (or creates) the log and returns its records in order.
    pub fn open(path: &Path) -> Result<(Store, Vec<Record>), StoreError> {
        if !path.exists() {
            create_private(path).map_err(failed)?;
        }
        let db = Database::create(path).map_err(failed)?;
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
                records.push(decode(v.value()).ok_or(StoreError::Corrupt(k.value()))?);
            }
        }
        txn.commit().map_err(failed)?;
        Ok((Store { db, next }, records))
    }

    /// Appends `records` durably, all or none.
    pub fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(failed)?;
        {
            let mut table = txn.open_table(LOG).map_err(failed)?;
            for (i, r) in records.iter().enumerate() {
                table.insert(self.next + i as u64, encode(r).as_slice()).map_err(failed)?;
            }
        }
        txn.commit().map_err(failed)?;
        self.next += records.len() as u64;
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

fn encode(record: &Record) -> Vec<u8> {
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
    };
    serde_json::to_vec(&value).expect("JSON of plain values")
}

fn decode(bytes: &[u8]) -> Option<Record> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let u = |v: &Value| v.as_u64();
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
        let join_policy = match fixed.graph.join_policy {
            JoinPolicy::NewVersion => "version",
            JoinPolicy::Revision => "revision",
        };
        json!({"group": fixed.group.0, "scheme": scheme, "join_policy": join_policy, "epoch_ms": fixed.epoch_ms})
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
        let join_policy = match v["join_policy"].as_str()? {
            "version" => JoinPolicy::NewVersion,
            "revision" => JoinPolicy::Revision,
            _ => return None,
        };
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
