//! `hexactl`: administer a Hexabase coordinator through its admin API.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = hexa_coordinator::ctl::Cli::parse();
    hexa_shared::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(hexa_coordinator::ctl::run(cli)) {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
