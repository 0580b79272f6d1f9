//! The syncrelay binary: `serve` (default) and `healthcheck` (for container HEALTHCHECKs).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use syncrelay::config::{LogFormat, Settings};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc malloc: each delivery allocates and frees many short-lived buffers,
/// often on another worker thread than the one that allocated them, where glibc's arenas spent a
/// quarter of the relay's CPU (docs/BENCHMARKS.md, 2026-12-02).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "syncrelay", version, about = "Sync job run events in, signed webhooks out")]
struct Cli {
    /// Configuration file (TOML) layered over the compiled-in defaults.
    #[arg(long, short, global = true, env = "SYNCRELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API and deliver events (the default).
    Serve,
    /// Check /health/ready on the configured address; exit 0 when ready.
    Healthcheck,
    /// Print the effective configuration (secrets redacted) and exit.
    CheckConfig,
}

/// No transparent huge pages for this process. mimalloc asks for them on the arenas it reserves
/// (`madvise(MADV_HUGEPAGE)`), and the kernel then backs any touched part of a 2 MiB range with a
/// whole huge page: peak RSS of the benchmark's Kafka isolation scenario was 209 MiB with them
/// and 161 MiB without, at the same throughput (docs/BENCHMARKS.md, issue 14). Called first, so
/// it covers every mapping made afterwards (the prctl flag wins over `madvise`).
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes no pointers; it sets one flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Large C allocations always get mappings of their own, returned on free. librdkafka (its fetch
/// responses, up to megabytes each) and SQLite allocate with glibc's malloc, not mimalloc; by
/// default glibc raises its mmap threshold to the largest block freed so far, so after the first
/// fetch responses the later ones come from its per-thread arenas, which keep the freed space.
/// Fixing the threshold at glibc's initial 128 KiB took the Kafka isolation scenario's peak RSS
/// from 196 / 177 to 177 / 166 MiB, with no CPU cost the benchmark could see (docs/BENCHMARKS.md,
/// issue 14). Set before any thread starts; an operator's own `MALLOC_MMAP_THRESHOLD_` wins.
fn c_heap_returns_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt takes two integers and changes one malloc setting of this process.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
    }
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    c_heap_returns_large_blocks();
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref(), std::env::vars()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("syncrelay: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.log.level));
    // Colours only on a terminal: a file, a pipe or a log collector gets plain text
    // (`NO_COLOR` turns them off on a terminal too).
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match settings.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => rt.block_on(async {
            match syncrelay::Application::build(settings).await {
                Ok(app) => match app.run_until_stopped(syncrelay::shutdown_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "stopped with an error");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "could not start");
                    eprintln!("syncrelay: could not start: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Healthcheck => rt.block_on(async {
            let addr = settings.http.listen.replace("0.0.0.0", "127.0.0.1");
            let url = format!("http://{addr}/health/ready");
            let client = reqwest::Client::builder()
                .no_proxy()
                .timeout(std::time::Duration::from_secs(5))
                .build()
                .expect("client");
            match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
                Ok(r) => {
                    eprintln!("not ready: {}", r.status());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("not reachable: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::CheckConfig => {
            println!("{settings:#?}");
            ExitCode::SUCCESS
        }
    }
}
