//! What the guest init gets at `run`, from the app spec and the image's config (pure).
//!
//! Docker's rules: the spec's `entrypoint` replaces the image's and then the image's `Cmd`
//! is dropped unless the spec gives `cmd` too; the spec's `cmd` replaces the image's `Cmd`.
//! Env is the image's `Env` with the spec's `env` on top; secrets travel separately.

use std::collections::BTreeMap;

use shellwego_proto::{NetConfig, RunConfig};
use shellwego_storage::image::ImageConfig;

use crate::spec::DesiredApp;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunConfigError {
    #[error("app {0}: neither the spec nor the image says what to run (no entrypoint or cmd)")]
    NothingToRun(String),
}

/// The argv: entrypoint + cmd under Docker's override rules.
pub fn argv(app: &DesiredApp, image: &ImageConfig) -> Result<Vec<String>, RunConfigError> {
    let entrypoint = app
        .run
        .entrypoint
        .clone()
        .unwrap_or_else(|| image.entrypoint.clone());
    let cmd = match (&app.run.entrypoint, &app.run.cmd) {
        (_, Some(cmd)) => cmd.clone(),
        (Some(_), None) => vec![],
        (None, None) => image.cmd.clone(),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(RunConfigError::NothingToRun(app.name.clone()));
    }
    Ok(argv)
}

/// The image's `Env` ("K=V") with the spec's env on top.
pub fn env(app: &DesiredApp, image: &ImageConfig) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = image
        .env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    env.extend(app.env.clone());
    env
}

/// The whole run config of an app VM.
pub fn run_config(
    app: &DesiredApp,
    image: &ImageConfig,
    net: Option<NetConfig>,
    secrets: BTreeMap<String, String>,
    clock: (i64, u32),
    entropy: Vec<u8>,
) -> Result<RunConfig, RunConfigError> {
    Ok(RunConfig {
        argv: argv(app, image)?,
        env: env(app, image),
        secrets,
        workdir: app
            .run
            .workdir
            .clone()
            .unwrap_or_else(|| image.working_dir.clone()),
        user: app.run.user.clone().unwrap_or_else(|| image.user.clone()),
        hostname: app.name.clone(),
        net,
        clock: Some(clock),
        entropy,
        root_device: "/dev/vda".into(),
        root_device_bytes: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(entrypoint: Option<&[&str]>, cmd: Option<&[&str]>) -> DesiredApp {
        let mut a =
            DesiredApp::from_toml("name = \"web\"\nimage = \"alpine:3.23\"\n[env]\nA = \"spec\"\n")
                .unwrap();
        a.run.entrypoint = entrypoint.map(|e| e.iter().map(|s| s.to_string()).collect());
        a.run.cmd = cmd.map(|e| e.iter().map(|s| s.to_string()).collect());
        a
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["--image-arg".into()],
            env: vec!["A=image".into(), "PATH=/bin".into(), "broken".into()],
            working_dir: "/srv".into(),
            user: "nobody".into(),
            exposed_ports: vec![],
        }
    }

    #[test]
    fn docker_override_rules() {
        assert_eq!(
            argv(&app(None, None), &image()).unwrap(),
            vec!["/entry", "--image-arg"]
        );
        assert_eq!(
            argv(&app(None, Some(&["x"])), &image()).unwrap(),
            vec!["/entry", "x"]
        );
        assert_eq!(
            argv(&app(Some(&["/other"]), None), &image()).unwrap(),
            vec!["/other"]
        );
        assert_eq!(
            argv(&app(Some(&["/o"]), Some(&["y"])), &image()).unwrap(),
            vec!["/o", "y"]
        );
        let empty = ImageConfig::default();
        assert!(argv(&app(None, None), &empty).is_err());
    }

    #[test]
    fn env_workdir_user_hostname() {
        let rc = run_config(
            &app(None, None),
            &image(),
            None,
            BTreeMap::new(),
            (1, 0),
            vec![],
        )
        .unwrap();
        assert_eq!(rc.env["A"], "spec");
        assert_eq!(rc.env["PATH"], "/bin");
        assert!(!rc.env.contains_key("broken"));
        assert_eq!(
            (rc.workdir.as_str(), rc.user.as_str(), rc.hostname.as_str()),
            ("/srv", "nobody", "web")
        );
        assert_eq!(rc.root_device, "/dev/vda");
    }
}
