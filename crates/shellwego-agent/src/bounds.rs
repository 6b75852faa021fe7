//! The largest (and smallest) things a spec may ask for, checked at `validate` and
//! `apply`, so that a mistake or a hostile spec is refused with the field named before it
//! costs the host anything (a 10 MB env value would otherwise reach the guest, the
//! database and every event).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::spec::{invalid, DesiredApp, SecretSource, SpecError};

pub const MIN_CPU_MILLI: u64 = 50;
pub const MAX_CPU_MILLI: u64 = 64_000;
pub const MIN_MEMORY: u64 = 32 << 20;
pub const MAX_MEMORY: u64 = 256 << 30;
pub const MIN_DISK: u64 = 64 << 20;
pub const MAX_DISK: u64 = 4 << 40;
pub const MAX_ENV_VARS: usize = 512;
/// One env or secret value, and one argument of `run`.
pub const MAX_VALUE: usize = 64 << 10;
/// All env values, all secret values, and all arguments, each together.
pub const MAX_TOTAL: usize = 256 << 10;
pub const MAX_SECRETS: usize = 128;
pub const MAX_ARGS: usize = 1024;
pub const MAX_PORTS: usize = 64;
/// Replicas of one app on one host.
pub const MAX_COUNT: u32 = 32;
/// Probes at least every 5 minutes: an app checked less often could be dead that long
/// unnoticed. At most 10 a second: more only loads the guest.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(300);
/// A probe waits at most a minute for its answer (and never longer than the interval,
/// see `spec`): an app that needs longer to answer a health check is not healthy, and the
/// probe holds a task meanwhile. A zero timeout could never pass.
pub const MIN_HEALTH_TIMEOUT: Duration = Duration::from_millis(10);
pub const MAX_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// A new version has at most 30 minutes to become healthy: meanwhile the old version
/// keeps running beside it and the rollout waits; on emulated hosts the grace is stretched
/// further (see `health::for_host`). Under a second no app starts.
pub const MIN_HEALTH_GRACE: Duration = Duration::from_secs(1);
pub const MAX_HEALTH_GRACE: Duration = Duration::from_secs(30 * 60);
pub const MAX_HEALTH_RETRIES: u32 = 100;
/// Scale to zero after at least a second without traffic (less would suspend between
/// a client's requests) and at most a week.
pub const MIN_SCALE_IDLE: Duration = Duration::from_secs(1);
pub const MAX_SCALE_IDLE: Duration = Duration::from_secs(7 * 24 * 3600);
pub const MAX_BITRATE: u64 = 100_000_000_000;

fn too_big(field: String, size: usize, limit: usize) -> SpecError {
    invalid(
        field,
        format!("{size} bytes"),
        &format!("is larger than the limit of {limit} bytes"),
    )
}

fn range(field: &str, value: u64, min: u64, max: u64, shown: &str) -> Result<(), SpecError> {
    if value < min || value > max {
        return Err(invalid(
            field,
            shown,
            &format!("must be between {min} and {max} ({})", unit_of(field)),
        ));
    }
    Ok(())
}

fn duration_range(
    field: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), SpecError> {
    if value > max {
        return Err(invalid(
            field,
            format!("{value:?}"),
            &format!("must be at most {max:?}"),
        ));
    }
    if value < min {
        return Err(invalid(
            field,
            format!("{value:?}"),
            &format!("must be at least {min:?}"),
        ));
    }
    Ok(())
}

fn unit_of(field: &str) -> &'static str {
    if field.ends_with("cpu") {
        "thousandths of a core"
    } else {
        "bytes"
    }
}

/// Checks an app's sizes and counts against the limits above.
pub fn check(app: &DesiredApp) -> Result<(), SpecError> {
    let r = &app.resources;
    range(
        "resources.cpu",
        r.cpu_milli,
        MIN_CPU_MILLI,
        MAX_CPU_MILLI,
        &format!("{}m", r.cpu_milli),
    )?;
    range(
        "resources.memory",
        r.memory_bytes,
        MIN_MEMORY,
        MAX_MEMORY,
        &r.memory_bytes.to_string(),
    )?;
    range(
        "resources.disk",
        r.disk_bytes,
        MIN_DISK,
        MAX_DISK,
        &r.disk_bytes.to_string(),
    )?;
    if app.env.len() > MAX_ENV_VARS {
        return Err(invalid(
            "env",
            format!("{} variables", app.env.len()),
            &format!("has more than {MAX_ENV_VARS} variables"),
        ));
    }
    let mut total = 0;
    for (k, v) in &app.env {
        if v.len() > MAX_VALUE {
            return Err(too_big(format!("env.{k}"), v.len(), MAX_VALUE));
        }
        total += k.len() + v.len();
    }
    if total > MAX_TOTAL {
        return Err(too_big("env".into(), total, MAX_TOTAL));
    }
    if app.secrets.len() > MAX_SECRETS {
        return Err(invalid(
            "secrets",
            format!("{} secrets", app.secrets.len()),
            &format!("has more than {MAX_SECRETS} secrets"),
        ));
    }
    for (k, s) in &app.secrets {
        if let SecretSource::Value(v) = s {
            if v.len() > MAX_VALUE {
                return Err(too_big(format!("secrets.{k}.value"), v.len(), MAX_VALUE));
            }
        }
    }
    for (field, argv) in [
        ("run.entrypoint", &app.run.entrypoint),
        ("run.cmd", &app.run.cmd),
    ] {
        let Some(argv) = argv else { continue };
        if argv.len() > MAX_ARGS {
            return Err(invalid(
                field,
                format!("{} arguments", argv.len()),
                &format!("has more than {MAX_ARGS} arguments"),
            ));
        }
        let size: usize = argv.iter().map(String::len).sum();
        if let Some(long) = argv.iter().find(|a| a.len() > MAX_VALUE) {
            return Err(too_big(field.into(), long.len(), MAX_VALUE));
        }
        if size > MAX_TOTAL {
            return Err(too_big(field.into(), size, MAX_TOTAL));
        }
    }
    if app.ports.len() > MAX_PORTS {
        return Err(invalid(
            "ports",
            format!("{} ports", app.ports.len()),
            &format!("has more than {MAX_PORTS} ports"),
        ));
    }
    if let Some(h) = &app.health {
        for (field, value, min, max) in [
            (
                "health.interval",
                h.interval,
                MIN_HEALTH_INTERVAL,
                MAX_HEALTH_INTERVAL,
            ),
            (
                "health.timeout",
                h.timeout,
                MIN_HEALTH_TIMEOUT,
                MAX_HEALTH_TIMEOUT,
            ),
            ("health.grace", h.grace, MIN_HEALTH_GRACE, MAX_HEALTH_GRACE),
        ] {
            duration_range(field, value, min, max)?;
        }
        if h.retries > MAX_HEALTH_RETRIES {
            return Err(invalid(
                "health.retries",
                h.retries.to_string(),
                &format!("must be at most {MAX_HEALTH_RETRIES}"),
            ));
        }
    }
    if let Some(idle) = app.scale.idle {
        duration_range("scale.idle", idle, MIN_SCALE_IDLE, MAX_SCALE_IDLE)?;
    }
    for (field, bps) in [
        ("bandwidth.download", app.bandwidth.download_bps),
        ("bandwidth.upload", app.bandwidth.upload_bps),
    ] {
        if bps.is_some_and(|b| b > MAX_BITRATE) {
            return Err(invalid(
                field,
                format!("{} bit/s", bps.unwrap_or_default()),
                &format!("must be at most {MAX_BITRATE} bit/s"),
            ));
        }
    }
    Ok(())
}

/// Checks the secret values `apply` delivers (from the environment, files or the spec).
pub fn check_secret_values(values: &BTreeMap<String, String>) -> Result<(), SpecError> {
    let mut total = 0;
    for (k, v) in values {
        if v.len() > MAX_VALUE {
            return Err(too_big(format!("secrets.{k}"), v.len(), MAX_VALUE));
        }
        total += k.len() + v.len();
    }
    if total > MAX_TOTAL {
        return Err(too_big("secrets".into(), total, MAX_TOTAL));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(extra: &str) -> String {
        format!("name = \"a\"\nimage = \"alpine:3.23\"\n{extra}")
    }

    #[test]
    fn a_ten_megabyte_env_value_is_refused_naming_the_field_not_printing_it() {
        let big = "x".repeat(10 << 20);
        let err = DesiredApp::from_toml(&spec_with(&format!("[env]\nBIG = \"{big}\"\n")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("env.BIG") && err.contains("10485760 bytes"),
            "{}",
            &err[..200.min(err.len())]
        );
        assert!(
            err.len() < 300,
            "the value is not echoed: {} bytes",
            err.len()
        );
    }

    #[test]
    fn resources_have_bounds() {
        for (res, field) in [
            ("cpu = \"10m\"", "resources.cpu"),
            ("cpu = \"65\"", "resources.cpu"),
            ("memory = \"1Mi\"", "resources.memory"),
            ("memory = \"1Ti\"", "resources.memory"),
            ("disk = \"1Mi\"", "resources.disk"),
            ("disk = \"5Ti\"", "resources.disk"),
        ] {
            let err = DesiredApp::from_toml(&spec_with(&format!("[resources]\n{res}\n")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(field) && err.contains("must be between"),
                "{res}: {err}"
            );
        }
        assert!(
            DesiredApp::from_toml(&spec_with("[resources]\ncpu = \"2\"\nmemory = \"4Gi\"\n"))
                .is_ok()
        );
    }

    #[test]
    fn counts_and_durations_have_bounds() {
        let many: String = (0..600).map(|i| format!("V{i} = \"x\"\n")).collect();
        let err = DesiredApp::from_toml(&spec_with(&format!("[env]\n{many}"))).unwrap_err();
        assert!(err.to_string().contains("more than 512"), "{err}");
        let err = DesiredApp::from_toml(&spec_with(
            "[health]\ntcp = true\nport = 80\ngrace = \"2h\"\n",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("health.grace"), "{err}");
    }

    #[test]
    fn tc_u14_deadline_health_durations_have_maxima_and_minima_named_in_the_error() {
        let health = |extra: &str| {
            DesiredApp::from_toml(&spec_with(&format!(
                "[health]\ntcp = true\nport = 80\n{extra}\n"
            )))
            .map(drop)
            .map_err(|e| e.to_string())
        };
        for (extra, want) in [
            (
                "grace = \"31m\"",
                "health.grace: \"1860s\" must be at most 1800s",
            ),
            (
                "grace = \"500ms\"",
                "health.grace: \"500ms\" must be at least 1s",
            ),
            (
                "interval = \"11m\"",
                "health.interval: \"660s\" must be at most 300s",
            ),
            (
                "interval = \"50ms\"\ntimeout = \"10ms\"",
                "health.interval: \"50ms\" must be at least 100ms",
            ),
            (
                "interval = \"5m\"\ntimeout = \"2m\"",
                "health.timeout: \"120s\" must be at most 60s",
            ),
            (
                "timeout = \"5ms\"",
                "health.timeout: \"5ms\" must be at least 10ms",
            ),
        ] {
            assert_eq!(health(extra), Err(want.to_string()), "{extra}");
        }
        for ok in [
            "grace = \"30m\"\ninterval = \"5m\"\ntimeout = \"1m\"",
            "grace = \"1s\"\ninterval = \"100ms\"\ntimeout = \"10ms\"",
        ] {
            assert_eq!(health(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn delivered_secret_values_have_bounds() {
        let mut v = BTreeMap::new();
        v.insert("K".to_string(), "x".repeat(MAX_VALUE + 1));
        assert!(check_secret_values(&v)
            .unwrap_err()
            .to_string()
            .contains("secrets.K"));
        v.insert("K".to_string(), "ok".into());
        assert!(check_secret_values(&v).is_ok());
    }
}
