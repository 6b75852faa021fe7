//! `shellwego`: the ShellWeGo node agent and its command line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use shellwego_agent::client::AgentClient;
use shellwego_agent::command::MAX_EVENTS_PER_PAGE;
use shellwego_agent::config::Config;
use shellwego_agent::reconciler::{Health, VmState};
use shellwego_agent::spec::{DesiredApp, SecretSource};
use shellwego_agent::vmm::config::{machine_config, MachineLimits};
use shellwego_agent::wire::{uptime, ApplyRequest};
use shellwego_agent::{daemon, doctor, host};

/// ShellWeGo turns a Linux host into a microVM platform: apps declared in a spec file run
/// as Firecracker microVMs on ZFS copy-on-write disks.
#[derive(Parser)]
#[command(name = "shellwego", version, about)]
struct Cli {
    /// The agent's API socket (default: <run dir>/agent.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Talk to the agent's TCP API instead (http://HOST:PORT, see `api_tcp`); the bearer
    /// token comes from SHELLWEGO_API_TOKEN or the token file.
    #[arg(long, global = true)]
    api_url: Option<String>,
    /// The TCP API's token file (default: the agent's `api_token_file`).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run the agent: reconcile the desired state and serve the API (as root).
    Agent,
    /// Deploy or update an app from its spec file; returns when it is healthy or failed.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Return once the agent accepted the spec, without waiting.
        #[arg(long)]
        detach: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// List apps, their VMs, versions, IPs, health and uptime.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Show an app's guest console (the app's stdout/stderr and the guest's messages).
    Logs {
        app: String,
        #[arg(short = 'n', long, default_value_t = 200)]
        lines: usize,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a command in an app's VM: `shellwego exec APP -- CMD ARGS...`.
    Exec {
        app: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Remove an app: its VMs, TAPs, leases and disks.
    Rm { app: String },
    /// Suspend an app's VMs now (snapshot, stop; disk and network kept); the next
    /// connection to its endpoint, or `wake`, restores them. Returns once suspended.
    Suspend { app: String },
    /// Wake a suspended app's VMs from their snapshots; returns once they serve.
    Wake { app: String },
    /// The agent's event log (deploys, health, swaps, failures), oldest first.
    Events {
        /// Only this app's events.
        app: Option<String>,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// At most this many events (the agent gives at most 1000); page on with --since.
        #[arg(long, default_value_t = MAX_EVENTS_PER_PAGE)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Pulled images.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// Check this host's prerequisites (KVM, Firecracker, ZFS, networking, guest kernel)
    /// and print one line each with a fix; exits non-zero if a required one is missing.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Validate an app spec file and show the VM it would get on this host.
    Validate {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// List pulled images.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image (by digest) and the layers no other image uses.
    Rm { digest: String },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHELLWEGO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = enter_netns_from_env() {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `SHELLWEGO_NETNS=NAME`: the whole process (bridge, TAPs, VMs, health checks) works in
/// that network namespace. Entered before any thread starts, so every thread inherits it;
/// unlike `ip netns exec`, the mount namespace stays the host's (ZFS mounts stay visible).
fn enter_netns_from_env() -> Result<()> {
    let Some(name) = std::env::var_os("SHELLWEGO_NETNS").filter(|n| !n.is_empty()) else {
        return Ok(());
    };
    let path = std::path::Path::new("/run/netns").join(&name);
    let file = std::fs::File::open(&path)
        .with_context(|| format!("SHELLWEGO_NETNS: cannot open {}", path.display()))?;
    // SAFETY: setns on the only thread that exists yet, with a valid namespace descriptor.
    let rc = unsafe {
        libc::setns(
            std::os::unix::io::AsRawFd::as_raw_fd(&file),
            libc::CLONE_NEWNET,
        )
    };
    if rc != 0 {
        bail!(
            "SHELLWEGO_NETNS: setns into {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Reads each secret's value from its source; names only, never values, in errors.
fn resolve_secrets(app: &DesiredApp) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (name, source) in &app.secrets {
        let value = match source {
            SecretSource::Value(v) => v.clone(),
            SecretSource::Inline => {
                bail!("secrets.{name}: the spec names an inline value but carries none")
            }
            SecretSource::Env(var) => std::env::var(var).with_context(|| {
                format!("secrets.{name}: environment variable {var} is not set")
            })?,
            SecretSource::File(path) => std::fs::read_to_string(path)
                .with_context(|| format!("secrets.{name}: cannot read {}", path.display()))?
                .trim_end_matches('\n')
                .to_string(),
        };
        out.insert(name.clone(), value);
    }
    shellwego_agent::bounds::check_secret_values(&out)?;
    Ok(out)
}

async fn apply(
    client: &AgentClient,
    file: &PathBuf,
    detach: bool,
    timeout: Duration,
) -> Result<ExitCode> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read spec file {}", file.display()))?;
    let app = DesiredApp::from_toml(&text)
        .with_context(|| format!("{} is not a valid app spec", file.display()))?;
    let secrets = resolve_secrets(&app)?;
    let accepted = client
        .apply(
            &app.name,
            &ApplyRequest {
                spec: text,
                secrets,
            },
        )
        .await?;
    println!(
        "{}: desired version {} accepted",
        accepted.app, accepted.version
    );
    if detach {
        return Ok(ExitCode::SUCCESS);
    }
    let start = Instant::now();
    let started_at = shellwego_agent::state::now_secs();
    // From the apply's own event on: nothing before it is read.
    let mut seen = accepted.event.saturating_sub(1);
    loop {
        for ev in client
            .events(seen, Some(&app.name), MAX_EVENTS_PER_PAGE)
            .await?
        {
            seen = ev.seq;
            println!("  {}", ev.message);
        }
        let apps = client.apps().await?;
        if let Some(status) = apps.iter().find(|a| a.name == app.name) {
            if status.healthy {
                let vm = status
                    .vms
                    .iter()
                    .find(|v| v.version == accepted.version && v.health == Health::Healthy);
                let ip = vm.and_then(|v| v.ip.clone()).unwrap_or_default();
                println!(
                    "{}: healthy at {ip} (after {:.1}s)",
                    app.name,
                    start.elapsed().as_secs_f64()
                );
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(f) = status
                .failure
                .as_ref()
                .filter(|f| f.version == accepted.version && f.last_failed_at >= started_at)
            {
                let reason = if f.reason.is_empty() {
                    "see `shellwego logs`".to_string()
                } else {
                    f.reason.clone()
                };
                bail!(
                    "{}: version {} failed (attempt {}): {reason}; the agent retries with backoff",
                    app.name,
                    f.version,
                    f.attempts
                );
            }
        }
        if start.elapsed() > timeout {
            bail!(
                "{}: not healthy after {timeout:?}; see `shellwego ps` and `shellwego logs {}`",
                app.name,
                app.name
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `logs --follow`: prints the console output of the app's newest VM as it comes, each
/// byte once (the agent sends only what followed `next`). When another VM becomes the
/// newest (a new version, a replacement), says so and prints that one from its start.
async fn follow_logs(
    client: &AgentClient,
    app: &str,
    mut vm: uuid::Uuid,
    mut next: u64,
) -> Result<()> {
    use std::io::Write;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let chunk = client.logs_since(app, next).await?;
        if chunk.vm_id != vm {
            // `next` was an offset in the other VM's console: start this one's over.
            println!(
                "--- {app}: now VM {} (its console from the start) ---",
                chunk.vm_id
            );
            vm = chunk.vm_id;
            next = 0;
            continue;
        }
        if chunk.gap {
            println!("--- {app}: some console output was rotated away before it was shown ---");
        }
        print!("{}", chunk.log);
        std::io::stdout().flush()?;
        next = chunk.next;
    }
}

async fn ps(client: &AgentClient, json: bool) -> Result<()> {
    let apps = client.apps().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&apps)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<14} {:<38} {:<9} {:<10} {:<15} {:>8}",
        "APP", "VERSION", "VM", "STATE", "HEALTH", "IP", "UPTIME"
    );
    for a in &apps {
        if a.vms.is_empty() {
            let note = a
                .failure
                .as_ref()
                .map(|f| format!("failed x{}, backing off", f.attempts))
                .unwrap_or_else(|| "pending".into());
            println!("{:<16} {:<14} {:<38} {note}", a.name, a.version, "-");
        }
        for v in &a.vms {
            let state = match v.state {
                VmState::Starting => "starting",
                VmState::Running => "running",
                VmState::Exited => "exited",
                VmState::Suspended => "suspended",
            };
            let health = match v.health {
                Health::Unknown => "unknown",
                Health::Healthy => "healthy",
                Health::Unhealthy => "unhealthy",
            };
            println!(
                "{:<16} {:<14} {:<38} {:<9} {:<10} {:<15} {:>7}s",
                a.name,
                v.version,
                v.vm_id,
                state,
                health,
                v.ip.clone().unwrap_or_else(|| "-".into()),
                uptime(v, shellwego_agent::state::now_secs())
            );
            if let Some(e) = &v.last_error {
                println!("{:<16} last error: {e}", "");
            }
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let config = Config::load()?;
    let client = match &cli.api_url {
        None => AgentClient::new(&cli.socket.clone().unwrap_or_else(|| config.api_socket())),
        Some(url) => {
            let token = match std::env::var("SHELLWEGO_API_TOKEN") {
                Ok(t) if !t.is_empty() => t,
                _ => {
                    let file = cli
                        .token_file
                        .clone()
                        .unwrap_or(config.api_token_file.clone());
                    std::fs::read_to_string(&file)
                        .with_context(|| {
                            format!(
                                "cannot read the API token {} (set SHELLWEGO_API_TOKEN or --token-file)",
                                file.display()
                            )
                        })?
                        .trim()
                        .to_string()
                }
            };
            AgentClient::tcp(url, token)?
        }
    };
    match cli.command {
        Commands::Agent => {
            daemon::run(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Apply {
            file,
            detach,
            timeout,
        } => apply(&client, &file, detach, Duration::from_secs(timeout)).await,
        Commands::Ps { json } => ps(&client, json).await.map(|()| ExitCode::SUCCESS),
        Commands::Logs { app, lines, follow } => {
            let tail = client.logs(&app, lines).await?;
            println!("{}", tail.log);
            if follow {
                follow_logs(&client, &app, tail.vm_id, tail.next).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Commands::Exec { app, cmd } => {
            let out = client.exec(&app, cmd).await?;
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            if out.timed_out {
                eprintln!("(timed out)");
            }
            Ok(ExitCode::from(u8::try_from(out.code).unwrap_or(1)))
        }
        Commands::Suspend { app } => {
            client.scale(&app, "suspend").await?;
            println!("{app}: suspended");
            Ok(ExitCode::SUCCESS)
        }
        Commands::Wake { app } => {
            client.scale(&app, "wake").await?;
            println!("{app}: awake");
            Ok(ExitCode::SUCCESS)
        }
        Commands::Rm { app } => {
            client.remove(&app).await?;
            println!("{app}: removal requested; `shellwego ps` shows when its VMs are gone");
            Ok(ExitCode::SUCCESS)
        }
        Commands::Events {
            app,
            since,
            limit,
            json,
        } => {
            let events = client.events(since, app.as_deref(), limit).await?;
            if events.len() >= limit.min(MAX_EVENTS_PER_PAGE) {
                if let Some(last) = events.last() {
                    eprintln!("(more events may follow: --since {})", last.seq);
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&events)?);
            } else {
                for e in events {
                    let vm = e
                        .vm_id
                        .map(|v| v.to_string()[..8].to_string())
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:>6} {:>10} {:<12} {:<8} {}",
                        e.seq, e.at, e.app, vm, e.message
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Commands::Images {
            command: ImagesCommand::Ls { json },
        } => {
            let images = client.images().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else {
                println!("{:<73} {:>12} REFERENCES", "DIGEST", "SIZE");
                for i in images {
                    println!(
                        "{:<73} {:>12} {}",
                        i.digest,
                        i.size(),
                        i.references.join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Commands::Images {
            command: ImagesCommand::Rm { digest },
        } => {
            client.remove_image(&digest).await?;
            println!("removed {digest}");
            Ok(ExitCode::SUCCESS)
        }
        Commands::Doctor { json } => {
            let checks = doctor::run_checks(&config);
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                print!("{}", doctor::render(&checks));
            }
            Ok(if doctor::all_required_present(&checks) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Commands::Validate { file, json } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read spec file {}", file.display()))?;
            let app = DesiredApp::from_toml(&text)
                .with_context(|| format!("{} is not a valid app spec", file.display()))?;
            let kind = host::detect().context("cannot read /proc/cpuinfo")?;
            let machine = machine_config(&app.resources, &MachineLimits::for_host(kind))?;
            if json {
                let out = serde_json::json!({ "app": app, "version": app.spec_hash(), "machine_config": machine.config });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("app {} is valid (version {})", app.name, app.spec_hash());
                println!("  image:   {}", app.image);
                println!(
                    "  machine: {} vCPU, {} MiB",
                    machine.config.vcpu_count, machine.config.mem_size_mib
                );
                if let Some((asked, given)) = machine.vcpus_capped {
                    println!("  note:    {asked} vCPUs asked, {given} given: the most this host runs ({})", kind.describe());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
