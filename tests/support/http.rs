//! A real HTTP/1.1 exchange over TCP, for the admin and metrics routes: one request per
//! connection (`Connection: close`), the reply read to its end.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A reply: its status code and body.
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends `method path` with `body` (as JSON when there is one) to `127.0.0.1:port`.
pub async fn request(port: u16, method: &str, path: &str, body: Option<&str>) -> Reply {
    request_with(port, method, path, &[], body).await
}

/// [`request`] with extra header lines (`"Authorization: Bearer x"`).
pub async fn request_with(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("server listens");
    let body = body.unwrap_or("");
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    let reply = String::from_utf8(reply).expect("UTF-8 reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "this client reads whole bodies: {head}"
    );
    Reply { status, body: body.to_owned() }
}

pub async fn get(port: u16, path: &str) -> Reply {
    request(port, "GET", path, None).await
}

pub async fn post(port: u16, path: &str, body: &str) -> Reply {
    request(port, "POST", path, Some(body)).await
}

/// Serves `app` on a free loopback port until the test ends; the port.
pub async fn serve(app: axum::Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serves") });
    port
}
