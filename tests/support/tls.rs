//! TLS for the tests: a private CA and a server certificate for `127.0.0.1` and `localhost`,
//! generated with `rcgen` into a temp dir, and `redis-server`s that only speak TLS
//! (`--port 0 --tls-port ...`), alone or as a 3-primary cluster (`--tls-cluster yes`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::free_port;

/// A CA, and a server certificate it signed, as PEM files.
pub struct Certificates {
    pub dir: tempfile::TempDir,
}

impl Certificates {
    pub fn generate() -> Certificates {
        let dir = tempfile::tempdir().expect("temp dir for certificates");
        let (ca_pem, server_pem, server_key) = issue("cache test CA");
        std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
        std::fs::write(dir.path().join("server.pem"), server_pem).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key).unwrap();
        // Another CA that signed nothing here: a client trusting it must reject the server.
        let (other_ca, _, _) = issue("some other CA");
        std::fs::write(dir.path().join("other-ca.pem"), other_ca).unwrap();
        Certificates { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// The server's TLS settings: its certificate and key, the CA, no client certificates.
    fn settings(&self) -> [(&'static str, String); 4] {
        let p = |name: &str| self.dir.path().join(name).to_str().unwrap().to_owned();
        [
            ("tls-cert-file", p("server.pem")),
            ("tls-key-file", p("server.key")),
            ("tls-ca-cert-file", p("ca.pem")),
            ("tls-auth-clients", "no".into()),
        ]
    }

    fn server_args(&self) -> Vec<String> {
        self.settings().into_iter().flat_map(|(name, value)| [format!("--{name}"), value]).collect()
    }

    /// The same settings as lines of a configuration file (a sentinel's).
    pub fn config_lines(&self) -> String {
        self.settings().into_iter().map(|(name, value)| format!("{name} {value}\n")).collect()
    }
}

/// (CA PEM, server certificate PEM, server key PEM).
fn issue(ca_name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    server.distinguished_name.push(DnType::CommonName, "localhost");
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
    (ca_cert.pem(), server_cert.pem(), server_key.serialize_pem())
}

/// A `redis-server` that accepts TLS only, stopped when dropped.
pub struct TlsServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl TlsServer {
    pub fn start(certs: &Certificates) -> TlsServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = spawn_tls(port, dir.path(), &certs.server_args(), &[]);
        TlsServer { child, port, _dir: dir }
    }

    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `child` once it listens on `port` (a TLS port takes TCP connections once the server
/// listens), within 10 s; an error if it exited first (the port may be taken).
pub fn listening(program: &str, port: u16, child: Child) -> Result<Child, String> {
    super::up(program, port, child, "listen", |port| {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
}

fn spawn_tls(port: u16, dir: &Path, tls: &[String], extra: &[String]) -> Child {
    let mut args: Vec<String> = ["--port", "0", "--tls-port", &port.to_string(), "--appendonly", "no"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend_from_slice(tls);
    args.extend_from_slice(extra);
    let child = super::spawn_server(dir, &args).unwrap_or_else(|e| panic!("spawn redis-server: {e}"));
    listening("a TLS redis-server", port, child).unwrap_or_else(|e| panic!("{e}"))
}

/// Three TLS-only primaries joined as a cluster (`--tls-cluster yes`), stopped when dropped.
pub struct TlsCluster {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl TlsCluster {
    pub fn start(certs: &Certificates) -> TlsCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut children = Vec::new();
        let mut ports = Vec::new();
        for i in 0..3 {
            let node = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node).unwrap();
            let (port, bus) = (free_port(), free_port());
            let extra: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
                "--tls-cluster",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            children.push(spawn_tls(port, &node, &certs.server_args(), &extra));
            ports.push(port);
        }
        let ca = certs.ca();
        let output = Command::new("redis-cli")
            .args(["--tls", "--cacert", ca.to_str().unwrap(), "--cluster", "create"])
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("{} ({e})", super::cluster::CLI_HINT));
        assert!(
            output.status.success(),
            "redis-cli --tls --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = TlsCluster { children, ports, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster
            .ports
            .iter()
            .all(|&p| tls_cli(&ca, p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "the TLS cluster was not ready within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    pub fn nodes(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("rediss://127.0.0.1:{p}")).collect()
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn tls_cli(ca: &Path, port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["--tls", "--cacert", ca.to_str().unwrap(), "-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} ({e})", super::cluster::CLI_HINT));
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}
