//! A loopback TCP proxy in front of the gateway, with a switch that cuts
//! every open connection (a network drop mid-turn, as a client sees it).
//!
//! Two kinds:
//! - [`Proxy::connect`]: an HTTP `CONNECT` proxy (what `HTTPS_PROXY` points
//!   at) that tunnels only the one allowed authority (`api.anthropic.com:443`)
//!   to the target and refuses every other host with 403. Nothing leaves the
//!   machine: the target is a loopback address.
//! - [`Proxy::forward`]: a plain relay, for clients that dial an address.
//!
//! Plain std threads, independent of any async runtime; stopped on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest CONNECT head accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Connections relayed at once (each is two threads); more are refused.
const MAX_LIVE: usize = 64;

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Both ends of every live connection (clones), for `cut`.
    live: Mutex<Vec<(TcpStream, TcpStream)>>,
    opened: AtomicUsize,
    refused: Mutex<Vec<String>>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A CONNECT proxy tunnelling only `allowed` (e.g. `api.anthropic.com:443`) to `target`.
    pub fn connect(target: SocketAddr, allowed: &str) -> Proxy {
        Proxy::start(target, Some(allowed.to_string()))
    }

    /// A plain TCP relay to `target`.
    pub fn forward(target: SocketAddr) -> Proxy {
        Proxy::start(target, None)
    }

    fn start(target: SocketAddr, allowed: Option<String>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let (sh, allowed) = (sh.clone(), allowed.clone());
                std::thread::spawn(move || serve(client, target, allowed.as_deref(), &sh));
            }
        });
        Proxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT`, for `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts every open connection (both directions, no close frame); returns how many.
    pub fn cut(&self) -> usize {
        let mut live = self.shared.live.lock().unwrap_or_else(|p| p.into_inner());
        let n = live.len();
        for (a, b) in live.drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        n
    }

    /// Connections relayed so far.
    pub fn opened(&self) -> usize {
        self.shared.opened.load(Ordering::SeqCst)
    }

    /// The authorities a CONNECT asked for and was refused.
    pub fn refused(&self) -> Vec<String> {
        self.shared
            .refused
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn serve(client: TcpStream, target: SocketAddr, allowed: Option<&str>, shared: &Shared) {
    let _ = client.set_nodelay(true);
    let mut client = client;
    if let Some(allowed) = allowed {
        let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
        let Some(authority) = read_connect(&client) else {
            let _ = client.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
            return;
        };
        if authority != allowed {
            if let Ok(mut r) = shared.refused.lock() {
                r.push(authority);
            }
            let _ = client.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n");
            return;
        }
        let _ = client.set_read_timeout(None);
    }
    let Ok(upstream) = TcpStream::connect(target) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n");
        return;
    };
    let _ = upstream.set_nodelay(true);
    if allowed.is_some()
        && client
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .is_err()
    {
        return;
    }
    let (Ok(c2), Ok(u2), Ok(c3), Ok(u3)) = (
        client.try_clone(),
        upstream.try_clone(),
        client.try_clone(),
        upstream.try_clone(),
    ) else {
        return;
    };
    {
        let mut live = shared.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.len() >= MAX_LIVE {
            return;
        }
        live.push((c3, u3));
    }
    shared.opened.fetch_add(1, Ordering::SeqCst);
    let up = std::thread::spawn(move || pipe(c2, u2));
    pipe(upstream, client);
    let _ = up.join();
}

/// Copies until either side ends, then closes both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Reads `CONNECT host:port HTTP/1.1` and its headers; returns the authority.
fn read_connect(client: &TcpStream) -> Option<String> {
    let mut reader = BufReader::new(client.try_clone().ok()?.take(MAX_HEAD_BYTES as u64));
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, authority) = (parts.next()?, parts.next()?.to_string());
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    // Bytes the client sent after the head would be lost here; CONNECT
    // clients wait for the 200 before they speak TLS.
    (method.eq_ignore_ascii_case("CONNECT")).then_some(authority)
}
