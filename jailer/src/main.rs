//! `jailer`: runs a micro-VM monitor in a jail. See the library documentation for the
//! layout and the threat model.

use std::process::ExitCode;

use clap::Parser;
use jailer::cli::Cli;
use jailer::Jail;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("JAILER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = cli
        .into_config()
        .and_then(|c| Ok(Jail::new(c)?))
        .and_then(|jail| Ok(jail.run()?));
    match result {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(255)),
        Err(e) => {
            eprintln!("jailer: error: {e:#}");
            ExitCode::from(125)
        }
    }
}
