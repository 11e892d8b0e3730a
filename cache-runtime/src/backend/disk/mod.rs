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
//! - A full disk fails the writes (counted; logged once, then at most every 10 s, while it
//!   fails; the functions run); reads go on.
//!
//! SQLite calls block the calling thread for microseconds (a write may wait for another
//! process's transaction, at most `op_timeout`, SQLite's busy timeout).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior};

use super::breaker::Breaker;
use super::protocol::{Acquired, BackendInfo, FillOutcome, LeaseAsk, Renewal};
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
CREATE TABLE IF NOT EXISTS file (id INTEGER PRIMARY KEY CHECK (id = 0), token INTEGER NOT NULL);
INSERT OR IGNORE INTO file VALUES (0, 1 + abs(random() % 9000000000000000000));
CREATE TRIGGER IF NOT EXISTS kv_insert AFTER INSERT ON kv BEGIN
    UPDATE size SET bytes = bytes + octet_length(NEW.key) + length(NEW.value) WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS kv_delete AFTER DELETE ON kv BEGIN
    UPDATE size SET bytes = bytes - octet_length(OLD.key) - length(OLD.value) WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS kv_update AFTER UPDATE OF value ON kv BEGIN
    UPDATE size SET bytes = bytes - length(OLD.value) + length(NEW.value) WHERE id = 0;
END;
";

pub(crate) struct DiskStore {
    dir: PathBuf,
    max_bytes: u64,
    busy_timeout: Duration,
    slots: Vec<Mutex<Slot>>,
    next: AtomicUsize,
    /// Writes since expired rows were last purged.
    writes: AtomicU64,
    /// Raised when this process meets a corrupt file: every connection reopens at its next call,
    /// not a second later.
    epoch: AtomicU64,
    /// The failure log (a breaker that never opens).
    log: Breaker,
}

#[derive(Default)]
struct Slot {
    conn: Option<Connection>,
    /// The file it opened (its inode), and when the path was last checked to still name it: a
    /// file another process replaced is followed within a second.
    file: u64,
    checked_at: i64,
    epoch: u64,
}

/// Why a connection could not be opened.
enum OpenError {
    /// The file at the path (this inode) is not a usable database.
    Corrupt(rusqlite::Error, u64),
    Other(String),
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

fn corrupt(e: &rusqlite::Error) -> BackendError {
    BackendError::Disk(format!("the cache file is corrupt and is being rebuilt: {e}"))
}

impl DiskStore {
    pub(crate) fn new(target: &DiskTarget, config: &CacheConfig) -> Self {
        let store = DiskStore {
            dir: target.dir.clone(),
            max_bytes: target.max_size,
            busy_timeout: config.op_timeout,
            slots: (0..CONNECTIONS).map(|_| Mutex::default()).collect(),
            next: AtomicUsize::new(0),
            writes: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            log: Breaker::new(0, Duration::ZERO, format!("disk {}", target.dir.display())),
        };
        // Opened (and checked) now, so a bad directory is logged at start-up.
        if let Err(e) = store.on_connection(|_| Ok(())) {
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

    fn lock_file(&self) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(self.dir.join(LOCK_FILE))
    }

    /// A connection to the file the path names, opened under a shared lock of the lock file (a
    /// replacement, which takes it exclusively, never runs while a process opens the file), and
    /// the file's inode.
    fn open(&self) -> Result<(Connection, u64), OpenError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| OpenError::Other(format!("cannot create {}: {e}", self.dir.display())))?;
        let lock =
            self.lock_file().map_err(|e| OpenError::Other(format!("cannot open the lock file: {e}")))?;
        let waited = std::time::Instant::now();
        while lock.try_lock_shared().is_err() {
            if waited.elapsed() >= self.busy_timeout {
                return Err(OpenError::Other("the cache file is being replaced by another process".into()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let file = self.file_id();
        let opened = (|| {
            let conn = Connection::open(self.path())?;
            conn.busy_timeout(self.busy_timeout.max(Duration::from_millis(1)))?;
            // WAL: readers never wait for the writer; NORMAL: a commit is durable at the next
            // checkpoint (a power cut may lose the last writes, never corrupt the file): a cache.
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            // The schema's statements write: only a new file needs them (a connection opened
            // while another process writes would otherwise wait for it).
            let made: bool = conn.query_row(
                "SELECT count(*) = 1 FROM sqlite_master WHERE type = 'table' AND name = 'file'",
                [],
                |r| r.get(0),
            )?;
            if !made {
                conn.execute_batch(SCHEMA)?;
            }
            Ok(conn)
        })();
        let file = if file == 0 { self.file_id() } else { file };
        let _ = lock.unlock();
        match opened {
            Ok(conn) => Ok((conn, file)),
            Err(e) if is_corrupt(&e) => Err(OpenError::Corrupt(e, file)),
            Err(e) => Err(OpenError::Other(e.to_string())),
        }
    }

    /// [`Self::on_connection`], its failure logged as the Redis store's are (one `warn` when the
    /// file starts failing, at most one per 10 s; one `info` when it answers again), through a
    /// breaker that never opens: a failing file answers at once.
    fn call<R>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<R>) -> Result<R, BackendError> {
        match self.log.admit() {
            Ok(permit) => {
                let result = self.on_connection(f);
                permit.record(&result);
                result
            }
            Err(never) => Err(never),
        }
    }

    /// Runs `f` on one of this process's connections, (re)opening it as needed; a corrupt file
    /// is replaced and the call fails (its function runs).
    fn on_connection<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R>,
    ) -> Result<R, BackendError> {
        let start = self.next.fetch_add(1, Relaxed);
        let mut slot = (0..CONNECTIONS)
            .find_map(|i| self.slots[(start + i) % CONNECTIONS].try_lock().ok())
            .unwrap_or_else(|| self.slots[start % CONNECTIONS].lock().unwrap_or_else(|e| e.into_inner()));
        let now = now_ms();
        let epoch = self.epoch.load(Relaxed);
        if slot.epoch != epoch {
            slot.conn = None;
        }
        if slot.conn.is_some() && now.saturating_sub(slot.checked_at) >= 1000 {
            slot.checked_at = now;
            if self.file_id() != slot.file {
                tracing::debug!(file = %self.path().display(), "the disk cache file was replaced by another process: reopening it");
                slot.conn = None;
            }
        }
        if slot.conn.is_none() {
            match self.open() {
                Ok((conn, file)) => *slot = Slot { conn: Some(conn), file, checked_at: now, epoch },
                Err(OpenError::Corrupt(e, file)) => {
                    drop(slot);
                    self.replace_corrupt_file(file);
                    return Err(corrupt(&e));
                }
                Err(OpenError::Other(e)) => return Err(BackendError::Disk(e)),
            }
        }
        let Slot { conn: Some(conn), file, .. } = &mut *slot else { unreachable!("opened above") };
        match f(conn) {
            Ok(r) => Ok(r),
            Err(e) if is_corrupt(&e) => {
                let file = *file;
                slot.conn = None;
                drop(slot);
                self.replace_corrupt_file(file);
                Err(corrupt(&e))
            }
            Err(e) => {
                // A connection left inside a transaction is not reused.
                if !conn.is_autocommit() {
                    slot.conn = None;
                }
                Err(BackendError::Disk(e.to_string()))
            }
        }
    }

    /// Moves the corrupt file (this inode) aside, so that the next open creates a new one: under
    /// the lock file held exclusively (no process is opening it meanwhile; if one is, the next
    /// call that meets the damage tries again), and only if the path still names that file (no
    /// other process replaced it already).
    fn replace_corrupt_file(&self, file: u64) {
        // This process's other connections are on the damaged file too.
        self.epoch.fetch_add(1, Relaxed);
        let Ok(lock) = self.lock_file() else { return };
        if lock.try_lock().is_err() {
            return;
        }
        if file != 0 && self.file_id() == file {
            let aside = self.dir.join(format!("{FILE}.corrupt-{}", now_ms()));
            tracing::error!(file = %self.path().display(), aside = %aside.display(), "the disk cache file is corrupt: moved aside, a new one is created");
            if std::fs::rename(self.path(), &aside).is_ok() {
                for suffix in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(self.dir.join(format!("{FILE}{suffix}")));
                }
            }
        }
        let _ = lock.unlock();
    }

    /// An entry of more than half the bound is not stored (it would evict everything else).
    fn fits(&self, key: &str, value: &[u8]) -> Result<(), BackendError> {
        let size = (key.len() + value.len()) as u64;
        if size > self.max_bytes / 2 {
            return Err(BackendError::Disk(format!(
                "an entry of {size} bytes is more than half of CACHE_MAX_SIZE ({} bytes): not stored",
                self.max_bytes
            )));
        }
        Ok(())
    }

    /// Keeps the sum of bytes under the bound: expired rows first, then the entries nearest to
    /// their expiry. Called inside a write transaction, after its write.
    fn make_room(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let bytes = stored_bytes(tx)?;
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
        // Down to 90 % of the bound, so that the next writes do not evict again at once: the
        // entries nearest to expiry whose bytes, added up in that order, reach the excess.
        let target = max - max / 10;
        loop {
            let bytes = stored_bytes(tx)?;
            if bytes <= max {
                return Ok(());
            }
            let removed = tx.execute(
                "DELETE FROM kv WHERE (db, key) IN (
                    SELECT db, key FROM (
                        SELECT db, key, octet_length(key) + length(value) AS size,
                               sum(octet_length(key) + length(value)) OVER (ORDER BY expires, db, key) AS freed
                        FROM (SELECT db, key, value, expires FROM kv WHERE kind = ?1 ORDER BY expires LIMIT 1024)
                    ) WHERE freed - size < ?2
                )",
                params![ENTRY, bytes - target],
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

/// The bytes of keys and values stored, as the triggers keep the sum (asked on every write).
fn stored_bytes(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT bytes FROM size WHERE id = 0")?.query_row([], |r| r.get(0))
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

fn set_deadline(conn: &Connection, db: u8, key: &str, expires: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE kv SET expires = ?3 WHERE db = ?1 AND key = ?2")?
        .execute(params![db, key, expires])?;
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

/// The key's invalidation stamp; without one, this file's token (random, written when the file
/// was created), so that a lease granted in a file that was since replaced (its stamps lost with
/// it) is never taken for one granted in this file: its fill is refused.
fn stamp_of(conn: &Connection, db: u8, key: &str) -> rusqlite::Result<u64> {
    match live_u64(conn, db, &crate::key::invalidation_key(key))? {
        Some(stamp) => Ok(stamp),
        None => conn
            .prepare_cached("SELECT token FROM file WHERE id = 0")?
            .query_row([], |r| r.get::<_, i64>(0))
            .map(|t| t as u64),
    }
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
                // A failed extension (a full disk) does not fail the read: it is tried again on
                // the next refresh, long before the key expires.
                if expires.saturating_sub(now_ms()) < life / 2 {
                    let extended =
                        self.write(|tx| set_deadline(tx, db, generation_key, deadline(generation_life)));
                    if let Err(e) = extended {
                        tracing::debug!(error = %e, "the function's generation could not be extended");
                    }
                }
                Some(g)
            }
            // Missing (never written, evicted, expired): recreated as the clock, so every entry
            // written before it is stale, as on Redis. If it cannot be written (a full disk), the
            // generation this process knows is used: the read is still answered.
            None => self
                .write(|tx| {
                    if let Some(g) = live_u64(tx, db, generation_key)? {
                        return Ok(g);
                    }
                    let g = now_us();
                    put(
                        tx,
                        db,
                        generation_key,
                        g.to_string().as_bytes(),
                        deadline(generation_life),
                        PROTOCOL,
                    )?;
                    Ok(g)
                })
                .ok(),
        };
        Ok((entry, generation))
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
        self.fits(key, value)?;
        self.write(|tx| put(tx, db, key, value, deadline(ttl), ENTRY))
    }

    async fn delete(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        self.write(|tx| remove_live(tx, db, key))
    }

    async fn set_many(&self, db: u8, items: &[(String, Vec<u8>)], ttl: Duration) -> Result<(), BackendError> {
        let expires = deadline(ttl);
        items.iter().try_for_each(|(k, v)| self.fits(k, v))?;
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

    async fn info(&self) -> Result<BackendInfo, BackendError> {
        self.call(|conn| {
            let used: i64 = conn.query_row(
                "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                [],
                |row| row.get(0),
            )?;
            let mut info = BackendInfo {
                version: Some(format!("SQLite {}", rusqlite::version())),
                used_bytes: Some(u64::try_from(used).unwrap_or(0)),
                ..BackendInfo::default()
            };
            let mut counts =
                conn.prepare("SELECT db, count(*) FROM kv WHERE kind = ?1 AND expires > ?2 GROUP BY db")?;
            let rows = counts.query_map(params![ENTRY, now_ms()], |row| {
                Ok((row.get::<_, u8>(0)?, row.get::<_, u64>(1)?))
            })?;
            for row in rows {
                let (db, keys) = row?;
                info.keys.insert(db, keys);
            }
            Ok(info)
        })
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
            // A key without a stamp is given one of the grant's own (see `protocol::grant_stamp`).
            let stamp_key = crate::key::invalidation_key(key);
            let stamp = match live_u64(tx, db, &stamp_key)? {
                Some(stamp) => stamp,
                None => {
                    let stamp = super::protocol::grant_stamp();
                    let life = deadline(super::protocol::stamp_life(ask.ttl));
                    put(tx, db, &stamp_key, stamp.to_string().as_bytes(), life, PROTOCOL)?;
                    stamp
                }
            };
            Ok(Ok(Some(stamp)))
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
                set_deadline(tx, db, &lease_key, deadline(lease))?;
                // A stamp the grant set (even) lives on with the lease, as on Redis; an
                // invalidation's is left to expire.
                let stamp_key = crate::key::invalidation_key(key);
                let ours = live_u64(tx, db, &stamp_key)?.is_none_or(|stamp| stamp == grant);
                if grant.is_multiple_of(2) && ours {
                    let life = deadline(super::protocol::stamp_life(lease));
                    put(tx, db, &stamp_key, grant.to_string().as_bytes(), life, PROTOCOL)?;
                }
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
        self.fits(key, value)?;
        self.write(|tx| {
            let lease_key = lease_key(key);
            let held = live_u64(tx, db, &lease_key)?;
            if held == Some(token) {
                put(tx, db, key, value, deadline(ttl), ENTRY)?;
                remove(tx, db, &lease_key)?;
                // The stamp its grant set, if still there, was there for the lease (as on Redis).
                let stamp_key = crate::key::invalidation_key(key);
                if grant.is_multiple_of(2) && live_u64(tx, db, &stamp_key)? == Some(grant) {
                    remove(tx, db, &stamp_key)?;
                }
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
            let stamp = super::protocol::invalidation_stamp();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &std::path::Path, max: u64) -> DiskStore {
        let target = DiskTarget::new(dir).with_max_size(max);
        DiskStore::new(&target, &CacheConfig::disk(dir))
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn bounded_in_bytes_nearest_expiry_first_protocol_rows_kept() {
        let dir = tempfile::tempdir().unwrap();
        let max = 64 * 1024;
        let s = store(dir.path(), max);
        block_on(async {
            let grant = match Store::acquire(&s, 5, "held", ask(), |_| ()).await.unwrap() {
                Acquired::Granted(g) => g,
                _ => panic!("the lease is free"),
            };
            assert_ne!(grant, 0, "without a stamp, one of the grant's own");
            let value = vec![7u8; 1000];
            // Later keys expire later: the earliest are the nearest to expiry.
            for i in 0..200u64 {
                Store::set(&s, 5, &format!("k{i:03}"), &value, Duration::from_secs(100 + i)).await.unwrap();
            }
            let stored: i64 = s.call(|c| c.query_row("SELECT bytes FROM size", [], |r| r.get(0))).unwrap();
            let summed: i64 = s
                .call(|c| {
                    c.query_row("SELECT sum(octet_length(key) + length(value)) FROM kv", [], |r| r.get(0))
                })
                .unwrap();
            assert_eq!(stored, summed, "the triggers keep the sum");
            assert!(stored as u64 <= max, "{stored} bytes under a bound of {max}");
            assert!(
                stored as u64 > max * 8 / 10,
                "it evicts down to 90 % of the bound, no further ({stored} bytes)"
            );
            assert!(Store::exists(&s, 5, "k199").await.unwrap(), "the latest entry is kept");
            assert!(!Store::exists(&s, 5, "k000").await.unwrap(), "the nearest to expiry went first");
            assert!(Store::exists(&s, 5, "held:lease").await.unwrap(), "a lease is never evicted");
            // More than half the bound is refused, not stored at the cost of everything else.
            let err =
                Store::set(&s, 5, "huge", &vec![0u8; 40 * 1024], Duration::from_secs(60)).await.unwrap_err();
            assert!(err.to_string().contains("more than half of CACHE_MAX_SIZE"), "{err}");
            assert!(Store::exists(&s, 5, "k199").await.unwrap());
        });
    }

    #[test]
    fn duration_max_is_a_far_deadline_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 20);
        block_on(async {
            Store::set(&s, 5, "k", b"v", Duration::MAX).await.unwrap();
            assert!(Store::ttl(&s, 5, "k").await.unwrap().unwrap() > Duration::from_secs(100 * 365 * 86_400));
            assert!(Store::expire(&s, 5, "k", Duration::MAX).await.unwrap());
            let long = LeaseAsk { token: 1, ttl: Duration::MAX, min_generation: 0 };
            assert!(matches!(Store::acquire(&s, 5, "l", long, |_| ()).await.unwrap(), Acquired::Granted(_)));
            let g = Store::bump_generation(&s, 5, "g", Duration::MAX).await.unwrap();
            assert!(g.is_some());
            Store::invalidate(&s, 5, "k", Duration::MAX).await.unwrap();
            assert!(!Store::exists(&s, 5, "k").await.unwrap());
        });
    }

    /// Another connection (as another process would) holds the write lock: a write waits for it
    /// at most `op_timeout` (SQLite's busy timeout), then fails; reads go on meanwhile.
    #[test]
    fn a_write_waits_for_another_writer_at_most_op_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let op_timeout = Duration::from_millis(200);
        let target = DiskTarget::new(dir.path());
        let s = DiskStore::new(&target, &CacheConfig::disk(dir.path()).with_op_timeout(op_timeout));
        block_on(async {
            Store::set(&s, 5, "k", b"v", Duration::from_secs(60)).await.unwrap();
            let other = Connection::open(dir.path().join(FILE)).unwrap();
            other.execute_batch("BEGIN IMMEDIATE").unwrap();
            let started = std::time::Instant::now();
            let err = Store::set(&s, 5, "k2", b"v", Duration::from_secs(60)).await.unwrap_err();
            let waited = started.elapsed();
            assert!(err.to_string().contains("locked"), "{err}");
            assert!(waited >= op_timeout - Duration::from_millis(20), "it waited for the lock ({waited:?})");
            assert!(waited < op_timeout * 2, "for op_timeout, not more ({waited:?})");
            assert!(Store::exists(&s, 5, "k").await.unwrap(), "reads go on under another writer");
            other.execute_batch("COMMIT").unwrap();
            Store::set(&s, 5, "k2", b"v", Duration::from_secs(60)).await.unwrap();
        });
    }

    fn ask() -> LeaseAsk {
        LeaseAsk { token: 42, ttl: Duration::from_secs(5), min_generation: 0 }
    }

    /// A holder whose lease an invalidation revoked fills after the invalidation's stamp expired:
    /// the key has no stamp then, which must not read as the one its lease was granted under.
    #[test]
    fn a_fill_after_a_forgotten_invalidation_stamp_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 20);
        let lease = Duration::from_millis(100);
        block_on(async {
            let short = LeaseAsk { token: 42, ttl: lease, min_generation: 0 };
            let Acquired::Granted(grant) = Store::acquire(&s, 5, "k", short, |_| ()).await.unwrap() else {
                panic!("the lease is free")
            };
            Store::invalidate(&s, 5, "k", super::super::stamp_life(lease)).await.unwrap();
            std::thread::sleep(super::super::stamp_life(lease) + Duration::from_millis(100));
            let outcome = Store::fill(&s, 5, "k", (42, grant), b"v", Duration::from_secs(60)).await.unwrap();
            assert_eq!(outcome, FillOutcome::Revoked);
            assert!(!Store::exists(&s, 5, "k").await.unwrap());
        });
    }

    #[test]
    fn a_lease_granted_in_a_replaced_file_cannot_fill() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 20);
        block_on(async {
            let Acquired::Granted(grant) = Store::acquire(&s, 5, "k", ask(), |_| ()).await.unwrap() else {
                panic!("the lease is free")
            };
            // The file is replaced (its leases and stamps gone) while the value is computed.
            std::fs::remove_file(dir.path().join(FILE)).unwrap();
            for suffix in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(dir.path().join(format!("{FILE}{suffix}")));
            }
            for slot in &s.slots {
                slot.lock().unwrap().conn = None;
            }
            let outcome = Store::fill(&s, 5, "k", (42, grant), b"v", Duration::from_secs(60)).await.unwrap();
            assert_eq!(outcome, FillOutcome::Revoked);
            assert!(!Store::exists(&s, 5, "k").await.unwrap());
        });
    }
}
