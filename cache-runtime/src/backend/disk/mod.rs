//! The disk backend: one SQLite file in WAL mode under `CACHE_DIR`, shared by every process of
//! a service on one machine, surviving restarts, bounded in bytes (`CACHE_MAX_SIZE`).
//!
//! It keeps the Redis store's data model, so the protocol is the same: entries, fill leases
//! (`K:lease`), invalidation stamps (`K:inv`) and function generations are rows of one table,
//! each with its own deadline, and each lease step is one `IMMEDIATE` transaction (the Redis
//! scripts' atomicity, across processes, from SQLite's file lock). Times are the machine's wall
//! clock in milliseconds, which every process on it shares.
//!
//! - Bounded: a row's bytes (key and value) are summed by triggers; a write that takes the sum
//!   past the bound evicts expired entries, then the entries closest to expiry (never a lease, a
//!   stamp or a generation, which protect against stale values).
//! - A corrupt or truncated file (SQLite says `SQLITE_CORRUPT` or `SQLITE_NOTADB`) is moved
//!   aside (`cache.sqlite3.corrupt-<ms>`) and a new one is created, under a lock file, by the
//!   first process that finds it; the others reopen the new one. The calls that failed ran
//!   their functions.
//! - A full disk fails the writes (counted and logged by the runtime; the functions run); reads
//!   go on.
//!
//! SQLite calls block the calling thread for microseconds (a write may wait for another
//! process's transaction, at most `op_timeout`, SQLite's busy timeout).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior};

use super::protocol::{Acquired, FillOutcome, LeaseAsk, Renewal};
use super::store::Store;
use crate::config::{CacheConfig, DiskTarget};
use crate::error::BackendError;

const FILE: &str = "cache.sqlite3";
const LOCK_FILE: &str = "cache.lock";
/// How many connections a process keeps (SQLite serves readers of one file concurrently).
const CONNECTIONS: usize = 4;

/// Row kinds: only entries are evicted for room.
const ENTRY: i64 = 0;
const PROTOCOL: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    db INTEGER NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    expires INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    PRIMARY KEY (db, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires);
CREATE TABLE IF NOT EXISTS size (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO size VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS kv_insert AFTER INSERT ON kv BEGIN
    UPDATE size SET bytes = bytes + length(NEW.key) + length(NEW.value) WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS kv_delete AFTER DELETE ON kv BEGIN
    UPDATE size SET bytes = bytes - length(OLD.key) - length(OLD.value) WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS kv_update AFTER UPDATE OF value ON kv BEGIN
    UPDATE size SET bytes = bytes - length(OLD.value) + length(NEW.value) WHERE id = 0;
END;
";

pub(crate) struct DiskStore {
    dir: PathBuf,
    max_bytes: u64,
    busy_timeout: Duration,
    /// Bumped each time the file is replaced (by this process): connections opened before reopen.
    epoch: AtomicU64,
    slots: Vec<Mutex<Slot>>,
    next: AtomicUsize,
    /// Writes since expired rows were last purged.
    writes: AtomicU64,
    /// The file this process opened (its inode), and when the path was last checked to still
    /// name it: another process that replaced a corrupt file is followed within a second.
    opened: AtomicU64,
    checked_at: AtomicU64,
}

#[derive(Default)]
struct Slot {
    conn: Option<Connection>,
    epoch: u64,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn deadline(ttl: Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
}

fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase))
}

fn lease_key(key: &str) -> String {
    format!("{key}:lease")
}

impl DiskStore {
    pub(crate) fn new(target: &DiskTarget, config: &CacheConfig) -> Self {
        let store = DiskStore {
            dir: target.dir.clone(),
            max_bytes: target.max_size,
            busy_timeout: config.op_timeout,
            epoch: AtomicU64::new(0),
            slots: (0..CONNECTIONS).map(|_| Mutex::default()).collect(),
            next: AtomicUsize::new(0),
            writes: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            checked_at: AtomicU64::new(0),
        };
        // Opened (and checked) now, so a bad directory is logged at start-up.
        if let Err(e) = store.call(|_| Ok(())) {
            tracing::error!(dir = %store.dir.display(), error = %e, "the disk cache cannot open its file; every call runs its function");
        }
        store
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The inode the path names now (0 if none, or not on Unix: replacements are then followed
    /// only when this process meets the corruption itself).
    fn file_id(&self) -> u64 {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(self.path()).map_or(0, |m| m.ino())
        }
        #[cfg(not(unix))]
        0
    }

    /// Whether the path still names the file this process opened (checked once a second); if
    /// not, every connection is reopened.
    fn follow_replaced_file(&self) {
        let now = now_ms() as u64;
        let last = self.checked_at.load(Relaxed);
        if now.saturating_sub(last) < 1000
            || self.checked_at.compare_exchange(last, now, Relaxed, Relaxed).is_err()
        {
            return;
        }
        let opened = self.opened.load(Relaxed);
        if opened != 0 && self.file_id() != opened {
            tracing::warn!(file = %self.path().display(), "the disk cache file was replaced by another process: reopening it");
            self.epoch.fetch_add(1, Relaxed);
        }
    }

    fn open(&self) -> Result<Connection, rusqlite::Error> {
        let conn = Connection::open(self.path())?;
        conn.busy_timeout(self.busy_timeout.max(Duration::from_millis(1)))?;
        // WAL: readers never wait for the writer; NORMAL: a commit is durable at the next
        // checkpoint (a power cut may lose the last writes, never corrupt the file): a cache.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        self.opened.store(self.file_id(), Relaxed);
        Ok(conn)
    }

    /// Runs `f` on one of this process's connections, (re)opening it as needed; a corrupt file
    /// is replaced and the call fails (its function runs).
    fn call<R>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<R>) -> Result<R, BackendError> {
        self.follow_replaced_file();
        let start = self.next.fetch_add(1, Relaxed);
        let mut slot = (0..CONNECTIONS)
            .find_map(|i| self.slots[(start + i) % CONNECTIONS].try_lock().ok())
            .unwrap_or_else(|| self.slots[start % CONNECTIONS].lock().unwrap_or_else(|e| e.into_inner()));
        let epoch = self.epoch.load(Relaxed);
        if slot.conn.is_none() || slot.epoch != epoch {
            slot.conn = None;
            if let Err(e) = std::fs::create_dir_all(&self.dir) {
                return Err(BackendError::Disk(format!("cannot create {}: {e}", self.dir.display())));
            }
            match self.open() {
                Ok(conn) => *slot = Slot { conn: Some(conn), epoch },
                Err(e) if is_corrupt(&e) => {
                    self.replace_corrupt_file(epoch);
                    return Err(BackendError::Disk(format!(
                        "the cache file was corrupt and is rebuilt: {e}"
                    )));
                }
                Err(e) => return Err(BackendError::Disk(e.to_string())),
            }
        }
        let conn = slot.conn.as_mut().expect("opened above");
        match f(conn) {
            Ok(r) => Ok(r),
            Err(e) if is_corrupt(&e) => {
                slot.conn = None;
                drop(slot);
                self.replace_corrupt_file(epoch);
                Err(BackendError::Disk(format!("the cache file was corrupt and is rebuilt: {e}")))
            }
            Err(e) => Err(BackendError::Disk(e.to_string())),
        }
    }

    /// Moves a corrupt file aside, once: under the lock file, and only if no other process (or
    /// connection of this one) has replaced it since this process opened it.
    fn replace_corrupt_file(&self, seen_epoch: u64) {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(LOCK_FILE));
        let Ok(lock) = lock else { return };
        if lock.lock().is_err() {
            return;
        }
        if self.epoch.load(Relaxed) == seen_epoch {
            // Another process may have rebuilt it already: a file that opens and checks is kept.
            let healthy = Connection::open(self.path())
                .and_then(|c| c.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)))
                .is_ok_and(|answer| answer == "ok");
            if !healthy {
                let aside = self.dir.join(format!("{FILE}.corrupt-{}", now_ms()));
                tracing::error!(file = %self.path().display(), aside = %aside.display(), "the disk cache file is corrupt: moved aside, a new one is created");
                let _ = std::fs::rename(self.path(), &aside);
                for suffix in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(self.dir.join(format!("{FILE}{suffix}")));
                }
            }
            self.epoch.fetch_add(1, Relaxed);
        }
        let _ = lock.unlock();
    }

    /// Keeps the sum of bytes under the bound: expired rows first, then the entries nearest to
    /// their expiry. Called inside a write transaction, after its write.
    fn make_room(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let bytes: i64 = tx.query_row("SELECT bytes FROM size WHERE id = 0", [], |r| r.get(0))?;
        let max = i64::try_from(self.max_bytes).unwrap_or(i64::MAX);
        if bytes <= max {
            if self.writes.fetch_add(1, Relaxed).is_multiple_of(1024) {
                tx.execute(
                    "DELETE FROM kv WHERE (db, key) IN (SELECT db, key FROM kv WHERE expires <= ?1 LIMIT 1000)",
                    params![now_ms()],
                )?;
            }
            return Ok(());
        }
        tx.execute("DELETE FROM kv WHERE expires <= ?1", params![now_ms()])?;
        loop {
            let bytes: i64 = tx.query_row("SELECT bytes FROM size WHERE id = 0", [], |r| r.get(0))?;
            if bytes <= max {
                return Ok(());
            }
            let removed = tx.execute(
                "DELETE FROM kv WHERE (db, key) IN (SELECT db, key FROM kv WHERE kind = ?1 ORDER BY expires LIMIT 64)",
                params![ENTRY],
            )?;
            if removed == 0 {
                return Ok(());
            }
        }
    }

    fn write<R>(&self, f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<R>) -> Result<R, BackendError> {
        self.call(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let r = f(&tx)?;
            self.make_room(&tx)?;
            tx.commit()?;
            Ok(r)
        })
    }
}

/// The live value of a row, or `None` (absent or expired).
fn live(conn: &Connection, db: u8, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.prepare_cached("SELECT value FROM kv WHERE db = ?1 AND key = ?2 AND expires > ?3")?
        .query_row(params![db, key, now_ms()], |r| r.get(0))
        .optional()
}

fn live_u64(conn: &Connection, db: u8, key: &str) -> rusqlite::Result<Option<u64>> {
    Ok(live(conn, db, key)?.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok()))
}

fn put(conn: &Connection, db: u8, key: &str, value: &[u8], expires: i64, kind: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO kv (db, key, value, expires, kind) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (db, key) DO UPDATE SET value = excluded.value, expires = excluded.expires, kind = excluded.kind",
    )?
    .execute(params![db, key, value, expires, kind])?;
    Ok(())
}

fn remove(conn: &Connection, db: u8, key: &str) -> rusqlite::Result<bool> {
    Ok(conn.prepare_cached("DELETE FROM kv WHERE db = ?1 AND key = ?2")?.execute(params![db, key])? > 0)
}

fn remove_live(conn: &Connection, db: u8, key: &str) -> rusqlite::Result<bool> {
    let live = live(conn, db, key)?.is_some();
    remove(conn, db, key)?;
    Ok(live)
}

fn stamp_of(conn: &Connection, db: u8, key: &str) -> rusqlite::Result<u64> {
    Ok(live_u64(conn, db, &crate::key::invalidation_key(key))?.unwrap_or(0))
}

impl Store for DiskStore {
    fn kind(&self) -> &'static str {
        "disk"
    }

    async fn get_with<T>(
        &self,
        db: u8,
        key: &str,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Option<T>, BackendError> {
        self.call(|conn| Ok(live(conn, db, key)?.map(|v| decode(&v))))
    }

    async fn get_with_generation<T>(
        &self,
        db: u8,
        key: &str,
        generation_key: &str,
        generation_life: Duration,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<(Option<T>, Option<u64>), BackendError> {
        let found = self.call(|conn| {
            let entry = live(conn, db, key)?.map(|v| decode(&v));
            let generation: Option<(Vec<u8>, i64)> = conn
                .prepare_cached("SELECT value, expires FROM kv WHERE db = ?1 AND key = ?2 AND expires > ?3")?
                .query_row(params![db, generation_key, now_ms()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            Ok((entry, generation))
        })?;
        let (entry, generation) = found;
        let life = i64::try_from(generation_life.as_millis()).unwrap_or(i64::MAX);
        let generation = match generation {
            Some((g, expires)) => {
                let g = std::str::from_utf8(&g).ok().and_then(|g| g.parse().ok()).unwrap_or(u64::MAX);
                if expires.saturating_sub(now_ms()) < life / 2 {
                    self.write(|tx| {
                        tx.execute(
                            "UPDATE kv SET expires = ?3 WHERE db = ?1 AND key = ?2",
                            params![db, generation_key, deadline(generation_life)],
                        )
                    })?;
                }
                g
            }
            // Missing (never written, evicted, expired): recreated as the clock, so every entry
            // written before it is stale, as on Redis.
            None => self.write(|tx| {
                if let Some(g) = live_u64(tx, db, generation_key)? {
                    return Ok(g);
                }
                let g = now_us();
                put(tx, db, generation_key, g.to_string().as_bytes(), deadline(generation_life), PROTOCOL)?;
                Ok(g)
            })?,
        };
        Ok((entry, Some(generation)))
    }

    async fn get_many_with<T>(
        &self,
        db: u8,
        keys: &[String],
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<Option<T>>, BackendError> {
        self.call(|conn| keys.iter().map(|k| Ok(live(conn, db, k)?.map(|v| decode(&v)))).collect())
    }

    async fn set(&self, db: u8, key: &str, value: &[u8], ttl: Duration) -> Result<(), BackendError> {
        self.write(|tx| put(tx, db, key, value, deadline(ttl), ENTRY))
    }

    async fn delete(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        self.write(|tx| remove_live(tx, db, key))
    }

    async fn set_many(&self, db: u8, items: &[(String, Vec<u8>)], ttl: Duration) -> Result<(), BackendError> {
        let expires = deadline(ttl);
        self.write(|tx| items.iter().try_for_each(|(k, v)| put(tx, db, k, v, expires, ENTRY)))
    }

    async fn delete_many(&self, db: u8, keys: &[String]) -> Result<u64, BackendError> {
        self.write(|tx| keys.iter().try_fold(0, |n, k| Ok(n + u64::from(remove_live(tx, db, k)?))))
    }

    async fn exists(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        self.call(|conn| Ok(live(conn, db, key)?.is_some()))
    }

    async fn expire(&self, db: u8, key: &str, ttl: Duration) -> Result<bool, BackendError> {
        self.write(|tx| {
            Ok(tx.execute(
                "UPDATE kv SET expires = ?4 WHERE db = ?1 AND key = ?2 AND expires > ?3",
                params![db, key, now_ms(), deadline(ttl)],
            )? > 0)
        })
    }

    async fn ttl(&self, db: u8, key: &str) -> Result<Option<Duration>, BackendError> {
        self.call(|conn| {
            let now = now_ms();
            let expires: Option<i64> = conn
                .prepare_cached("SELECT expires FROM kv WHERE db = ?1 AND key = ?2 AND expires > ?3")?
                .query_row(params![db, key, now], |r| r.get(0))
                .optional()?;
            Ok(expires.map(|e| Duration::from_millis(u64::try_from(e - now).unwrap_or(0))))
        })
    }

    async fn clear(&self, db: u8, prefix: &str) -> Result<u64, BackendError> {
        // Every key from `prefix:` up to `prefix;` (`;` follows `:`), and nothing else.
        let (from, to) = (format!("{prefix}:"), format!("{prefix};"));
        self.write(|tx| {
            let live = tx.query_row(
                "SELECT count(*) FROM kv WHERE db = ?1 AND key >= ?2 AND key < ?3 AND kind = ?4 AND expires > ?5",
                params![db, from, to, ENTRY, now_ms()],
                |r| r.get::<_, u64>(0),
            )?;
            tx.execute("DELETE FROM kv WHERE db = ?1 AND key >= ?2 AND key < ?3", params![db, from, to])?;
            Ok(live)
        })
    }

    async fn ping(&self, _db: u8) -> Result<(), BackendError> {
        self.call(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))
    }

    async fn acquire<T>(
        &self,
        db: u8,
        key: &str,
        ask: LeaseAsk,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<Acquired<T>, BackendError> {
        let answer = self.write(|tx| {
            if let Some(v) = live(tx, db, key)? {
                if crate::value::generation_of(&v).is_some_and(|g| g >= ask.min_generation) {
                    return Ok(Err(v));
                }
            }
            let lease = lease_key(key);
            if live(tx, db, &lease)?.is_some() {
                return Ok(Ok(None));
            }
            put(tx, db, &lease, ask.token.to_string().as_bytes(), deadline(ask.ttl), PROTOCOL)?;
            Ok(Ok(Some(stamp_of(tx, db, key)?)))
        })?;
        Ok(match answer {
            Err(value) => Acquired::Value(decode(&value)),
            Ok(Some(stamp)) => Acquired::Granted(stamp),
            Ok(None) => Acquired::Busy,
        })
    }

    async fn renew(
        &self,
        db: u8,
        key: &str,
        token: u64,
        grant: u64,
        lease: Duration,
    ) -> Result<Renewal, BackendError> {
        self.write(|tx| {
            let lease_key = lease_key(key);
            if live_u64(tx, db, &lease_key)? == Some(token) {
                tx.execute(
                    "UPDATE kv SET expires = ?3 WHERE db = ?1 AND key = ?2",
                    params![db, lease_key, deadline(lease)],
                )?;
                return Ok(Renewal::Renewed);
            }
            if stamp_of(tx, db, key)? != grant {
                return Ok(Renewal::Revoked);
            }
            Ok(Renewal::Lost)
        })
    }

    async fn fill(
        &self,
        db: u8,
        key: &str,
        lease: (u64, u64),
        value: &[u8],
        ttl: Duration,
    ) -> Result<FillOutcome, BackendError> {
        let (token, grant) = lease;
        self.write(|tx| {
            let lease_key = lease_key(key);
            let held = live_u64(tx, db, &lease_key)?;
            if held == Some(token) {
                put(tx, db, key, value, deadline(ttl), ENTRY)?;
                remove(tx, db, &lease_key)?;
                return Ok(FillOutcome::Written);
            }
            if stamp_of(tx, db, key)? != grant {
                return Ok(FillOutcome::Revoked);
            }
            if held.is_none() {
                put(tx, db, key, value, deadline(ttl), ENTRY)?;
                return Ok(FillOutcome::Written);
            }
            Ok(FillOutcome::Superseded)
        })
    }

    async fn release(&self, db: u8, key: &str, token: u64) -> Result<(), BackendError> {
        self.write(|tx| {
            let lease_key = lease_key(key);
            if live_u64(tx, db, &lease_key)? == Some(token) {
                remove(tx, db, &lease_key)?;
            }
            Ok(())
        })
    }

    async fn invalidate(&self, db: u8, key: &str, stamp_life: Duration) -> Result<(), BackendError> {
        self.write(|tx| {
            remove(tx, db, key)?;
            remove(tx, db, &lease_key(key))?;
            let stamp = super::unique();
            put(
                tx,
                db,
                &crate::key::invalidation_key(key),
                stamp.to_string().as_bytes(),
                deadline(stamp_life),
                PROTOCOL,
            )
        })
    }

    async fn bump_generation(
        &self,
        db: u8,
        generation_key: &str,
        life: Duration,
    ) -> Result<Option<u64>, BackendError> {
        self.write(|tx| {
            let current = live_u64(tx, db, generation_key)?.unwrap_or(0);
            let g = now_us().max(current.saturating_add(1));
            put(tx, db, generation_key, g.to_string().as_bytes(), deadline(life), PROTOCOL)?;
            Ok(Some(g))
        })
    }
}
