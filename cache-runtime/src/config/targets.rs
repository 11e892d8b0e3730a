//! Where each Redis deployment is: one server ([`RedisTarget`]), a Cluster ([`ClusterTarget`]),
//! a primary behind Sentinel ([`SentinelTarget`]); with TLS (`rediss://`, an optional private CA)
//! and ACL users. None of them ever shows a password in `Debug`, `Display` or an error.

use std::fmt;
use std::sync::Arc;

use redis::{ConnectionAddr, IntoConnectionInfo, TlsCertificates};

use super::ConfigError;
use crate::error::BackendError;

/// A private CA's certificates (PEM), trusted instead of the system roots.
#[derive(Clone)]
pub(crate) struct CaCert(Arc<Vec<u8>>);

impl CaCert {
    /// Reads `path` now, so a wrong path is an error at start-up, never at the first call.
    pub(crate) fn read(path: &str) -> Result<Self, ConfigError> {
        let pem = std::fs::read(path)
            .map_err(|e| ConfigError::CaCert { path: path.to_owned(), reason: e.to_string() })?;
        if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            return Err(ConfigError::CaCert {
                path: path.to_owned(),
                reason: "no PEM certificate (-----BEGIN CERTIFICATE-----) in the file".into(),
            });
        }
        Ok(CaCert(Arc::new(pem)))
    }

    pub(crate) fn certificates(ca: &Option<CaCert>) -> Option<TlsCertificates> {
        ca.as_ref().map(|ca| TlsCertificates { client_tls: None, root_cert: Some(ca.0.to_vec()) })
    }

    /// A client for `info`, trusting `ca` if `info` is reached over TLS. A CA is for TLS
    /// connections only: given with a plain-TCP address (`REDIS_CA_CERT` beside a `redis://`
    /// URL, TLS sentinels in front of a plain primary), it is not used (redis-rs would refuse to
    /// build the client, and every call would run uncached).
    pub(crate) fn client(
        info: redis::ConnectionInfo,
        ca: &Option<CaCert>,
    ) -> Result<redis::Client, BackendError> {
        if !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            return Ok(redis::Client::open(info)?);
        }
        tls_provider();
        Ok(match Self::certificates(ca) {
            Some(certs) => redis::Client::build_with_tls(info, certs)?,
            None => redis::Client::open(info)?,
        })
    }
}

/// Installs rustls's `ring` provider as the process default unless one is installed: the TLS
/// connections need one, and the application may have chosen its own first.
pub(crate) fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Parses one `redis://` or `rediss://` URL into connection info, with the password redacted
/// from any error.
fn parse(url: &str) -> Result<redis::ConnectionInfo, ConfigError> {
    if !url.contains("://") {
        return Err(ConfigError::InvalidRedisUrl { url: redact_url(url), reason: "no scheme".into() });
    }
    url.into_connection_info()
        .map_err(|e| ConfigError::InvalidRedisUrl { url: redact_url(url), reason: e.to_string() })
}

fn is_tls(info: &redis::ConnectionInfo) -> bool {
    matches!(info.addr(), ConnectionAddr::TcpTls { .. })
}

fn host_port(info: &redis::ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        other => other.to_string(),
    }
}

/// Where the Redis server is. Its `Debug` and `Display` never show the password.
#[derive(Clone)]
pub struct RedisTarget {
    pub(crate) info: redis::ConnectionInfo,
    ca: Option<CaCert>,
}

impl RedisTarget {
    /// Parses a `redis://[user:password@]host:port[/db]` or `rediss://...` (TLS) URL. The DB in
    /// the URL is ignored: each cached function names its DB by type.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        Ok(RedisTarget { info: parse(url)?, ca: None })
    }

    /// `host:port`, for logs.
    pub fn address(&self) -> String {
        host_port(&self.info)
    }

    /// Whether connections use TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        is_tls(&self.info)
    }

    /// Whether connections use TCP without TLS (`redis://`; not a Unix socket).
    pub(crate) fn is_plain_tcp(&self) -> bool {
        matches!(self.info.addr(), ConnectionAddr::Tcp(..))
    }

    pub(crate) fn set_ca(&mut self, ca: CaCert) {
        self.ca = Some(ca);
    }

    /// The user and the password given apart from the URL (`REDIS_USERNAME`, `REDIS_PASSWORD`),
    /// each over the URL's own when given.
    pub(crate) fn set_credentials(&mut self, username: Option<String>, password: Option<String>) {
        let mut settings = self.info.redis_settings().clone();
        if let Some(username) = username {
            settings = settings.set_username(&username);
        }
        if let Some(password) = password {
            settings = settings.set_password(&password);
        }
        self.info = self.info.clone().set_redis_settings(settings);
    }

    pub(crate) fn for_db(&self, db: u8) -> redis::ConnectionInfo {
        let settings = self.info.redis_settings().clone().set_db(i64::from(db));
        self.info.clone().set_redis_settings(settings)
    }

    /// A client for `db`, trusting the private CA if one is set.
    pub(crate) fn client(&self, db: u8) -> Result<redis::Client, BackendError> {
        self.client_for(self.for_db(db))
    }

    /// A client speaking RESP3 (for the near tier's tracking connection: invalidations arrive as
    /// push messages), trusting the private CA if one is set.
    pub(crate) fn resp3_client(&self) -> Result<redis::Client, BackendError> {
        let settings = self.info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
        self.client_for(self.info.clone().set_redis_settings(settings))
    }

    fn client_for(&self, info: redis::ConnectionInfo) -> Result<redis::Client, BackendError> {
        CaCert::client(info, &self.ca)
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let has_password = self.info.redis_settings().password().is_some();
        f.debug_struct("RedisTarget")
            .field("address", &self.address())
            .field("tls", &self.is_tls())
            .field("password", &if has_password { "<redacted>" } else { "<none>" })
            .finish()
    }
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.is_tls() { "rediss" } else { "redis" };
        write!(f, "{scheme}://{}", self.address())
    }
}

/// A Redis Cluster: the nodes to discover it from (any of them will do), one user and password
/// for all, TLS for all or none.
#[derive(Clone)]
pub struct ClusterTarget {
    pub(crate) nodes: Vec<redis::ConnectionInfo>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) tls: bool,
    pub(crate) ca: Option<CaCert>,
}

impl ClusterTarget {
    /// `nodes`: `host:port` (plain TCP, or TLS when `tls`), or full `redis://` / `rediss://`
    /// URLs (a `rediss://` node turns TLS on for all). Credentials in a URL apply to the whole
    /// cluster.
    pub fn new<S: AsRef<str>>(nodes: &[S], tls: bool) -> Result<Self, ConfigError> {
        if nodes.is_empty() {
            return Err(ConfigError::InvalidValue {
                variable: "REDIS_CLUSTER_NODES",
                value: String::new(),
                expected: "host:port,host:port,... (at least one node)",
            });
        }
        let scheme = if tls { "rediss" } else { "redis" };
        let mut target = ClusterTarget { nodes: Vec::new(), username: None, password: None, tls, ca: None };
        for node in nodes {
            let node = node.as_ref().trim();
            let url = if node.contains("://") { node.to_owned() } else { format!("{scheme}://{node}") };
            let info = parse(&url)?;
            target.tls |= is_tls(&info);
            let settings = info.redis_settings();
            if let Some(user) = settings.username() {
                target.username = Some(user.to_owned());
            }
            if let Some(password) = settings.password() {
                target.password = Some(password.to_owned());
            }
            target.nodes.push(info);
        }
        Ok(target)
    }

    /// The host of a node the cluster names with an empty host (in `CLUSTER SLOTS` or `CLUSTER
    /// NODES`: a node that has never learnt its own IP, as in a cluster of one, names itself so):
    /// the configured node on `port`, else the first configured node. (The `redis` crate takes
    /// the node that answered; which one did is not known here.)
    pub(crate) fn host_of_unnamed(&self, port: u16) -> Option<String> {
        let hosts = self.nodes.iter().filter_map(|info| match info.addr() {
            ConnectionAddr::Tcp(host, p) | ConnectionAddr::TcpTls { host, port: p, .. } => Some((host, *p)),
            _ => None,
        });
        let mut first = None;
        for (host, p) in hosts {
            if p == port {
                return Some(host.clone());
            }
            first.get_or_insert_with(|| host.clone());
        }
        first
    }

    /// The nodes, `host:port,...`, for logs.
    pub fn address(&self) -> String {
        self.nodes.iter().map(host_port).collect::<Vec<_>>().join(",")
    }

    pub(crate) fn set_credentials(&mut self, username: Option<String>, password: Option<String>) {
        self.username = username.or(self.username.take());
        self.password = password.or(self.password.take());
    }

    pub(crate) fn set_ca(&mut self, ca: CaCert) {
        self.ca = Some(ca);
    }
}

impl fmt::Debug for ClusterTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterTarget")
            .field("nodes", &self.address())
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &if self.password.is_some() { "<redacted>" } else { "<none>" })
            .finish()
    }
}

/// A primary found through Sentinel: the sentinels to ask, the name they know it by, and the
/// credentials and TLS of the primary itself.
#[derive(Clone)]
pub struct SentinelTarget {
    pub(crate) sentinels: Vec<String>,
    pub(crate) master: String,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) tls: bool,
    pub(crate) ca: Option<CaCert>,
    /// What the sentinels themselves ask for, not the primary: their own user and password
    /// (`requirepass`, or an ACL user of theirs), and whether they speak TLS.
    pub(crate) sentinel_username: Option<String>,
    pub(crate) sentinel_password: Option<String>,
    pub(crate) sentinel_tls: bool,
}

impl SentinelTarget {
    /// `sentinels`: `host:port` of each sentinel; `master`: the name they monitor it under.
    pub fn new<S: AsRef<str>>(sentinels: &[S], master: &str) -> Result<Self, ConfigError> {
        let sentinels: Vec<String> = sentinels.iter().map(|s| s.as_ref().trim().to_owned()).collect();
        for s in &sentinels {
            // A URL, or credentials (`user:pass@host:port`), is not an address: refused without
            // its text, which may hold a password.
            if s.contains('@') || s.contains("://") {
                return Err(ConfigError::InvalidValue {
                    variable: "REDIS_SENTINELS",
                    value: "(a URL or credentials, not shown)".into(),
                    expected: "host:port,host:port,... (each sentinel's address alone; their password goes in REDIS_SENTINEL_PASSWORD, TLS in REDIS_SENTINEL_TLS)",
                });
            }
            let ok = s
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(ConfigError::InvalidValue {
                    variable: "REDIS_SENTINELS",
                    value: s.clone(),
                    expected: "host:port,host:port,... (each sentinel's address)",
                });
            }
        }
        if sentinels.is_empty() || master.trim().is_empty() {
            return Err(ConfigError::InvalidValue {
                variable: "REDIS_SENTINEL_MASTER",
                value: master.to_owned(),
                expected: "the primary's name as the sentinels know it, and at least one sentinel",
            });
        }
        Ok(SentinelTarget {
            sentinels,
            master: master.trim().to_owned(),
            username: None,
            password: None,
            tls: false,
            ca: None,
            sentinel_username: None,
            sentinel_password: None,
            sentinel_tls: false,
        })
    }

    /// Parses `redis+sentinel://[user:password@]host:port[,host:port...]/master`; the credentials
    /// are the primary's.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::InvalidRedisUrl { url: redact_url(url), reason: reason.into() };
        let rest = url.strip_prefix("redis+sentinel://").ok_or_else(|| bad("not redis+sentinel://"))?;
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (Some(userinfo), rest),
            None => (None, rest),
        };
        let (hosts, master) =
            rest.split_once('/').ok_or_else(|| bad("no /master-name after the sentinels"))?;
        let hosts: Vec<&str> = hosts.split(',').collect();
        let mut target =
            SentinelTarget::new(&hosts, master).map_err(|_| bad("expected host:port,.../master"))?;
        if let Some(userinfo) = userinfo {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let decode =
                |s: &str| percent_decode(s).ok_or_else(|| bad("bad percent-encoding in the credentials"));
            target.username = Some(decode(user)?).filter(|u| !u.is_empty());
            target.password = Some(decode(password)?).filter(|p| !p.is_empty());
        }
        Ok(target)
    }

    pub(crate) fn set_credentials(&mut self, username: Option<String>, password: Option<String>) {
        self.username = username.or(self.username.take());
        self.password = password.or(self.password.take());
    }

    pub(crate) fn set_tls(&mut self, tls: bool) {
        self.tls = tls;
    }

    pub(crate) fn set_ca(&mut self, ca: CaCert) {
        self.ca = Some(ca);
    }

    pub(crate) fn set_sentinel_credentials(&mut self, username: Option<String>, password: String) {
        self.sentinel_username = username;
        self.sentinel_password = Some(password);
    }

    pub(crate) fn set_sentinel_tls(&mut self, tls: bool) {
        self.sentinel_tls = tls;
    }

    /// `master@host:port,...`, for logs.
    pub fn address(&self) -> String {
        format!("{}@{}", self.master, self.sentinels.join(","))
    }
}

impl fmt::Debug for SentinelTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelTarget")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &if self.password.is_some() { "<redacted>" } else { "<none>" })
            .field("sentinel_tls", &self.sentinel_tls)
            .field("sentinel_username", &self.sentinel_username)
            .field(
                "sentinel_password",
                &if self.sentinel_password.is_some() { "<redacted>" } else { "<none>" },
            )
            .finish()
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Replaces the password of a URL-like string by `***`, for error messages: whatever stands
/// between the user (after the scheme, if any) and the last `@`.
pub(crate) fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].rfind('@') {
        Some(at) => {
            let at = start + at;
            let user = url[start..at].split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..start], user, &url[at..])
        }
        None => url.to_owned(),
    }
}

/// The disk backend's file: a directory (created if missing) that every process of the service
/// on this machine names, and a bound on the bytes of its entries.
#[derive(Clone, Debug)]
pub struct DiskTarget {
    pub(crate) dir: std::path::PathBuf,
    pub(crate) max_size: u64,
}

/// The disk backend's default bound, as Python's `diskcache` (1 GB).
pub const DEFAULT_DISK_MAX_SIZE: u64 = 1 << 30;

impl DiskTarget {
    /// The cache in `dir`, bounded at [`DEFAULT_DISK_MAX_SIZE`] bytes.
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        DiskTarget { dir: dir.into(), max_size: DEFAULT_DISK_MAX_SIZE }
    }

    /// The most bytes (keys and values) the entries may take; the file is larger by SQLite's
    /// pages and indexes. At least 1.
    pub fn with_max_size(mut self, bytes: u64) -> Self {
        self.max_size = bytes.max(1);
        self
    }

    /// The directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The bound on the entries' bytes.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }
}
