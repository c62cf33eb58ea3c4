//! The agent's stable front door: a TCP proxy on an address the agent owns (`--listen`) that
//! forwards each new connection to the forwarded port of the VM that runs now. The swap switches
//! the backend atomically once the new VM is healthy, before the old one is stopped, so a client
//! that reconnects sees no gap; connections already open stay on the VM they reached.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::net::{TcpListener, TcpStream};

/// The backend port (0: no VM runs; connections are closed).
#[derive(Debug, Clone, Default)]
pub struct Backend(Arc<AtomicU32>);

impl Backend {
    pub fn set(&self, port: Option<u16>) {
        self.0.store(port.map_or(0, u32::from), Ordering::SeqCst);
    }

    pub fn get(&self) -> Option<u16> {
        u16::try_from(self.0.load(Ordering::SeqCst))
            .ok()
            .filter(|p| *p != 0)
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
        let Some(port) = backend.get() else {
            continue;
        };
        tokio::spawn(async move {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let Ok(mut upstream) = TcpStream::connect(addr).await else {
                return;
            };
            let mut client = client;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}
