//! `shellwego`: the ShellWeGo node agent's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use shellwego_agent::config::Config;
use shellwego_agent::spec::DesiredApp;
use shellwego_agent::vmm::config::{machine_config, MachineLimits};
use shellwego_agent::{doctor, host};

/// ShellWeGo turns a Linux host into a microVM platform: apps declared in a spec file run
/// as Firecracker microVMs on ZFS copy-on-write disks.
#[derive(Parser)]
#[command(name = "shellwego", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Check this host's prerequisites (KVM, Firecracker, ZFS, networking, guest kernel)
    /// and print one line each with a fix; exits non-zero if a required one is missing.
    Doctor {
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validate an app spec file and show the VM it would get on this host.
    Validate {
        /// The app spec (TOML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Print the validated app as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHELLWEGO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Commands::Doctor { json } => {
            let config = Config::load()?;
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
                let out = serde_json::json!({
                    "app": app,
                    "version": app.spec_hash(),
                    "machine_config": machine.config,
                });
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
