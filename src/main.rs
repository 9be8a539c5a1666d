//! The hedf command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hedf::keys::ClientKey;

#[derive(Parser)]
#[command(
    name = "hedf",
    version,
    about = "SQL over homomorphically encrypted measures"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay the original prototype's demo on the embedded population dataset.
    Demo {
        /// Folder for the encrypted table (default: a fresh temporary folder, removed after).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Generate a client key and print its key id.
    Keygen {
        /// Folder to write `client.key` into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
}

async fn run(cli: Cli) -> hedf::Result<()> {
    match cli.command {
        Command::Demo { data_dir } => {
            let temp;
            let dir = match data_dir {
                Some(dir) => dir,
                None => {
                    temp = tempfile::tempdir()?;
                    temp.path().to_path_buf()
                }
            };
            hedf::demo::run(&dir, &mut std::io::stdout().lock()).await
        }
        Command::Keygen { out, force } => {
            std::fs::create_dir_all(&out)?;
            let key = ClientKey::generate();
            key.save(&out.join("client.key"), force)?;
            println!("{}", key.id());
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
