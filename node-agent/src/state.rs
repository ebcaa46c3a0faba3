//! The agent's state, in SQLite (WAL, synchronous=FULL): what survives `kill -9` of the agent
//! and a reboot of the node.
//!
//! - `deployments`: the committed desired state, one row per (twin, deployment id). A deleted
//!   deployment stays as a tombstone with its last version, so an old signed document cannot be
//!   replayed to bring it back.
//! - `ops`: the journal. An operation's intent (with the previous document) is written in the
//!   same transaction that changes `deployments`, and removed when the operation has finished
//!   or been rolled back; an op found at start was interrupted and is finished or rolled back.
//! - `vms`: each VM's runtime record: the spec hash it runs, its vmm process (pid and start
//!   time, so a reused pid is not mistaken for it), state, restarts and backoff, last exit.
//! - `meta`: the node's twin and node ids, the boot id of the last run.
//! - `net_addrs`: addresses given to VM interfaces ([`crate::network::ipam`]).
//! - `reg_*`: the embedded registrar's tables; `pending_uptime`: reports not yet accepted.
//! - `seen_requests`: signatures of signed requests within the clock window, so a copy of
//!   one is a replay also after a restart ([`crate::auth::ReplayGuard`]).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::deployment::Deployment;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deployments(
    twin_id INTEGER NOT NULL, deployment_id INTEGER NOT NULL, version INTEGER NOT NULL,
    doc TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, updated_at INTEGER NOT NULL,
    PRIMARY KEY(twin_id, deployment_id));
CREATE TABLE IF NOT EXISTS ops(
    id INTEGER PRIMARY KEY AUTOINCREMENT, twin_id INTEGER NOT NULL, deployment_id INTEGER NOT NULL,
    kind TEXT NOT NULL, prev_doc TEXT, new_doc TEXT, started_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS vms(
    twin_id INTEGER NOT NULL, deployment_id INTEGER NOT NULL, name TEXT NOT NULL,
    spec_hash TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    pid INTEGER, pid_start INTEGER, restarts INTEGER NOT NULL DEFAULT 0,
    next_start_at INTEGER NOT NULL DEFAULT 0, last_exit TEXT, started_at INTEGER,
    PRIMARY KEY(twin_id, deployment_id, name));
CREATE TABLE IF NOT EXISTS reg_twins(
    id INTEGER PRIMARY KEY AUTOINCREMENT, public_key TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reg_farms(
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, owner_twin INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reg_nodes(
    id INTEGER PRIMARY KEY AUTOINCREMENT, twin_id INTEGER NOT NULL UNIQUE, info TEXT NOT NULL,
    updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reg_uptime(
    node_id INTEGER NOT NULL, uptime INTEGER NOT NULL, timestamp INTEGER NOT NULL,
    received_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS net_addrs(
    pool TEXT NOT NULL, host INTEGER NOT NULL, twin_id INTEGER NOT NULL,
    deployment_id INTEGER NOT NULL, vm TEXT NOT NULL, iface INTEGER NOT NULL,
    PRIMARY KEY(pool, host), UNIQUE(twin_id, deployment_id, vm, iface));
CREATE TABLE IF NOT EXISTS pending_uptime(
    id INTEGER PRIMARY KEY AUTOINCREMENT, uptime INTEGER NOT NULL, timestamp INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen_requests(
    signature BLOB PRIMARY KEY, timestamp INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_requests_by_time ON seen_requests(timestamp);
";

/// What [`Store::remember_request`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remembered {
    New,
    Seen,
    /// [`crate::auth::MAX_REMEMBERED`] signatures in the window already.
    Full,
}

/// The database. One connection behind a mutex: every statement is short, and one writer at a
/// time is what SQLite does anyway.
pub struct Store {
    conn: Mutex<Connection>,
}

/// An interrupted operation, as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub id: i64,
    pub twin_id: u32,
    pub deployment_id: u64,
    pub kind: OpKind,
    pub prev: Option<Deployment>,
    pub new: Option<Deployment>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Create,
    Update,
    Delete,
}

impl OpKind {
    fn as_str(self) -> &'static str {
        match self {
            OpKind::Create => "create",
            OpKind::Update => "update",
            OpKind::Delete => "delete",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "create" => Some(OpKind::Create),
            "update" => Some(OpKind::Update),
            "delete" => Some(OpKind::Delete),
            _ => None,
        }
    }
}

/// A deployment row.
#[derive(Debug, Clone)]
pub struct DeploymentRow {
    pub doc: Deployment,
    pub deleted: bool,
}

/// A VM's runtime state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Being started (image fetch, vmm start).
    Starting,
    Running,
    /// Ended, or could not start; waiting for its restart (backoff): `reason` says why.
    Restarting,
    /// Ended and not restarted (policy), cleanly.
    Exited,
    /// Ended and not restarted (policy), or could not start under `restart: never`:
    /// `reason` says why.
    Failed,
}

impl VmState {
    fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Restarting => "restarting",
            VmState::Exited => "exited",
            VmState::Failed => "failed",
        }
    }
    fn parse(s: &str) -> VmState {
        match s {
            "starting" => VmState::Starting,
            "running" => VmState::Running,
            "restarting" => VmState::Restarting,
            "exited" => VmState::Exited,
            _ => VmState::Failed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmRecord {
    pub twin_id: u32,
    pub deployment_id: u64,
    pub name: String,
    pub spec_hash: String,
    pub state: VmState,
    pub reason: String,
    pub pid: Option<i32>,
    pub pid_start: Option<u64>,
    pub restarts: u32,
    pub next_start_at: i64,
    /// The vmm's exit record of the last end (JSON), if any.
    pub last_exit: Option<String>,
    pub started_at: Option<i64>,
}

fn now() -> i64 {
    crate::auth::now_unix()
}

fn parse_doc(text: &str) -> rusqlite::Result<Deployment> {
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn doc_text(d: &Deployment) -> String {
    // Serializing a typed deployment cannot fail.
    serde_json::to_string(d).unwrap_or_default()
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA).context("creating the schema")?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in one transaction.
    pub fn with_tx<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    pub fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        Ok(f(&self.conn())?)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.with_conn(|c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        })
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.with_conn(|c| {
            c.execute(
                "INSERT INTO meta(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
                [key, value],
            )
        })?;
        Ok(())
    }

    // --- deployments and the journal ---

    pub fn deployment(&self, twin_id: u32, deployment_id: u64) -> Result<Option<DeploymentRow>> {
        self.with_conn(|c| deployment_in(c, twin_id, deployment_id))
    }

    /// Active deployments (of one twin, or all).
    pub fn deployments(&self, twin: Option<u32>) -> Result<Vec<Deployment>> {
        self.with_conn(|c| {
            let mut stmt = c.prepare(
                "SELECT doc FROM deployments WHERE deleted = 0 AND (?1 IS NULL OR twin_id = ?1) ORDER BY twin_id, deployment_id",
            )?;
            let rows = stmt.query_map([twin], |r| parse_doc(&r.get::<_, String>(0)?))?;
            rows.collect()
        })
    }

    /// Writes an operation's intent and the new desired state in one transaction; returns the
    /// op id.
    pub fn begin_op(
        &self,
        kind: OpKind,
        prev: Option<&Deployment>,
        new: Option<&Deployment>,
        target: (u32, u64),
    ) -> Result<i64> {
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO ops(twin_id, deployment_id, kind, prev_doc, new_doc, started_at) VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
                params![target.0, target.1, kind.as_str(), prev.map(doc_text), new.map(doc_text), now()],
            )?;
            let id = tx.last_insert_rowid();
            match (kind, new, prev) {
                (OpKind::Delete, _, Some(p)) => set_deleted(tx, p)?,
                (_, Some(n), _) => put_deployment(tx, n)?,
                _ => {}
            }
            Ok(id)
        })
    }

    /// Restores the state an op replaced (a create becomes a tombstone at its version, so it
    /// cannot be replayed) and ends the op, in one transaction.
    pub fn roll_back_op(&self, op: &Op) -> Result<()> {
        self.with_tx(|tx| {
            match (&op.prev, &op.new) {
                (Some(prev), _) => put_deployment(tx, prev)?,
                (None, Some(new)) => set_deleted(tx, new)?,
                (None, None) => {}
            }
            tx.execute("DELETE FROM ops WHERE id = ?1", [op.id])?;
            Ok(())
        })
    }

    pub fn end_op(&self, id: i64) -> Result<()> {
        self.with_conn(|c| c.execute("DELETE FROM ops WHERE id = ?1", [id]))?;
        Ok(())
    }

    pub fn ops(&self) -> Result<Vec<Op>> {
        self.with_conn(|c| {
            let mut stmt = c.prepare(
                "SELECT id, twin_id, deployment_id, kind, prev_doc, new_doc FROM ops ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| {
                let prev: Option<String> = r.get(4)?;
                let new: Option<String> = r.get(5)?;
                Ok(Op {
                    id: r.get(0)?,
                    twin_id: r.get(1)?,
                    deployment_id: r.get::<_, i64>(2)? as u64,
                    kind: OpKind::parse(&r.get::<_, String>(3)?).unwrap_or(OpKind::Update),
                    prev: prev.as_deref().map(parse_doc).transpose()?,
                    new: new.as_deref().map(parse_doc).transpose()?,
                })
            })?;
            rows.collect()
        })
    }

    // --- VMs ---

    pub fn vms(&self, target: Option<(u32, u64)>) -> Result<Vec<VmRecord>> {
        self.with_conn(|c| {
            let (t, d) = target.map(|(t, d)| (Some(t), Some(d as i64))).unwrap_or((None, None));
            let mut stmt = c.prepare(
                "SELECT twin_id, deployment_id, name, spec_hash, state, reason, pid, pid_start, restarts, next_start_at, last_exit, started_at
                 FROM vms WHERE (?1 IS NULL OR twin_id = ?1) AND (?2 IS NULL OR deployment_id = ?2) ORDER BY twin_id, deployment_id, name",
            )?;
            let rows = stmt.query_map(params![t, d], |r| {
                Ok(VmRecord {
                    twin_id: r.get(0)?,
                    deployment_id: r.get::<_, i64>(1)? as u64,
                    name: r.get(2)?,
                    spec_hash: r.get(3)?,
                    state: VmState::parse(&r.get::<_, String>(4)?),
                    reason: r.get(5)?,
                    pid: r.get(6)?,
                    pid_start: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
                    restarts: r.get(8)?,
                    next_start_at: r.get(9)?,
                    last_exit: r.get(10)?,
                    started_at: r.get(11)?,
                })
            })?;
            rows.collect()
        })
    }

    /// One VM's record.
    pub fn vm(&self, key: &crate::vmspec::VmKey) -> Result<Option<VmRecord>> {
        Ok(self
            .vms(Some((key.twin_id, key.deployment_id)))?
            .into_iter()
            .find(|r| r.name == key.name))
    }

    pub fn put_vm(&self, vm: &VmRecord) -> Result<()> {
        self.with_conn(|c| {
            c.execute(
                "INSERT INTO vms(twin_id, deployment_id, name, spec_hash, state, reason, pid, pid_start, restarts, next_start_at, last_exit, started_at)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT(twin_id, deployment_id, name) DO UPDATE SET spec_hash = ?4, state = ?5, reason = ?6, pid = ?7,
                 pid_start = ?8, restarts = ?9, next_start_at = ?10, last_exit = ?11, started_at = ?12",
                params![
                    vm.twin_id,
                    vm.deployment_id as i64,
                    vm.name,
                    vm.spec_hash,
                    vm.state.as_str(),
                    vm.reason,
                    vm.pid,
                    vm.pid_start.map(|v| v as i64),
                    vm.restarts,
                    vm.next_start_at,
                    vm.last_exit,
                    vm.started_at
                ],
            )
        })?;
        Ok(())
    }

    /// Records how a VM's last run ended (the vmm's exit record).
    pub fn set_last_exit(&self, key: &crate::vmspec::VmKey, exit: &str) -> Result<()> {
        self.with_conn(|c| {
            c.execute(
                "UPDATE vms SET last_exit = ?4 WHERE twin_id = ?1 AND deployment_id = ?2 AND name = ?3",
                params![key.twin_id, key.deployment_id as i64, key.name, exit],
            )
        })?;
        Ok(())
    }

    pub fn remove_vm(&self, twin_id: u32, deployment_id: u64, name: &str) -> Result<()> {
        self.with_conn(|c| {
            c.execute(
                "DELETE FROM vms WHERE twin_id = ?1 AND deployment_id = ?2 AND name = ?3",
                params![twin_id, deployment_id as i64, name],
            )
        })?;
        Ok(())
    }

    // --- signed requests seen ---

    /// Remembers a request signature with its timestamp, forgetting those whose timestamp
    /// is out of the clock window (a request with one is refused anyway), in one
    /// transaction.
    pub fn remember_request(
        &self,
        signature: &[u8; 64],
        timestamp: i64,
        now: i64,
    ) -> Result<Remembered> {
        self.with_tx(|tx| {
            tx.execute(
                "DELETE FROM seen_requests WHERE timestamp < ?1",
                [now.saturating_sub(crate::auth::MAX_SKEW_SECS)],
            )?;
            let seen: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM seen_requests WHERE signature = ?1)",
                [&signature[..]],
                |r| r.get(0),
            )?;
            if seen {
                return Ok(Remembered::Seen);
            }
            let count: i64 =
                tx.query_row("SELECT COUNT(*) FROM seen_requests", [], |r| r.get(0))?;
            if count >= crate::auth::MAX_REMEMBERED as i64 {
                return Ok(Remembered::Full);
            }
            tx.execute(
                "INSERT INTO seen_requests(signature, timestamp) VALUES(?1, ?2)",
                params![&signature[..], timestamp],
            )?;
            Ok(Remembered::New)
        })
    }

    // --- uptime reports waiting to be accepted ---

    pub fn queue_uptime(&self, uptime: u64, timestamp: i64) -> Result<()> {
        self.with_conn(|c| {
            c.execute(
                "INSERT INTO pending_uptime(uptime, timestamp) VALUES(?1, ?2)",
                params![uptime as i64, timestamp],
            )
        })?;
        Ok(())
    }

    pub fn pending_uptime(&self) -> Result<Vec<(i64, u64, i64)>> {
        self.with_conn(|c| {
            let mut stmt =
                c.prepare("SELECT id, uptime, timestamp FROM pending_uptime ORDER BY id")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
            })?;
            rows.collect()
        })
    }

    pub fn uptime_sent(&self, id: i64) -> Result<()> {
        self.with_conn(|c| c.execute("DELETE FROM pending_uptime WHERE id = ?1", [id]))?;
        Ok(())
    }
}

fn deployment_in(
    c: &Connection,
    twin_id: u32,
    deployment_id: u64,
) -> rusqlite::Result<Option<DeploymentRow>> {
    c.query_row(
        "SELECT doc, deleted FROM deployments WHERE twin_id = ?1 AND deployment_id = ?2",
        params![twin_id, deployment_id as i64],
        |r| {
            Ok(DeploymentRow {
                doc: parse_doc(&r.get::<_, String>(0)?)?,
                deleted: r.get::<_, i64>(1)? != 0,
            })
        },
    )
    .optional()
}

fn put_deployment(tx: &rusqlite::Transaction<'_>, d: &Deployment) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO deployments(twin_id, deployment_id, version, doc, deleted, updated_at) VALUES(?1, ?2, ?3, ?4, 0, ?5)
         ON CONFLICT(twin_id, deployment_id) DO UPDATE SET version = ?3, doc = ?4, deleted = 0, updated_at = ?5",
        params![d.twin_id, d.deployment_id as i64, d.version, doc_text(d), now()],
    )?;
    Ok(())
}

fn set_deleted(tx: &rusqlite::Transaction<'_>, d: &Deployment) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO deployments(twin_id, deployment_id, version, doc, deleted, updated_at) VALUES(?1, ?2, ?3, ?4, 1, ?5)
         ON CONFLICT(twin_id, deployment_id) DO UPDATE SET version = MAX(version, ?3), deleted = 1, updated_at = ?5",
        params![d.twin_id, d.deployment_id as i64, d.version, doc_text(d), now()],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployment::tests::sample;

    #[test]
    fn an_op_and_its_desired_state_commit_together_and_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let d0 = sample(1, 0);
        let id = store
            .begin_op(OpKind::Create, None, Some(&d0), (1, 1))
            .unwrap();
        assert_eq!(store.deployments(None).unwrap(), vec![d0.clone()]);
        // Reopen: the op survived (as after kill -9).
        drop(store);
        let store = Store::open(&dir.path().join("db")).unwrap();
        let ops = store.ops().unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].id, id);
        assert_eq!(ops[0].new.as_ref(), Some(&d0));
        store.roll_back_op(&ops[0]).unwrap();
        assert!(store.deployments(None).unwrap().is_empty());
        assert!(store.ops().unwrap().is_empty());
        // The rolled-back create left a tombstone with its version.
        let row = store.deployment(1, 1).unwrap().unwrap();
        assert!(row.deleted);
        assert_eq!(row.doc.version, 0);
    }

    #[test]
    fn an_update_rolls_back_to_the_previous_document() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let d0 = sample(1, 0);
        let id = store
            .begin_op(OpKind::Create, None, Some(&d0), (1, 1))
            .unwrap();
        store.end_op(id).unwrap();
        let d1 = sample(1, 1);
        store
            .begin_op(OpKind::Update, Some(&d0), Some(&d1), (1, 1))
            .unwrap();
        assert_eq!(store.deployments(Some(1)).unwrap()[0].version, 1);
        let op = store.ops().unwrap().remove(0);
        store.roll_back_op(&op).unwrap();
        assert_eq!(store.deployments(Some(1)).unwrap()[0].version, 0);
        assert!(store.deployments(Some(2)).unwrap().is_empty());
    }
}
