//! Apps' stable endpoints: a TCP listener on the host per published port (`[[ports]]`
//! with `host = N`), proxying each connection to the app's current VM.
//!
//! The backend is switched atomically: a connection accepted after the switch goes to the
//! new VM, one accepted before stays with the VM it was given. Connections are counted per
//! VM, so a blue-green swap can drain the old VM (wait, bounded, until its count is zero)
//! before stopping it. Why a proxy in the agent rather than nftables DNAT: the drain is
//! exact (the agent knows every open connection), the switch is one pointer swap, and
//! connections from the host itself work without `route_localnet` tricks. The cost: new
//! connections are refused while the agent restarts, and bytes pass through user space.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::conn;
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use uuid::Uuid;

/// How long the proxy waits for a VM to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for app {app}: {source}")]
pub struct EndpointError {
    pub app: String,
    pub addr: SocketAddr,
    source: std::io::Error,
}

/// The VM an endpoint sends new connections to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    pub vm_id: Uuid,
    pub ip: Ipv4Addr,
}

/// A published port: the host port that listens and the guest port it forwards to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Published {
    pub host: u16,
    pub guest: u16,
}

type Target = Arc<RwLock<Option<Backend>>>;

struct AppEndpoint {
    ports: Vec<Published>,
    target: Target,
    listeners: Vec<JoinHandle<()>>,
}

impl Drop for AppEndpoint {
    fn drop(&mut self) {
        for l in &self.listeners {
            l.abort();
        }
    }
}

/// Open connections per VM.
#[derive(Default)]
struct Counts(Mutex<HashMap<Uuid, usize>>);

impl Counts {
    fn add(&self, vm: Uuid, delta: isize) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(vm).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            m.remove(&vm);
        }
    }

    fn get(&self, vm: Uuid) -> usize {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&vm).copied().unwrap_or(0)
    }
}

/// Counts one proxied connection for as long as it lives.
struct ConnGuard {
    counts: Arc<Counts>,
    vm: Uuid,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.counts.add(self.vm, -1);
    }
}

/// Every app's endpoint on this host.
pub struct Endpoints {
    bind: IpAddr,
    apps: Mutex<HashMap<String, AppEndpoint>>,
    counts: Arc<Counts>,
}

impl Endpoints {
    /// Endpoints listening on `bind` (e.g. 0.0.0.0).
    pub fn new(bind: IpAddr) -> Endpoints {
        Endpoints {
            bind,
            apps: Mutex::new(HashMap::new()),
            counts: Arc::new(Counts::default()),
        }
    }

    fn apps(&self) -> std::sync::MutexGuard<'_, HashMap<String, AppEndpoint>> {
        self.apps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Points the app's endpoint at `backend` (listening first if its ports are new or
    /// changed). Returns the backend it replaced.
    pub fn publish(
        &self,
        app: &str,
        ports: &[Published],
        backend: Backend,
    ) -> Result<Option<Backend>, EndpointError> {
        let mut apps = self.apps();
        if apps.get(app).is_some_and(|e| e.ports != ports) {
            apps.remove(app);
        }
        if let Some(e) = apps.get(app) {
            let mut t = e.target.write().unwrap_or_else(|p| p.into_inner());
            return Ok(t.replace(backend));
        }
        let target: Target = Arc::new(RwLock::new(Some(backend)));
        let mut listeners = Vec::new();
        for p in ports {
            let addr = SocketAddr::new(self.bind, p.host);
            let std_listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| EndpointError {
                    app: app.to_string(),
                    addr,
                    source,
                })?;
            let listener = TcpListener::from_std(std_listener).map_err(|source| EndpointError {
                app: app.to_string(),
                addr,
                source,
            })?;
            listeners.push(tokio::spawn(accept_loop(
                listener,
                p.guest,
                target.clone(),
                self.counts.clone(),
            )));
        }
        apps.insert(
            app.to_string(),
            AppEndpoint {
                ports: ports.to_vec(),
                target,
                listeners,
            },
        );
        Ok(None)
    }

    /// Closes the app's listeners (open connections live on until their VM goes).
    pub fn unpublish(&self, app: &str) {
        self.apps().remove(app);
    }

    /// The VM the app's endpoint points at.
    pub fn backend(&self, app: &str) -> Option<Backend> {
        let apps = self.apps();
        let e = apps.get(app)?;
        let t = e.target.read().unwrap_or_else(|p| p.into_inner());
        *t
    }

    /// True when the app's endpoint listens on exactly `ports` and points at `backend`.
    pub fn is_current(&self, app: &str, ports: &[Published], backend: Backend) -> bool {
        let apps = self.apps();
        apps.get(app).is_some_and(|e| {
            e.ports == ports && *e.target.read().unwrap_or_else(|p| p.into_inner()) == Some(backend)
        })
    }

    /// Apps with an endpoint.
    pub fn published_apps(&self) -> Vec<String> {
        self.apps().keys().cloned().collect()
    }

    /// Open proxied connections to a VM.
    pub fn connections(&self, vm_id: Uuid) -> usize {
        self.counts.get(vm_id)
    }

    /// Waits until no proxied connection to `vm_id` is open, at most `limit`. Returns how
    /// many were still open when it stopped waiting.
    pub async fn drain(&self, vm_id: Uuid, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let open = self.counts.get(vm_id);
            if open == 0 || Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn accept_loop(listener: TcpListener, guest_port: u16, target: Target, counts: Arc<Counts>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(conn::ENDPOINT_MAX_CONNECTIONS));
    loop {
        let ((client, peer), permit) =
            conn::accept_bounded(&slots, "endpoint", || listener.accept()).await;
        let backend = *target.read().unwrap_or_else(|p| p.into_inner());
        let Some(backend) = backend else {
            continue;
        };
        counts.add(backend.vm_id, 1);
        let guard = ConnGuard {
            counts: counts.clone(),
            vm: backend.vm_id,
        };
        tokio::spawn(async move {
            let _guard = guard;
            let _permit = permit;
            let addr = SocketAddr::new(IpAddr::V4(backend.ip), guest_port);
            let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await;
            let upstream = match upstream {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    warn!(%peer, %addr, error = %e, "endpoint: the VM refused the connection");
                    return;
                }
                Err(_) => {
                    warn!(%peer, %addr, "endpoint: the VM did not accept within 5 s");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            match conn::proxy(client, upstream, conn::ENDPOINT_IDLE).await {
                Ok(conn::ProxyEnd::Closed) => {}
                Ok(conn::ProxyEnd::Idle) => debug!(%peer, "endpoint connection idle; closed"),
                Err(e) => debug!(%peer, error = %e, "endpoint connection ended"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback server answering every connection with `tag`.
    async fn server(tag: &'static [u8]) -> (u16, JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let h = tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(tag).await;
                });
            }
        });
        (port, h)
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn ask(port: u16) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        out
    }

    /// Loopback only: two real TCP servers stand for two VMs; the endpoint switches
    /// between them and counts open connections for the drain.
    #[tokio::test]
    async fn switches_atomically_and_drains() {
        // Both "VMs" listen on 127.0.0.1 on distinct ports, so the guest port differs:
        // publish one endpoint per server port to exercise the real accept/proxy path.
        let (blue_port, _b) = server(b"blue").await;
        let eps = Endpoints::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let host = free_port();
        let blue = Backend {
            vm_id: Uuid::from_u128(1),
            ip: Ipv4Addr::LOCALHOST,
        };
        let ports = [Published {
            host,
            guest: blue_port,
        }];
        assert_eq!(eps.publish("web", &ports, blue).unwrap(), None);
        assert_eq!(ask(host).await, b"blue");

        // A held-open connection counts until it closes; drain waits for it.
        let held = TcpStream::connect(("127.0.0.1", host)).await.unwrap();
        let start = Instant::now();
        while eps.connections(blue.vm_id) == 0 {
            assert!(start.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            eps.drain(blue.vm_id, Duration::from_millis(100)).await,
            1,
            "drain is bounded"
        );
        drop(held);
        assert_eq!(eps.drain(blue.vm_id, Duration::from_secs(5)).await, 0);

        // Switching the backend: the same ports, a new VM id.
        let green = Backend {
            vm_id: Uuid::from_u128(2),
            ip: Ipv4Addr::LOCALHOST,
        };
        assert_eq!(eps.publish("web", &ports, green).unwrap(), Some(blue));
        assert_eq!(eps.backend("web"), Some(green));
        assert_eq!(
            ask(host).await,
            b"blue",
            "same server, now counted as green"
        );

        // A port that is taken is an error naming the app and the address.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap().port();
        let err = eps
            .publish(
                "other",
                &[Published {
                    host: busy,
                    guest: 80,
                }],
                green,
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("other") && err.contains(&busy.to_string()),
            "{err}"
        );

        eps.unpublish("web");
        assert!(
            TcpStream::connect(("127.0.0.1", host)).await.is_err() || {
                // The listener task is aborted asynchronously; give it a moment.
                tokio::time::sleep(Duration::from_millis(100)).await;
                TcpStream::connect(("127.0.0.1", host)).await.is_err()
            }
        );
    }
}
