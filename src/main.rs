//! The `wharf` binary: parses the command line, installs the tracing
//! subscriber, reads the environment, and hands validated values to the
//! library crates. No logic of its own beyond that.

mod agent;
mod bench;
mod client;
mod image;
mod migrate;
mod node_cmd;
mod paths;
mod registry_cmd;
mod run;
mod secret_cmd;
mod serve;
mod server;
mod service_cmd;
mod task_cmd;
mod taskdef_cmd;
mod tls;
mod token_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc rather than glibc's malloc: a task start is a few dozen small
/// allocations made and freed across the API's and the guests' threads,
/// and glibc's per-thread arenas made that 10–20 % of the task path's
/// throughput (`docs/PERFORMANCE.md`, issue 13, seventh slice).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Amazon ECR + ECS for WebAssembly, in one binary.
#[derive(Debug, Parser)]
#[command(name = "wharf", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a Wasm module or component once, locally, in a limited sandbox
    /// (like `wasmtime run`).
    Run(run::RunArgs),
    /// Serve a wasi:http component locally, a fresh instance per request
    /// (like `wasmtime serve`).
    Serve(serve::ServeArgs),
    /// Benchmark Wasm workloads: phases, exact fuel, statistics, and
    /// comparisons against a saved baseline.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Serve the registry (and, with the control-plane work, the API) from
    /// one data directory.
    Server(server::ServerArgs),
    /// Move a stopped single-node install's state to PostgreSQL and its
    /// registry to another blob store (file:///PATH or s3://), every
    /// digest checked.
    Migrate(migrate::MigrateArgs),
    /// Push a .wasm file to a registry as a Wasm OCI artifact.
    Push(image::PushArgs),
    /// Pull a Wasm artifact's module or component into a file.
    Pull(image::PullArgs),
    /// Wasm artifacts in a registry.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Registry maintenance: garbage collection and repository settings.
    Registry {
        #[command(subcommand)]
        command: registry_cmd::RegistryCommand,
    },
    /// Task definitions: what a task runs, with which limits.
    Taskdef {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: taskdef_cmd::TaskdefCommand,
    },
    /// Tasks: runs of a task definition on the server.
    Task {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: task_cmd::TaskCommand,
    },
    /// Services: keep N tasks of a task definition running.
    Service {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: service_cmd::ServiceCommand,
    },
    /// Nodes: the machines that run tasks.
    Node {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: node_cmd::NodeCommand,
    },
    /// Secrets that task definitions pass to tasks as environment variables.
    Secret {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: secret_cmd::SecretCommand,
    },
    /// API and registry tokens (admin only).
    Token {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: token_cmd::TokenCommand,
    },
    /// The audit log of mutating calls (admin only).
    Audit {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: token_cmd::AuditCommand,
    },
}

/// How client commands print results.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Output {
    /// Aligned text for people.
    Text,
    /// JSON for scripts.
    Json,
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Server(_)
            | Command::Run(_)
            | Command::Serve(_)
            | Command::Node {
                command: node_cmd::NodeCommand::Join(_),
                ..
            }
    ) {
        default_sigpipe();
    }
    let result = match cli.command {
        Command::Run(args) => run::main(args),
        Command::Bench { command } => bench::main(command),
        Command::Serve(args) => serve::main(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::Server(args) => server::main(args).map(|()| ExitCode::SUCCESS),
        Command::Migrate(args) => migrate::main(args).map(|()| ExitCode::SUCCESS),
        Command::Push(args) => image::push(args).map(|()| ExitCode::SUCCESS),
        Command::Pull(args) => image::pull(args).map(|()| ExitCode::SUCCESS),
        Command::Image { command } => image::image(command).map(|()| ExitCode::SUCCESS),
        Command::Registry { command } => registry_cmd::main(command).map(|()| ExitCode::SUCCESS),
        Command::Taskdef { api, command } => {
            taskdef_cmd::main(api, command).map(|()| ExitCode::SUCCESS)
        }
        Command::Task { api, command } => task_cmd::main(api, command),
        Command::Service { api, command } => {
            service_cmd::main(api, command).map(|()| ExitCode::SUCCESS)
        }
        Command::Node { api, command } => node_cmd::main(api, command).map(|()| ExitCode::SUCCESS),
        Command::Secret { api, command } => {
            secret_cmd::main(api, command).map(|()| ExitCode::SUCCESS)
        }
        Command::Token { api, command } => {
            token_cmd::main(api, command).map(|()| ExitCode::SUCCESS)
        }
        Command::Audit { api, command } => {
            token_cmd::audit(api, command).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("wharf: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Client commands die quietly on a closed pipe (`wharf task ls | head`),
/// like other Unix tools, instead of panicking in `println!`. Rust ignores
/// SIGPIPE at start-up, which the server and `wharf run` keep: they
/// handle EPIPE from sockets and from the guest's output themselves.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition before any thread
    // is started has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Logs go to stderr, at `warn` unless `WHARF_LOG` (or `RUST_LOG`) says
/// otherwise, so a guest's own output stays clean.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("WHARF_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
}
