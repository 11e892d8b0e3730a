//! A TCP proxy between the runtime and a real `redis-server` whose behaviour is switched while it
//! runs (after the chaos wrappers of .NET's FusionCache): pass, added latency, one request held,
//! blackhole (accept,
//! never answer: bytes are held, not lost, and flow again when it ends), reset (every open
//! connection is closed with RST, new ones too), refuse (the port stops listening), strand
//! (the connections open now go silent for good, new ones pass) and cut (the connections open
//! now are reset, new ones pass).
//! It runs on its own thread and runtime, so any test can drive it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Bytes flow both ways.
    Pass,
    /// Each reply waits this long before it is forwarded.
    Latency(Duration),
    /// A request carrying these bytes waits this long before it is forwarded (and what follows
    /// it on its connection waits behind it); other requests and connections pass: a path
    /// that holds one write on its way to the server.
    HoldRequestsWith(&'static str, Duration),
    /// Connections are accepted, nothing is forwarded or answered until the fault ends.
    Blackhole,
    /// Open connections are reset; new ones are reset as soon as they are accepted.
    Reset,
    /// The port stops listening: connections are refused.
    Refuse,
}

#[derive(Clone, Copy)]
struct State {
    fault: Fault,
    /// Raised on every switch to `Reset`: connections opened before it are reset.
    resets: u64,
    /// Raised by `strand`: connections opened before it go silent.
    strands: u64,
}

pub struct FaultProxy {
    port: u16,
    state: Arc<watch::Sender<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FaultProxy {
    /// A proxy on a free loopback port forwarding to `127.0.0.1:upstream`, on a thread of its own.
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy port");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let port = listener.local_addr().expect("proxy addr").port();
        let (tx, _) = watch::channel(State { fault: Fault::Pass, resets: 0, strands: 0 });
        let state = Arc::new(tx);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = Arc::clone(&state);
        std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = serve(listener, port, upstream, serving) => {}
                        _ = stopped => {}
                    }
                });
            })
            .expect("proxy thread");
        FaultProxy { port, state, stop: Some(stop) }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, fault: Fault) {
        self.state.send_modify(|s| {
            s.fault = fault;
            if fault == Fault::Reset {
                s.resets += 1;
            }
        });
    }
}

impl FaultProxy {
    /// The connections open now go silent for good: what they send is read and dropped, nothing
    /// comes back, and they are never closed (a server that vanished without a reset, or a
    /// middlebox that forgot the flow). Connections opened afterwards pass.
    pub fn strand(&self) {
        self.state.send_modify(|s| s.strands += 1);
    }
}

impl FaultProxy {
    /// The connections open now are reset (RST to the client, as a middlebox that dropped its
    /// state would send; the server's side is closed), whatever they held back; the fault stays as
    /// it is for the connections opened afterwards.
    pub fn cut(&self) {
        self.state.send_modify(|s| s.resets += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.set(Fault::Reset);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn serve(mut listener: TcpListener, port: u16, upstream: u16, state: Arc<watch::Sender<State>>) {
    let mut rx = state.subscribe();
    loop {
        if rx.borrow().fault == Fault::Refuse {
            drop(listener);
            let _ = rx.wait_for(|s| s.fault != Fault::Refuse).await;
            listener = loop {
                // Re-bind the same port (tokio sets SO_REUSEADDR); retry while the OS frees it.
                match TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            };
        }
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((client, _)) = accepted {
                    tokio::spawn(connection(client, upstream, state.subscribe()));
                }
            }
            _ = rx.changed() => {}
        }
    }
}

async fn connection(client: TcpStream, upstream: u16, mut rx: watch::Receiver<State>) {
    let (born, strands) = (rx.borrow().resets, rx.borrow().strands);
    if rx.borrow().fault == Fault::Reset {
        return reset(client);
    }
    // Blackholed: accepted, but nothing happens until the fault ends.
    let _ = rx.wait_for(|s| s.fault != Fault::Blackhole).await;
    let Ok(server) = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], upstream))).await else {
        return reset(client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = pump(&mut client_read, &mut server_write, rx.clone(), born, false);
    let down = pump(&mut server_read, &mut client_write, rx.clone(), born, true);
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = rx.wait_for(|s| s.resets != born || s.strands != strands) => {}
    }
    if rx.borrow().resets == born && rx.borrow().strands != strands {
        // Stranded: the server's side goes, the client's stays open and silent until a reset.
        drop((server_read, server_write));
        let mut buf = vec![0u8; 64 * 1024];
        let drain = async { while matches!(client_read.read(&mut buf).await, Ok(n) if n > 0) {} };
        tokio::select! {
            _ = drain => return,
            _ = rx.wait_for(|s| s.resets != born) => {}
        }
        if let Ok(client) = client_read.reunite(client_write) {
            reset(client);
        }
        return;
    }
    if let (Ok(client), Ok(_)) = (client_read.reunite(client_write), server_read.reunite(server_write)) {
        reset(client);
    }
}

/// Copies `from` to `to`, holding bytes while blackholed and delaying replies under latency.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<State>,
    born: u64,
    replies: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let state = *rx.borrow();
        if state.resets != born {
            return;
        }
        match (state.fault, replies) {
            (Fault::Latency(d), true) => tokio::time::sleep(d).await,
            (Fault::HoldRequestsWith(bytes, d), false)
                if buf[..n].windows(bytes.len()).any(|w| w == bytes.as_bytes()) =>
            {
                tokio::time::sleep(d).await
            }
            _ => {}
        }
        if rx.borrow().fault == Fault::Blackhole {
            let _ = rx.wait_for(|s| s.fault != Fault::Blackhole).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn reset(stream: TcpStream) {
    // Linger 0: close sends RST, as a crashed peer or a middlebox would.
    let _ = stream.set_zero_linger();
    drop(stream);
}
