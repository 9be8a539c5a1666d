//! The hedf command line: a thin layer over the library.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use hedf::catalog::IngestMode;
use hedf::client::{decrypt_batch, MeasureColumn};
use hedf::flight::auth::{hash_password, Users};
use hedf::flight::ServerConfig;
use hedf::keys::ClientKey;
use hedf::remote::Remote;
use hedf::HedfError;

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
    /// Encrypt the measure columns of a CSV or Parquet file into an encrypted Parquet table.
    Encrypt {
        /// Input `.csv` (with header) or `.parquet` file.
        input: PathBuf,
        /// Folder holding `client.key`.
        #[arg(long)]
        key: PathBuf,
        /// Comma-separated measure columns to encrypt; the others stay plaintext.
        #[arg(long, value_delimiter = ',', required = true)]
        measures: Vec<String>,
        /// Decimal places of the measures; a value with more is an error, never rounded.
        #[arg(long, default_value_t = 0)]
        scale: i8,
        /// Output `.parquet` file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Upload an encrypted Parquet or Arrow file to a server.
    Upload {
        file: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
        /// Table name on the server.
        #[arg(long)]
        table: String,
        #[arg(long, value_enum, default_value_t = Mode::Create)]
        mode: Mode,
    },
    /// Decrypt a result file (`.arrow` or `.parquet`) a client saved, and print it.
    Decrypt {
        file: PathBuf,
        /// Folder holding `client.key`.
        #[arg(long)]
        key: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Run the Arrow Flight SQL server.
    Serve {
        /// Where tables are stored (default: $XDG_DATA_HOME/hedf or ~/.local/share/hedf).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// A user as NAME:PASSWORD (repeatable; visible in `ps`, prefer --users-file).
        #[arg(long = "user")]
        users: Vec<String>,
        /// File of `NAME:$argon2id$...` lines (see `hedf hash-password`).
        #[arg(long)]
        users_file: Option<PathBuf>,
        /// Accept every caller as one shared tenant. Local demos only.
        #[arg(long)]
        insecure_no_auth: bool,
        /// Largest upload accepted, in bytes.
        #[arg(long, default_value_t = 16 << 30)]
        max_upload_bytes: u64,
    },
    /// Talk to a running server.
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// Read a password on stdin and print its Argon2id hash for a users file.
    HashPassword,
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Replay the prototype's client script against a server.
    Demo {
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Server URL, e.g. http://127.0.0.1:50051.
    #[arg(long = "server")]
    url: String,
    /// User name; the password comes from $HEDF_PASSWORD or a prompt.
    #[arg(long)]
    user: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Create,
    Append,
    Replace,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
}

impl ServerArgs {
    /// User and password, if a user was given.
    fn login(&self) -> hedf::Result<Option<(String, String)>> {
        self.user
            .as_ref()
            .map(|user| Ok((user.clone(), password()?)))
            .transpose()
    }

    async fn connect(&self) -> hedf::Result<Remote> {
        let login = self.login()?;
        Remote::connect(
            &self.url,
            login.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
        )
        .await
    }
}

fn password() -> hedf::Result<String> {
    if let Ok(p) = std::env::var("HEDF_PASSWORD") {
        return Ok(p);
    }
    let mut line = String::new();
    if std::io::stdin().is_terminal() {
        eprint!("password: ");
        std::io::stderr().flush()?;
    }
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("hedf")
}

fn load_key(dir: &Path) -> hedf::Result<ClientKey> {
    ClientKey::load(&dir.join("client.key"))
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
        Command::Encrypt {
            input,
            key,
            measures,
            scale,
            out,
        } => {
            let key = load_key(&key)?;
            let measures: Vec<MeasureColumn> = measures
                .iter()
                .map(|m| MeasureColumn::new(m.trim(), scale))
                .collect();
            let rows = hedf::ingest::encrypt_to_parquet(&key, &input, &measures, &out)?;
            eprintln!(
                "encrypted {rows} rows into {} (key id {})",
                out.display(),
                key.id()
            );
            Ok(())
        }
        Command::Upload {
            file,
            server,
            table,
            mode,
        } => {
            let (schema, batches) = hedf::ingest::read_encrypted(&file)?;
            let mode = match mode {
                Mode::Create => IngestMode::CREATE,
                Mode::Append => IngestMode::APPEND,
                Mode::Replace => IngestMode::REPLACE,
            };
            let mut remote = server.connect().await?;
            let rows = remote
                .upload(&table, mode, schema, futures::stream::iter(batches))
                .await?;
            println!("{rows} rows uploaded to {table}");
            Ok(())
        }
        Command::Decrypt { file, key, format } => {
            let key = load_key(&key)?;
            let (_, batches) = hedf::ingest::read_encrypted(&file)?;
            let decrypted = batches
                .map(|b| decrypt_batch(&key, &b?))
                .collect::<hedf::Result<Vec<_>>>()?;
            let mut stdout = std::io::stdout().lock();
            match format {
                Format::Table => writeln!(
                    stdout,
                    "{}",
                    arrow::util::pretty::pretty_format_batches(&decrypted)?
                )?,
                Format::Csv => {
                    let mut writer = arrow::csv::Writer::new(&mut stdout);
                    for batch in &decrypted {
                        writer.write(batch)?;
                    }
                }
            }
            Ok(())
        }
        Command::Serve {
            data_dir,
            listen,
            users: user_args,
            users_file,
            insecure_no_auth,
            max_upload_bytes,
        } => {
            let mut users = match &users_file {
                Some(path) => Users::load(path)?,
                None => Users::default(),
            };
            for spec in &user_args {
                let (name, password) = spec.split_once(':').ok_or_else(|| {
                    HedfError::Invalid(format!("--user {spec:?}: expected NAME:PASSWORD"))
                })?;
                users.add(name, password)?;
            }
            let users = match (insecure_no_auth, users.is_empty()) {
                (true, true) => {
                    eprintln!(
                        "WARNING: authentication is OFF (--insecure-no-auth): anyone who can reach \
                         {listen} can read, upload and drop tables. Local demos only."
                    );
                    None
                }
                (true, false) => {
                    return Err(HedfError::Invalid(
                        "--insecure-no-auth cannot be combined with users".into(),
                    ))
                }
                (false, true) => {
                    return Err(HedfError::Invalid(
                        "no users: pass --user NAME:PASSWORD or --users-file FILE (or \
                         --insecure-no-auth for a local demo)"
                            .into(),
                    ))
                }
                (false, false) => Some(users),
            };
            let data_dir = data_dir.unwrap_or_else(default_data_dir);
            let config = ServerConfig {
                data_dir: data_dir.clone(),
                users,
                max_upload_bytes,
            };
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            hedf::flight::serve(
                config,
                listen,
                |addr| {
                    println!(
                        "hedf serve: listening on {addr}, data in {}",
                        data_dir.display()
                    );
                    let _ = std::io::stdout().flush();
                },
                shutdown,
            )
            .await
        }
        Command::Client {
            command: ClientCommand::Demo { server },
        } => {
            let login = server.login()?;
            let login = login.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
            hedf::demo::run_remote(&server.url, login, &mut std::io::stdout().lock()).await
        }
        Command::HashPassword => {
            let mut password = String::new();
            std::io::stdin().read_to_string(&mut password)?;
            println!(
                "{}",
                hash_password(password.trim_end_matches(['\r', '\n']))?
            );
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
