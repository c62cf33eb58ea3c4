//! The agent's stable front door: a TCP proxy on an address the agent owns (`--listen`) that
//! forwards each new connection to the forwarded port of the VM that runs now. The swap switches
//! the backend atomically once the new VM is healthy, before the old one is stopped, so a client
//! that reconnects sees no gap; connections already open stay on the VM they reached, and the
//! swap waits for them to end ([`Backend::drain`]) before it stops the old VM.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

/// The backend port (0: no VM runs; connections are closed), and the connections open to
/// each port.
#[derive(Debug, Clone, Default)]
pub struct Backend {
    port: Arc<AtomicU32>,
    open: Arc<Mutex<HashMap<u16, usize>>>,
}

impl Backend {
    pub fn set(&self, port: Option<u16>) {
        // Under the lock that `checkout` holds: after `set`, every connection to the old port
        // is counted.
        let _open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        self.port.store(port.map_or(0, u32::from), Ordering::SeqCst);
    }

    pub fn get(&self) -> Option<u16> {
        u16::try_from(self.port.load(Ordering::SeqCst))
            .ok()
            .filter(|p| *p != 0)
    }

    /// Connections open to `port` now.
    pub fn open_to(&self, port: u16) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&port).copied().unwrap_or(0)
    }

    /// Wait (blocking) until no connection is open to `port`, at most `limit`; true when none is.
    pub fn drain(&self, port: u16, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            if self.open_to(port) == 0 {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port a new connection goes to, counted as open to it.
    fn checkout(&self) -> Option<u16> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let port = self.get()?;
        *open.entry(port).or_default() += 1;
        Some(port)
    }

    fn closed(&self, port: u16) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&port) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&port);
            }
        }
    }
}

/// Accept on `listener` forever, forwarding to `backend`.
pub async fn serve(listener: TcpListener, backend: Backend) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("proxy accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Counted from the moment the port is chosen, so a swap that switches now waits for
        // this connection before it stops the VM behind it.
        let Some(port) = backend.checkout() else {
            continue;
        };
        let backend = backend.clone();
        tokio::spawn(async move {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if let Ok(mut upstream) = TcpStream::connect(addr).await {
                let mut client = client;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            backend.closed(port);
        });
    }
}
