//! The embedded registrar: twins, farms, nodes and uptime reports in the agent's own database.
//! The node uses it directly; `node-agent registrar serve` serves it to other nodes over HTTP
//! ([`super::server`]), where every write is signed.

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use super::*;
use crate::state::Store;

pub struct LocalRegistrar {
    store: Arc<Store>,
}

fn db(e: impl std::fmt::Display) -> RegistrarError {
    RegistrarError::Store(e.to_string())
}

fn now() -> i64 {
    crate::auth::now_unix()
}

/// Most uptime reports kept per node (the oldest are dropped from the registrar's history;
/// a node's own queue of unsent reports is separate).
const MAX_UPTIME_HISTORY: i64 = 10_000;

impl LocalRegistrar {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    pub fn twin_by_key_hex(&self, key_hex: &str) -> Result<Option<Twin>, RegistrarError> {
        self.store
            .with_conn(|c| {
                c.query_row(
                    "SELECT id, public_key FROM reg_twins WHERE public_key = ?1",
                    [key_hex],
                    |r| {
                        Ok(Twin {
                            id: r.get(0)?,
                            public_key: r.get(1)?,
                        })
                    },
                )
                .optional()
            })
            .map_err(db)
    }

    /// Registers a public key as a twin (idempotent).
    pub fn add_twin(&self, key: &PublicKey) -> Result<Twin, RegistrarError> {
        let key_hex = hex::encode(key.as_bytes());
        if let Some(t) = self.twin_by_key_hex(&key_hex)? {
            return Ok(t);
        }
        let id = self
            .store
            .with_conn(|c| {
                c.execute(
                    "INSERT INTO reg_twins(public_key, created_at) VALUES(?1, ?2)",
                    params![key_hex, now()],
                )?;
                Ok(c.last_insert_rowid())
            })
            .map_err(db)?;
        let id =
            u32::try_from(id).map_err(|_| RegistrarError::Refused("twin ids exhausted".into()))?;
        Ok(Twin {
            id,
            public_key: key_hex,
        })
    }

    pub fn add_farm(&self, owner_twin: TwinId, name: &str) -> Result<Farm, RegistrarError> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(RegistrarError::Refused(format!(
                "farm name {name:?} is not 1-64 of A-Z a-z 0-9 - _"
            )));
        }
        self.store
            .with_conn(|c| {
                if let Some(f) = c
                    .query_row(
                        "SELECT id, name, owner_twin FROM reg_farms WHERE name = ?1",
                        [name],
                        |r| {
                            Ok(Farm {
                                id: r.get(0)?,
                                name: r.get(1)?,
                                owner_twin: r.get(2)?,
                            })
                        },
                    )
                    .optional()?
                {
                    return Ok(Err(f));
                }
                c.execute(
                    "INSERT INTO reg_farms(name, owner_twin) VALUES(?1, ?2)",
                    params![name, owner_twin],
                )?;
                Ok(Ok(Farm {
                    id: c.last_insert_rowid() as u32,
                    name: name.to_string(),
                    owner_twin,
                }))
            })
            .map_err(db)?
            .or_else(|existing| {
                if existing.owner_twin == owner_twin {
                    Ok(existing)
                } else {
                    Err(RegistrarError::Refused(format!(
                        "farm {name} belongs to twin {}",
                        existing.owner_twin
                    )))
                }
            })
    }

    pub fn put_node(&self, twin: TwinId, info: &NodeInfo) -> Result<Node, RegistrarError> {
        if self.get_farm(info.farm_id)?.is_none() {
            return Err(RegistrarError::UnknownFarm(info.farm_id));
        }
        let text = serde_json::to_string(info).map_err(db)?;
        let id = self
            .store
            .with_conn(|c| {
                c.execute(
                    "INSERT INTO reg_nodes(twin_id, info, updated_at) VALUES(?1, ?2, ?3)
                     ON CONFLICT(twin_id) DO UPDATE SET info = ?2, updated_at = ?3",
                    params![twin, text, now()],
                )?;
                c.query_row("SELECT id FROM reg_nodes WHERE twin_id = ?1", [twin], |r| {
                    r.get::<_, u32>(0)
                })
            })
            .map_err(db)?;
        Ok(Node {
            id,
            twin_id: twin,
            info: info.clone(),
        })
    }

    pub fn get_twin(&self, id: TwinId) -> Result<Option<Twin>, RegistrarError> {
        self.store
            .with_conn(|c| {
                c.query_row(
                    "SELECT id, public_key FROM reg_twins WHERE id = ?1",
                    [id],
                    |r| {
                        Ok(Twin {
                            id: r.get(0)?,
                            public_key: r.get(1)?,
                        })
                    },
                )
                .optional()
            })
            .map_err(db)
    }

    pub fn get_farm(&self, id: FarmId) -> Result<Option<Farm>, RegistrarError> {
        self.store
            .with_conn(|c| {
                c.query_row(
                    "SELECT id, name, owner_twin FROM reg_farms WHERE id = ?1",
                    [id],
                    |r| {
                        Ok(Farm {
                            id: r.get(0)?,
                            name: r.get(1)?,
                            owner_twin: r.get(2)?,
                        })
                    },
                )
                .optional()
            })
            .map_err(db)
    }

    fn node_where(&self, sql: &str, arg: u32) -> Result<Option<Node>, RegistrarError> {
        let row = self
            .store
            .with_conn(|c| {
                c.query_row(sql, [arg], |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .optional()
            })
            .map_err(db)?;
        row.map(|(id, twin_id, info)| {
            let info = serde_json::from_str(&info).map_err(db)?;
            Ok(Node { id, twin_id, info })
        })
        .transpose()
    }

    pub fn get_node(&self, id: NodeId) -> Result<Option<Node>, RegistrarError> {
        self.node_where("SELECT id, twin_id, info FROM reg_nodes WHERE id = ?1", id)
    }

    pub fn get_node_by_twin(&self, twin: TwinId) -> Result<Option<Node>, RegistrarError> {
        self.node_where(
            "SELECT id, twin_id, info FROM reg_nodes WHERE twin_id = ?1",
            twin,
        )
    }

    /// Records an uptime report of `twin`'s node `node`.
    pub fn add_uptime(
        &self,
        twin: TwinId,
        node: NodeId,
        report: &UptimeReport,
    ) -> Result<(), RegistrarError> {
        match self.get_node(node)? {
            Some(n) if n.twin_id == twin => {}
            Some(_) => {
                return Err(RegistrarError::Refused(format!(
                    "node {node} is not twin {twin}'s"
                )))
            }
            None => return Err(RegistrarError::Refused(format!("unknown node {node}"))),
        }
        self.store
            .with_conn(|c| {
                c.execute(
                    "INSERT INTO reg_uptime(node_id, uptime, timestamp, received_at) VALUES(?1, ?2, ?3, ?4)",
                    params![node, report.uptime as i64, report.timestamp, now()],
                )?;
                c.execute(
                    "DELETE FROM reg_uptime WHERE node_id = ?1 AND rowid NOT IN
                     (SELECT rowid FROM reg_uptime WHERE node_id = ?1 ORDER BY rowid DESC LIMIT ?2)",
                    params![node, MAX_UPTIME_HISTORY],
                )
            })
            .map_err(db)?;
        Ok(())
    }

    pub fn uptime_reports(
        &self,
        node: NodeId,
        limit: u32,
    ) -> Result<Vec<UptimeReport>, RegistrarError> {
        self.store
            .with_conn(|c| {
                let mut stmt = c.prepare(
                    "SELECT uptime, timestamp FROM reg_uptime WHERE node_id = ?1 ORDER BY rowid DESC LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![node, limit], |r| {
                    Ok(UptimeReport { uptime: r.get::<_, i64>(0)? as u64, timestamp: r.get(1)? })
                })?;
                rows.collect()
            })
            .map_err(db)
    }

    fn check_key(&self, key: &KeyPair, twin: TwinId) -> Result<(), RegistrarError> {
        match self.get_twin(twin)? {
            Some(t) if t.public_key == key.public_hex() => Ok(()),
            _ => Err(RegistrarError::Refused(format!(
                "the key is not twin {twin}'s"
            ))),
        }
    }
}

#[async_trait]
impl Registrar for LocalRegistrar {
    async fn twin(&self, id: TwinId) -> Result<Option<Twin>, RegistrarError> {
        self.get_twin(id)
    }
    async fn twin_by_key(&self, key: &PublicKey) -> Result<Option<Twin>, RegistrarError> {
        self.twin_by_key_hex(&hex::encode(key.as_bytes()))
    }
    async fn create_twin(&self, key: &KeyPair) -> Result<Twin, RegistrarError> {
        self.add_twin(&key.public())
    }
    async fn farm(&self, id: FarmId) -> Result<Option<Farm>, RegistrarError> {
        self.get_farm(id)
    }
    async fn create_farm(
        &self,
        owner: &KeyPair,
        owner_twin: TwinId,
        name: &str,
    ) -> Result<Farm, RegistrarError> {
        self.check_key(owner, owner_twin)?;
        self.add_farm(owner_twin, name)
    }
    async fn node_by_twin(&self, twin: TwinId) -> Result<Option<Node>, RegistrarError> {
        self.get_node_by_twin(twin)
    }
    async fn register_node(
        &self,
        key: &KeyPair,
        twin: TwinId,
        info: &NodeInfo,
    ) -> Result<Node, RegistrarError> {
        self.check_key(key, twin)?;
        self.put_node(twin, info)
    }
    async fn report_uptime(
        &self,
        key: &KeyPair,
        twin: TwinId,
        node: NodeId,
        report: &UptimeReport,
    ) -> Result<(), RegistrarError> {
        self.check_key(key, twin)?;
        self.add_uptime(twin, node, report)
    }
}
