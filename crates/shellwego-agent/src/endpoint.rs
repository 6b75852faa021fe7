//! Apps' stable endpoints: a TCP listener on the host per published port (`[[ports]]`
//! with `host = N`), proxying each connection to the app's current VM.
//!
//! The backend is switched atomically: a connection given a VM after the switch goes to
//! the new VM, one given a VM before stays with it. Connections are counted per VM, so a
//! blue-green swap can drain the old VM (wait, bounded, until its count is zero) before
//! stopping it. Why a proxy in the agent rather than nftables DNAT: the drain is exact
//! (the agent knows every open connection), the switch is one pointer swap, and
//! connections from the host itself work without `route_localnet` tricks. The cost: new
//! connections are refused while the agent restarts, and bytes pass through user space.
//!
//! When a connection is given a VM depends on the port's protocol. `tcp` (the default):
//! at accept, so a server that speaks first (SMTP, MySQL) sends its greeting at once.
//! `http` (the client speaks first): only when the client's first bytes arrive. A guest
//! that spends a process or thread per connection (busybox `httpd` forks one) would
//! otherwise run out of memory under a few thousand idle connections; this way they cost
//! the agent a task and a descriptor each (within the port's connection cap) and the guest
//! nothing, and a client that sends nothing within `conn::ENDPOINT_FIRST_BYTES` is closed.
//! A client that trickles its request still costs the guest a connection, as with any
//! plain TCP proxy; the port's cap bounds how many.
//!
//! Scale to zero: the endpoint tracks each app's traffic (how long no connection has been
//! open). An empty set of VMs means the app is suspended: a new connection is then held
//! (not refused, not reset) for up to `HOLD_LIMIT` while the agent, told through
//! [`Endpoints::on_waiting`], wakes a VM; every held connection goes on as soon as the
//! set has one.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::conn;
use crate::spec::Protocol;
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use uuid::Uuid;

/// How long the proxy waits for a VM to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection to a suspended app waits for a VM to wake before it is closed.
pub const HOLD_LIMIT: Duration = Duration::from_secs(60);

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

/// A published port: the host port that listens, the guest port it forwards to, and who
/// speaks first on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Published {
    pub host: u16,
    pub guest: u16,
    pub protocol: Protocol,
}

/// True when `a` and `b` listen on the same host ports for the same guest ports, in the
/// same order: they differ at most in protocols, which change without re-binding.
fn same_sockets(a: &[Published], b: &[Published]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x.host, x.guest) == (y.host, y.guest))
}

fn read<T: Copy>(lock: &RwLock<T>) -> T {
    *lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// The VMs an app's connections go to (its replicas); empty: the app is suspended, and
/// connections wait for a VM.
type Target = Arc<tokio::sync::watch::Sender<Vec<Backend>>>;

fn backends_of(target: &Target) -> Vec<Backend> {
    target.borrow().clone()
}

/// One app's traffic, for scale to zero.
struct Traffic {
    /// Connections open now (held ones included).
    open: AtomicUsize,
    /// Connections held until a VM wakes.
    waiting: AtomicUsize,
    /// When the last connection opened or closed (or the endpoint was made).
    last: Mutex<Instant>,
    /// Told when a connection starts waiting.
    notify: Arc<Mutex<Option<Arc<tokio::sync::Notify>>>>,
}

impl Traffic {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// How long no connection has been open, and how many wait for a VM.
    fn activity(&self) -> (Duration, usize) {
        let idle = if self.open.load(Ordering::SeqCst) > 0 {
            Duration::ZERO
        } else {
            self.last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
        };
        (idle, self.waiting.load(Ordering::SeqCst))
    }
}

/// Counts `n` up for as long as it lives (the traffic's clock moves at both ends).
struct Gauge<'a> {
    traffic: &'a Traffic,
    n: &'a AtomicUsize,
}

impl<'a> Gauge<'a> {
    fn new(traffic: &'a Traffic, n: &'a AtomicUsize) -> Gauge<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        traffic.touch();
        Gauge { traffic, n }
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.n.fetch_sub(1, Ordering::SeqCst);
        self.traffic.touch();
    }
}

/// One listening port: its accept loop and the protocol that loop reads at each accept.
struct Listener {
    protocol: Arc<RwLock<Protocol>>,
    task: JoinHandle<()>,
}

struct AppEndpoint {
    ports: Vec<Published>,
    target: Target,
    traffic: Arc<Traffic>,
    listeners: Vec<Listener>,
}

impl AppEndpoint {
    /// Takes the protocols of `ports` (the same sockets as now) for new connections.
    fn set_protocols(&mut self, ports: &[Published]) {
        for (listener, port) in self.listeners.iter().zip(ports) {
            *write(&listener.protocol) = port.protocol;
        }
        self.ports = ports.to_vec();
    }
}

impl Drop for AppEndpoint {
    fn drop(&mut self) {
        for l in &self.listeners {
            l.task.abort();
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

/// Where one listener's connections go.
#[derive(Clone)]
struct Route {
    guest_port: u16,
    target: Target,
    counts: Arc<Counts>,
    /// Where the search for the least busy replica starts; it moves on at every claim,
    /// so replicas with equally many connections take turns.
    next: Arc<AtomicUsize>,
    traffic: Arc<Traffic>,
}

/// A connection given a VM: the address to connect to, counted against the VM while it
/// lives.
struct Claim {
    vm: Uuid,
    addr: SocketAddr,
    _guard: ConnGuard,
}

impl Route {
    /// Gives a connection the VM of the endpoint's set with the fewest open connections
    /// now (least connections; ties take turns); None when the set is empty.
    fn claim(&self, skip: &[Uuid]) -> Option<Claim> {
        let backends: Vec<Backend> = backends_of(&self.target)
            .into_iter()
            .filter(|b| !skip.contains(&b.vm_id))
            .collect();
        let n = backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let backend = (0..n)
            .map(|i| backends[(start + i) % n])
            .min_by_key(|b| self.counts.get(b.vm_id))?;
        self.counts.add(backend.vm_id, 1);
        Some(Claim {
            vm: backend.vm_id,
            addr: SocketAddr::new(IpAddr::V4(backend.ip), self.guest_port),
            _guard: ConnGuard {
                counts: self.counts.clone(),
                vm: backend.vm_id,
            },
        })
    }
}

/// Every app's endpoint on this host.
pub struct Endpoints {
    bind: IpAddr,
    apps: Mutex<HashMap<String, AppEndpoint>>,
    counts: Arc<Counts>,
    /// How long a client of an `http` port may take to send its first bytes.
    first_bytes: Duration,
    /// Told when a connection starts waiting for a suspended app.
    waiting_notify: Arc<Mutex<Option<Arc<tokio::sync::Notify>>>>,
}

impl Endpoints {
    /// Endpoints listening on `bind` (e.g. 0.0.0.0).
    pub fn new(bind: IpAddr) -> Endpoints {
        Endpoints {
            bind,
            apps: Mutex::new(HashMap::new()),
            counts: Arc::new(Counts::default()),
            first_bytes: conn::ENDPOINT_FIRST_BYTES,
            waiting_notify: Arc::default(),
        }
    }

    /// The same, with another first-bytes deadline for `http` ports.
    #[cfg(test)]
    fn with_first_bytes(mut self, limit: Duration) -> Endpoints {
        self.first_bytes = limit;
        self
    }

    fn apps(&self) -> std::sync::MutexGuard<'_, HashMap<String, AppEndpoint>> {
        self.apps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Points the app's endpoint at `backends` (listening first if its ports are new or
    /// changed; a changed protocol alone is taken in place, by connections accepted from
    /// now on). Returns the backends it replaced.
    pub fn publish(
        &self,
        app: &str,
        ports: &[Published],
        backends: &[Backend],
    ) -> Result<Vec<Backend>, EndpointError> {
        let mut apps = self.apps();
        if apps
            .get(app)
            .is_some_and(|e| !same_sockets(&e.ports, ports))
        {
            apps.remove(app);
        }
        if let Some(e) = apps.get_mut(app) {
            e.set_protocols(ports);
            return Ok(e.target.send_replace(backends.to_vec()));
        }
        let target: Target = Arc::new(tokio::sync::watch::Sender::new(backends.to_vec()));
        let next = Arc::new(AtomicUsize::new(0));
        let traffic = Arc::new(Traffic {
            open: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            notify: self.waiting_notify.clone(),
        });
        let mut listeners = Vec::new();
        for p in ports {
            let addr = SocketAddr::new(self.bind, p.host);
            let listener = listen(addr).map_err(|source| EndpointError {
                app: app.to_string(),
                addr,
                source,
            })?;
            let route = Route {
                guest_port: p.guest,
                target: target.clone(),
                counts: self.counts.clone(),
                next: next.clone(),
                traffic: traffic.clone(),
            };
            let protocol = Arc::new(RwLock::new(p.protocol));
            let task = tokio::spawn(accept_loop(
                listener,
                route,
                protocol.clone(),
                self.first_bytes,
            ));
            listeners.push(Listener { protocol, task });
        }
        apps.insert(
            app.to_string(),
            AppEndpoint {
                ports: ports.to_vec(),
                target,
                traffic,
                listeners,
            },
        );
        Ok(Vec::new())
    }

    /// Closes the app's listeners (open connections live on until their VM goes).
    pub fn unpublish(&self, app: &str) {
        self.apps().remove(app);
    }

    /// The VMs the app's endpoint leads to.
    pub fn backends(&self, app: &str) -> Vec<Backend> {
        let apps = self.apps();
        apps.get(app)
            .map(|e| backends_of(&e.target))
            .unwrap_or_default()
    }

    /// True when the app's endpoint listens on exactly `ports` (protocols included) and
    /// leads to exactly `backends`.
    pub fn is_current(&self, app: &str, ports: &[Published], backends: &[Backend]) -> bool {
        let apps = self.apps();
        apps.get(app)
            .is_some_and(|e| e.ports == ports && backends_of(&e.target) == backends)
    }

    /// Apps with an endpoint.
    pub fn published_apps(&self) -> Vec<String> {
        self.apps().keys().cloned().collect()
    }

    /// Open proxied connections to a VM (not counting clients of `http` ports that have
    /// not sent anything yet: they are given no VM until they do).
    pub fn connections(&self, vm_id: Uuid) -> usize {
        self.counts.get(vm_id)
    }

    /// The app's traffic: how long no connection has been open, and how many wait for a
    /// VM. None: the app has no endpoint.
    pub fn activity(&self, app: &str) -> Option<(Duration, usize)> {
        self.apps().get(app).map(|e| e.traffic.activity())
    }

    /// Has `notify` told whenever a connection starts waiting for a VM.
    pub fn on_waiting(&self, notify: Arc<tokio::sync::Notify>) {
        *self
            .waiting_notify
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(notify);
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

/// A listener on `addr` (address reuse as std sets it, so a port in TIME_WAIT can be
/// published again at once) with the endpoint's accept backlog.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(conn::ENDPOINT_BACKLOG)
}

async fn accept_loop(
    listener: TcpListener,
    route: Route,
    protocol: Arc<RwLock<Protocol>>,
    first_bytes: Duration,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(conn::ENDPOINT_MAX_CONNECTIONS));
    loop {
        let ((client, peer), permit) =
            conn::accept_bounded(&slots, "endpoint", || listener.accept()).await;
        match read(&protocol) {
            Protocol::Tcp => {
                let route = route.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    serve(client, peer, &route).await;
                });
            }
            Protocol::Http => {
                let route = route.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if !client_spoke(&client, peer, first_bytes).await {
                        return;
                    }
                    serve(client, peer, &route).await;
                });
            }
        }
    }
}

/// Holds a connection to a suspended app (its set is empty) until a VM is back, at most
/// `HOLD_LIMIT`; false when none came.
async fn wait_for_vm(peer: SocketAddr, route: &Route) -> bool {
    let _waiting = Gauge::new(&route.traffic, &route.traffic.waiting);
    let mut set = route.target.subscribe();
    let notify = route
        .traffic
        .notify
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(notify) = notify {
        notify.notify_one();
    }
    let woken = tokio::time::timeout(HOLD_LIMIT, set.wait_for(|b| !b.is_empty())).await;
    if !matches!(woken, Ok(Ok(_))) {
        warn!(%peer, "endpoint: no VM woke within {HOLD_LIMIT:?}; connection closed");
        return false;
    }
    true
}

/// Waits, at most `limit`, for the client's first bytes (left unread, for the VM).
/// False when it closed, failed or stayed silent: the connection is then dropped.
async fn client_spoke(client: &TcpStream, peer: SocketAddr, limit: Duration) -> bool {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(limit, client.peek(&mut byte)).await {
        Ok(Ok(n)) if n > 0 => true,
        Ok(Ok(_)) => {
            debug!(%peer, "endpoint: client closed before sending anything");
            false
        }
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "endpoint: client failed before sending anything");
            false
        }
        Err(_) => {
            debug!(%peer, ?limit, "endpoint: client sent nothing; closed");
            false
        }
    }
}

/// Connects to the least busy VM of the route and copies both ways until the connection
/// ends or idles. A VM that does not accept (it died, and the agent has not yet taken it
/// out of the set) costs the client a retry on the next replica, not a failed request:
/// nothing reached the VM yet, so trying another is safe.
async fn serve(client: TcpStream, peer: SocketAddr, route: &Route) {
    let _open = Gauge::new(&route.traffic, &route.traffic.open);
    let mut tried = Vec::new();
    let (upstream, _claim) = loop {
        let Some(claim) = route.claim(&tried) else {
            // An empty set (also one emptied since the last look): the app is suspended,
            // and the connection waits for a VM.
            if tried.is_empty() && wait_for_vm(peer, route).await {
                continue;
            }
            warn!(%peer, tried = tried.len(), "endpoint: no VM accepted the connection");
            return;
        };
        let addr = claim.addr;
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => break (s, claim),
            Ok(Err(e)) => {
                warn!(%peer, %addr, error = %e, "endpoint: the VM refused the connection")
            }
            Err(_) => warn!(%peer, %addr, "endpoint: the VM did not accept within 5 s"),
        }
        tried.push(claim.vm);
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    match conn::proxy(client, upstream, conn::ENDPOINT_IDLE).await {
        Ok(conn::ProxyEnd::Closed) => {}
        Ok(conn::ProxyEnd::Idle) => debug!(%peer, "endpoint connection idle; closed"),
        Err(e) => debug!(%peer, error = %e, "endpoint connection ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback server (standing for a VM) answering every connection with `tag` once
    /// it has read a byte, and counting the connections it accepted.
    struct Server {
        port: u16,
        accepted: Arc<AtomicUsize>,
        _task: JoinHandle<()>,
    }

    impl Server {
        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    async fn server(tag: &'static [u8]) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(tag).await;
                });
            }
        });
        Server {
            port,
            accepted,
            _task: task,
        }
    }

    /// Endpoints on loopback and one `tcp` port (free on the host) leading to `vm`'s port.
    fn tcp_endpoint(vm: &Server) -> (Endpoints, u16, [Published; 1]) {
        let host = free_port();
        let ports = [Published {
            host,
            guest: vm.port,
            protocol: Protocol::Tcp,
        }];
        (Endpoints::new(IpAddr::V4(Ipv4Addr::LOCALHOST)), host, ports)
    }

    fn loopback(vm: u128) -> Backend {
        Backend {
            vm_id: Uuid::from_u128(vm),
            ip: Ipv4Addr::LOCALHOST,
        }
    }

    /// `n` connections to `port` that send nothing.
    async fn idle_clients(port: u16, n: usize) -> Vec<TcpStream> {
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            clients.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        }
        clients
    }

    async fn wait_until(what: &str, limit: Duration, done: impl Fn() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
        let blue_server = server(b"blue").await;
        let eps = Endpoints::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let host = free_port();
        let blue = loopback(1);
        let ports = [Published {
            host,
            guest: blue_server.port,
            protocol: Protocol::Tcp,
        }];
        assert_eq!(eps.publish("web", &ports, &[blue]).unwrap(), vec![]);
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
        let green = loopback(2);
        assert_eq!(eps.publish("web", &ports, &[green]).unwrap(), vec![blue]);
        assert_eq!(eps.backends("web"), vec![green]);
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
                    protocol: Protocol::Tcp,
                }],
                &[green],
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

    /// Scale to zero: with an empty set (the app is suspended) connections are held, not
    /// refused; the agent is told; all of them go on once a VM is back. The app's idle
    /// time counts from its last connection.
    #[tokio::test]
    async fn scale_to_zero_connections_wait_for_a_vm_and_all_go_on() {
        let vm = server(b"awake").await;
        let (eps, host, ports) = tcp_endpoint(&vm);
        let told = Arc::new(tokio::sync::Notify::new());
        eps.on_waiting(told.clone());
        eps.publish("web", &ports, &[]).unwrap();
        let clients: Vec<_> = (0..5).map(|_| tokio::spawn(ask(host))).collect();
        tokio::time::timeout(Duration::from_secs(5), told.notified())
            .await
            .expect("the agent is told");
        wait_until("five waiting", Duration::from_secs(5), || {
            eps.activity("web") == Some((Duration::ZERO, 5))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(vm.accepted(), 0);
        eps.publish("web", &ports, &[loopback(1)]).unwrap();
        for c in clients {
            assert_eq!(c.await.unwrap(), b"awake");
        }
        wait_until("idle", Duration::from_secs(5), || {
            eps.activity("web")
                .is_some_and(|(idle, waiting)| idle > Duration::ZERO && waiting == 0)
        })
        .await;
        assert_eq!(eps.activity("other"), None);
    }

    /// The point of `protocol = "http"`: thousands of clients that connect and send
    /// nothing open no connection to the VM (a forking guest would run out of memory),
    /// do not count against its drain, and a client that sends a request is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_ports_connect_to_the_vm_only_when_the_client_speaks() {
        const IDLE: usize = 2000;
        let open_files = crate::hardening::raise_nofile().unwrap();
        assert!(
            open_files >= 2 * IDLE as u64 + 200,
            "the test needs {} descriptors; the hard limit is {open_files}",
            2 * IDLE + 200
        );
        let vm = server(b"answer").await;
        let eps = Endpoints::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let host = free_port();
        let ports = [Published {
            host,
            guest: vm.port,
            protocol: Protocol::Http,
        }];
        eps.publish("web", &ports, &[loopback(1)]).unwrap();

        let idle = idle_clients(host, IDLE).await;
        // Accepted in order: this one comes after every idle client was accepted.
        assert_eq!(ask(host).await, b"answer");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            vm.accepted(),
            1,
            "only the client that spoke reached the VM"
        );
        assert_eq!(
            eps.connections(loopback(1).vm_id),
            0,
            "idle clients hold no VM"
        );
        drop(idle);
    }

    /// The default (`tcp`) keeps connecting at accept, for servers that speak first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_ports_connect_to_the_vm_at_once_so_it_can_speak_first() {
        let vm = server(b"greeting").await;
        let (eps, host, ports) = tcp_endpoint(&vm);
        eps.publish("db", &ports, &[loopback(1)]).unwrap();
        let idle = idle_clients(host, 50).await;
        wait_until("50 connections to the VM", Duration::from_secs(5), || {
            vm.accepted() == 50
        })
        .await;
        assert_eq!(eps.connections(loopback(1).vm_id), 50);
        drop(idle);
    }

    /// A client of an `http` port that sends nothing is closed at the first-bytes deadline
    /// and never reaches the VM; one that closes at once costs nothing either.
    #[tokio::test]
    async fn a_silent_http_client_is_closed_at_the_deadline() {
        let vm = server(b"answer").await;
        let eps = Endpoints::new(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .with_first_bytes(Duration::from_millis(300));
        let host = free_port();
        let ports = [Published {
            host,
            guest: vm.port,
            protocol: Protocol::Http,
        }];
        eps.publish("web", &ports, &[loopback(1)]).unwrap();

        drop(TcpStream::connect(("127.0.0.1", host)).await.unwrap());
        let mut silent = TcpStream::connect(("127.0.0.1", host)).await.unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
            .await
            .expect("closed by the endpoint")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
        assert!(
            start.elapsed() >= Duration::from_millis(250),
            "not before the deadline"
        );
        assert_eq!(vm.accepted(), 0, "neither client reached the VM");
        // A client that waits a while, but less than the deadline, is served.
        let mut slow = TcpStream::connect(("127.0.0.1", host)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        slow.write_all(b"x").await.unwrap();
        let mut out = Vec::new();
        slow.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"answer");
    }

    /// Replicas: each new connection goes to the backend with the fewest open ones, and
    /// a backend taken out of the set gets no new connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_get_connections_by_least_connections() {
        let vm = server(b"answer").await;
        let (eps, host, ports) = tcp_endpoint(&vm);
        let (a, b) = (loopback(1), loopback(2));
        eps.publish("web", &ports, &[a, b]).unwrap();
        assert_eq!(eps.backends("web"), vec![a, b]);
        let mut held = Vec::new();
        for want in 1..=4usize {
            held.push(TcpStream::connect(("127.0.0.1", host)).await.unwrap());
            let start = Instant::now();
            while eps.connections(a.vm_id) + eps.connections(b.vm_id) < want {
                assert!(start.elapsed() < Duration::from_secs(5));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let (na, nb) = (eps.connections(a.vm_id), eps.connections(b.vm_id));
            assert!(na.abs_diff(nb) <= 1, "{want} connections split {na}/{nb}");
        }
        // `a` leaves the set: new connections all go to `b`.
        eps.publish("web", &ports, &[b]).unwrap();
        let before = eps.connections(b.vm_id);
        held.push(TcpStream::connect(("127.0.0.1", host)).await.unwrap());
        held.push(TcpStream::connect(("127.0.0.1", host)).await.unwrap());
        let start = Instant::now();
        while eps.connections(b.vm_id) < before + 2 {
            assert!(start.elapsed() < Duration::from_secs(5), "not routed to b");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            eps.connections(a.vm_id),
            2,
            "a keeps only its old connections"
        );
        drop(held);
    }

    /// A replica that does not accept (dead, not yet out of the set) costs a retry on
    /// another, never a failed connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_a_dead_replica_is_skipped_not_failed() {
        let vm = server(b"alive").await;
        let (eps, host, ports) = tcp_endpoint(&vm);
        // Nothing listens on 127.0.0.2 at that port: connections there are refused.
        let dead = Backend {
            vm_id: Uuid::from_u128(9),
            ip: Ipv4Addr::new(127, 0, 0, 2),
        };
        eps.publish("web", &ports, &[dead, loopback(1)]).unwrap();
        for _ in 0..6 {
            assert_eq!(ask(host).await, b"alive");
        }
        assert_eq!(vm.accepted(), 6);
    }

    /// A changed protocol is taken in place: no re-bind (no window in which the port is
    /// closed or taken), and new connections follow the new protocol.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_protocol_change_is_taken_without_rebinding() {
        let vm = server(b"answer").await;
        let eps = Endpoints::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let host = free_port();
        let tcp = [Published {
            host,
            guest: vm.port,
            protocol: Protocol::Tcp,
        }];
        let http = [Published {
            protocol: Protocol::Http,
            ..tcp[0]
        }];
        eps.publish("web", &tcp, &[loopback(1)]).unwrap();
        assert_eq!(ask(host).await, b"answer");
        assert!(eps.is_current("web", &tcp, &[loopback(1)]));
        assert!(
            !eps.is_current("web", &http, &[loopback(1)]),
            "protocols count"
        );

        assert_eq!(
            eps.publish("web", &http, &[loopback(1)]).unwrap(),
            vec![loopback(1)],
            "the same endpoint, updated"
        );
        assert!(eps.is_current("web", &http, &[loopback(1)]));
        let idle = idle_clients(host, 20).await;
        assert_eq!(ask(host).await, b"answer", "served without a pause");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            vm.accepted(),
            2,
            "the first ask and this one; no idle client"
        );
        drop(idle);
    }
}
