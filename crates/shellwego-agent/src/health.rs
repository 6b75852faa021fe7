//! Host-side health checks of app VMs: an HTTP GET (2xx/3xx passes) or a TCP connect,
//! with the spec's interval, timeout, retries and grace period.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::spec::{HealthCheck, Probe};

/// The check as it applies on a host kind: on emulated hosts a guest answers slowly, so
/// the probe timeout and the grace period are stretched. The interval is kept: probes
/// start every interval, or right after a probe that took longer.
pub fn for_host(check: &HealthCheck, kind: crate::host::HostKind) -> HealthCheck {
    let factor = kind.time_factor().min(10);
    HealthCheck {
        timeout: check.timeout * factor,
        grace: check.grace * factor,
        ..check.clone()
    }
}

/// Why a probe did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    pub message: String,
    /// The host, not the VM, could not probe (out of descriptors or memory): this says
    /// nothing about the app and must never count against it.
    pub inconclusive: bool,
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for ProbeFailure {
    fn from(message: String) -> ProbeFailure {
        ProbeFailure {
            message,
            inconclusive: false,
        }
    }
}

/// Errors that mean this host ran out of something, not that the peer failed.
pub fn is_local_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// One probe; `Err` says why it failed. All of it (connect, request, the answer's first
/// bytes) within `check.timeout`: a guest that accepts and never answers, or answers a
/// byte at a time, fails the probe when the timeout is over.
pub async fn probe(ip: Ipv4Addr, check: &HealthCheck) -> Result<(), ProbeFailure> {
    let addr = SocketAddr::from((ip, check.port));
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| ProbeFailure {
            message: format!("connect {addr}: {e}"),
            inconclusive: is_local_exhaustion(&e),
        })?;
        let Probe::Http { path } = &check.probe else {
            return Ok::<(), ProbeFailure>(());
        };
        let req =
            format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\nUser-Agent: shellwego-health\r\n\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut head = vec![0u8; 64];
        let n = stream
            .read(&mut head)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let line = String::from_utf8_lossy(&head[..n]);
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                format!(
                    "not an HTTP answer: {:?}",
                    line.lines().next().unwrap_or("")
                )
            })?;
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("GET {path} answered {status}").into())
        }
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", check.timeout).into()),
    }
}

/// The first pause between the probes of a VM waiting to become healthy.
const FIRST_STARTUP_PAUSE: Duration = Duration::from_millis(100);

/// The pause after the `probes`-th failed probe of a VM waiting to become healthy:
/// 100 ms for the first four, then doubling every four probes up to the check's
/// interval. An app that is up a moment after its start is found up a moment after
/// (not up to an interval later), and one that takes long costs a probe per interval.
/// A serving VM is probed every interval.
pub fn startup_pause(probes: u32, interval: Duration) -> Duration {
    let doublings = (probes.saturating_sub(1) / 4).min(16);
    FIRST_STARTUP_PAUSE
        .saturating_mul(1 << doublings)
        .min(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_inconclusive() {
        assert!(is_local_exhaustion(&std::io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(!is_local_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ECONNREFUSED
        )));
    }

    fn check(probe: Probe, port: u16) -> HealthCheck {
        HealthCheck {
            probe,
            port,
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            retries: 3,
            grace: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn tc_u14_deadline_a_probe_of_a_silent_app_fails_at_its_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let mut c = check(Probe::Http { path: "/".into() }, port);
        c.timeout = Duration::from_millis(300);
        let start = std::time::Instant::now();
        let err = probe(Ipv4Addr::LOCALHOST, &c).await.unwrap_err();
        let took = start.elapsed();
        assert!(
            took >= c.timeout && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(err.message, "no answer within 300ms");
        assert!(!err.inconclusive);
    }

    #[tokio::test]
    async fn http_and_tcp_probes_against_a_real_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let status = if req.starts_with("GET /ok ") {
                    "200 OK"
                } else {
                    "503 Unavailable"
                };
                let _ = s
                    .write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let lo = Ipv4Addr::LOCALHOST;
        assert!(probe(lo, &check(Probe::Tcp, port)).await.is_ok());
        assert!(probe(lo, &check(Probe::Http { path: "/ok".into() }, port))
            .await
            .is_ok());
        let err = probe(
            lo,
            &check(
                Probe::Http {
                    path: "/bad".into(),
                },
                port,
            ),
        )
        .await
        .unwrap_err();
        assert!(err.message.contains("503") && !err.inconclusive, "{err}");
    }

    #[test]
    fn tc_u15_startup_probes_start_fast_and_slow_down_to_the_interval() {
        let second = Duration::from_secs(1);
        let pauses: Vec<u128> = (1..=16)
            .map(|n| startup_pause(n, second).as_millis())
            .collect();
        assert_eq!(
            pauses,
            [100, 100, 100, 100, 200, 200, 200, 200, 400, 400, 400, 400, 800, 800, 800, 800]
        );
        assert_eq!(startup_pause(17, second), second);
        assert_eq!(startup_pause(u32::MAX, second), second);
        // Never longer than the interval, even a short one.
        let short = Duration::from_millis(50);
        assert!((1..40).all(|n| startup_pause(n, short) == short));
    }
}
