//! A TCP proxy between a service and a broker that can cut, delay or reset connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const PASS: u8 = 0;
const CUT: u8 = 1;

/// A running proxy. Dropping it stops it and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    delay_ms: Arc<AtomicU64>,
    // Bumping the generation closes every open connection, with a reset when asked.
    generation: watch::Sender<(u64, bool)>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a fresh loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(AtomicU8::new(PASS));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (generation, _) = watch::channel((0u64, false));
        let task = {
            let (mode, delay_ms, generation) = (mode.clone(), delay_ms.clone(), generation.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if mode.load(Ordering::SeqCst) == CUT {
                        // A cut link: the connection is accepted and dropped at once.
                        let _ = client.set_zero_linger();
                        drop(client);
                        continue;
                    }
                    let (delay_ms, closer) = (delay_ms.clone(), generation.subscribe());
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(upstream).await {
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            pipe(client, server, delay_ms, closer).await;
                        }
                    });
                }
            })
        };
        Ok(Self {
            addr,
            mode,
            delay_ms,
            generation,
            task,
        })
    }

    /// Where clients should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection and refuses new ones until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.mode.store(CUT, Ordering::SeqCst);
        self.close_all(false);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.mode.store(PASS, Ordering::SeqCst);
    }

    /// Resets (RST) every open connection; new ones are accepted.
    pub fn reset_connections(&self) {
        self.close_all(true);
    }

    /// Delays every chunk forwarded in either direction.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    fn close_all(&self, reset: bool) {
        self.generation.send_modify(|(g, r)| {
            *g += 1;
            *r = reset;
        });
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.close_all(true);
        self.task.abort();
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    delay_ms: Arc<AtomicU64>,
    mut closer: watch::Receiver<(u64, bool)>,
) {
    let start = closer.borrow().0;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let reset = {
        let up = copy_with_delay(&mut client_read, &mut server_write, delay_ms.clone());
        let down = copy_with_delay(&mut server_read, &mut client_write, delay_ms);
        tokio::select! {
        _ = up => false,
        _ = down => false,
        reset = async {
            loop {
                if closer.changed().await.is_err() {
                    return true;
                }
                let (generation, reset) = *closer.borrow();
                if generation != start {
                    return reset;
                }
            }
        } => reset,
        }
    };
    let client = client_read.reunite(client_write);
    let server = server_read.reunite(server_write);
    if reset {
        for stream in [client, server].into_iter().flatten() {
            let _ = stream.set_zero_linger();
        }
    }
}

async fn copy_with_delay<R, W>(read: &mut R, write: &mut W, delay_ms: Arc<AtomicU64>)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match read.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if write.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
