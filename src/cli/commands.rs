//! The `hedf` binary's subcommands: their arguments (clap) and one function each. `main.rs`
//! only parses the arguments and calls [`run`].

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::connection::Connection;
use crate::cli::display::Format;
use crate::cli::remote::ClientTls;
use crate::cli::repl::{history_path, Session};
use crate::crypto::client::{decrypt_batch, MeasureColumn};
use crate::crypto::keys::ClientKey;
use crate::crypto::params::DEFAULT_MAX_ROWS_PER_SUM;
use crate::error::{HedfError, Result};
use crate::protocol::{IngestMode, UploadOptions};
use crate::server::catalog::plaintext_warnings;
use crate::server::flight::auth::{hash_password, Directory, Users};
use crate::server::flight::{ConnectionLimits, Limits, ServerConfig, ServerTls};
use crate::table::files;

#[derive(Parser)]
#[command(
    name = "hedf",
    version,
    about = "SQL over homomorphically encrypted measures"
)]
pub struct Cli {
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
        /// Default: every numeric column.
        #[arg(long, value_delimiter = ',')]
        measures: Option<Vec<String>>,
        /// Decimal places of the measures; a value with more is an error, never rounded.
        /// Default: per column, the most decimal places any of its values has.
        #[arg(long)]
        scale: Option<i8>,
        /// Total digits of the measures, DECIMAL(precision, scale). With --scale it spares the
        /// pass over the file that otherwise finds the largest value.
        #[arg(long, requires = "scale")]
        precision: Option<u8>,
        /// Rows one sum may hold and still decrypt exactly (up to 2^31). More rows cost more
        /// limbs, 8 bytes per value each: DECIMAL(18, s) takes 4 at the default 2^27, 7 at 2^31.
        #[arg(long, default_value_t = DEFAULT_MAX_ROWS_PER_SUM)]
        max_rows_per_sum: u64,
        /// Output `.parquet` file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Upload an encrypted Parquet or Arrow file to a server (or a local data folder).
    Upload {
        file: PathBuf,
        #[command(flatten)]
        target: Target,
        /// Table name on the server.
        #[arg(long)]
        table: String,
        #[arg(long, value_enum, default_value_t = Mode::Create)]
        mode: Mode,
        /// Store the table even though no column is encrypted (every value in clear).
        #[arg(long)]
        allow_plaintext: bool,
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
    /// SQL shell (or script runner) that decrypts results with your key.
    ///
    /// Without -c or -f it is interactive: statements end with ';', \? lists the commands.
    Sql {
        #[command(flatten)]
        target: Target,
        /// Folder holding `client.key`; without it encrypted values show as <encrypted>.
        #[arg(long, env = "HEDF_KEY")]
        key: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Run these statements and commands, then exit (repeatable; before any -f).
        #[arg(short = 'c', long = "command")]
        commands: Vec<String>,
        /// Run the statements and commands in FILE, then exit (repeatable).
        #[arg(short = 'f', long = "file")]
        files: Vec<PathBuf>,
        /// Memory all local queries may hold (e.g. 512MiB, 4GiB, or `unlimited`); beyond it
        /// aggregations spill to disk, or the query fails. Default: 1/4 of the machine's memory.
        #[arg(long, value_parser = parse_memory_limit, conflicts_with = "server")]
        memory_limit: Option<MemoryLimit>,
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
        /// Memory all queries together may hold (e.g. 512MiB, 4GiB, or `unlimited`); beyond
        /// it aggregations spill to disk, or the query fails with RESOURCE_EXHAUSTED.
        /// Default: 1/4 of the machine's memory.
        #[arg(long, value_parser = parse_memory_limit)]
        memory_limit: Option<MemoryLimit>,
        /// A query still running after this many seconds is stopped (DEADLINE_EXCEEDED).
        #[arg(long, default_value_t = 300.0, value_parser = parse_seconds)]
        query_timeout: f64,
        /// Queries running at once; more wait in a short queue, then get RESOURCE_EXHAUSTED.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
        max_concurrent_queries: u32,
        /// Queries one user may run at once (queued like --max-concurrent-queries).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
        max_queries_per_user: u32,
        /// Uploads running at once; more get RESOURCE_EXHAUSTED at once.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
        max_concurrent_uploads: u32,
        /// Uploads one user may run at once; more get RESOURCE_EXHAUSTED at once.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
        max_uploads_per_user: u32,
        /// A call whose client sends nothing for this many seconds while the server waits for
        /// its data (an upload that stops midway) fails with DEADLINE_EXCEEDED.
        #[arg(long, default_value_t = 60.0, value_parser = parse_seconds)]
        stall_timeout: f64,
        /// Connections held at once; past it a new connection evicts the oldest one not yet
        /// served a call, or is closed at once if every connection has been.
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
        max_connections: u32,
        /// Connections one peer (an IPv4 address, an IPv6 /64) may hold at once; 0: no
        /// per-peer limit (every client behind one proxy or NAT).
        #[arg(long, default_value_t = 64)]
        max_connections_per_peer: u32,
        /// A connection not served a call (a successful login, or an authenticated call)
        /// this many seconds after it was accepted is closed (a login in progress may take up
        /// to 15 s more).
        #[arg(long, default_value_t = 10.0, value_parser = parse_seconds)]
        first_call_timeout: f64,
        /// A connection with no call open for this many seconds is closed.
        #[arg(long, default_value_t = 300.0, value_parser = parse_seconds)]
        idle_timeout: f64,
        /// A connection older than this many seconds is asked to reconnect (HTTP/2 GOAWAY);
        /// its open calls get --query-timeout more to finish before it is cut.
        #[arg(long, default_value_t = 3600.0, value_parser = parse_seconds)]
        max_connection_age: f64,
        /// PEM certificate chain to serve TLS with (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// PEM CA certificate(s): every client must present a certificate it signed (mutual TLS).
        #[arg(long, requires = "tls_cert")]
        tls_client_ca: Option<PathBuf>,
        /// Take passwords without TLS on a non-loopback address (behind a TLS-terminating
        /// proxy only: otherwise the network sees every password).
        #[arg(long, conflicts_with = "tls_cert")]
        insecure_plaintext: bool,
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
    /// Server URL, e.g. https://db.example:50051 (http:// for this machine).
    #[arg(long = "server")]
    url: String,
    /// User name; the password comes from $HEDF_PASSWORD or a prompt.
    #[arg(long)]
    user: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// How a client trusts an https:// server, and proves itself to one that asks.
#[derive(clap::Args)]
struct TlsArgs {
    /// PEM CA certificate(s) the server's certificate must chain to (default: the system's).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// PEM certificate to present to a server that requires one (with --tls-client-key).
    #[arg(long, requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,
    /// Send the password over http:// to another machine (the network sees it).
    #[arg(long)]
    insecure_plaintext: bool,
}

impl TlsArgs {
    fn load(&self) -> Result<ClientTls> {
        let identity = match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(cert), Some(key)) => Some((read_pem(cert)?, read_pem(key)?)),
            _ => None,
        };
        Ok(ClientTls {
            ca: self.tls_ca.as_deref().map(read_pem).transpose()?,
            identity,
            insecure_plaintext: self.insecure_plaintext,
        })
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| HedfError::Invalid(format!("cannot read {}: {e}", path.display())))
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Create,
    Append,
    Replace,
}

/// Where tables live: a server, or a local data folder (the default).
#[derive(clap::Args)]
struct Target {
    /// Server URL, e.g. http://127.0.0.1:50051.
    #[arg(long, conflicts_with = "data_dir")]
    server: Option<String>,
    /// Local data folder, as `hedf serve` keeps it (default: $XDG_DATA_HOME/hedf or
    /// ~/.local/share/hedf). Used without a server.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// User name. With --server the password comes from $HEDF_PASSWORD or a prompt; locally it
    /// picks whose tables (default: the tenant of a server run with --insecure-no-auth).
    #[arg(long)]
    user: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
}

impl Target {
    async fn connect(&self) -> Result<Connection> {
        match &self.server {
            Some(url) => {
                let tls = self.tls.load()?;
                let login = login(self.user.as_deref())?;
                let login = login.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
                Connection::remote(url, login, &tls).await
            }
            None => Connection::local(&self.data_dir(), self.user.as_deref(), None),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }
}

/// User and password, if a user was given.
fn login(user: Option<&str>) -> Result<Option<(String, String)>> {
    user.map(|user| Ok((user.to_string(), password()?)))
        .transpose()
}

/// The password from $HEDF_PASSWORD, else a prompt that does not echo (or a line of stdin
/// when it is not a terminal). Never read through the shell's line editor, so never in history.
fn password() -> Result<String> {
    if let Ok(p) = std::env::var("HEDF_PASSWORD") {
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        return Ok(rpassword::prompt_password("password: ")?);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// A progress bar on stderr (drawn only on a terminal) counting rows.
fn progress(total: Option<u64>, what: &str) -> ProgressBar {
    let (bar, template) = match total {
        Some(total) => (
            ProgressBar::new(total),
            "{msg} [{bar:30}] {human_pos}/{human_len} rows, {per_sec}, eta {eta}",
        ),
        None => (
            ProgressBar::no_length(),
            "{spinner} {msg} {human_pos} rows, {per_sec}",
        ),
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

fn rate(rows: u64, elapsed: Duration) -> String {
    format!(
        "{:.2} s, {:.2} M rows/s",
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6
    )
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("hedf")
}

fn load_key(dir: &Path) -> Result<ClientKey> {
    let path = dir.join("client.key");
    let key = ClientKey::load(&path)?;
    if let Some(warning) = crate::crypto::keys::permission_warning(&path) {
        eprintln!("warning: {warning}");
    }
    Ok(key)
}

/// Runs one invocation of the command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo { data_dir } => demo(data_dir).await,
        Command::Keygen { out, force } => keygen(&out, force),
        Command::Encrypt {
            input,
            key,
            measures,
            scale,
            precision,
            max_rows_per_sum,
            out,
        } => encrypt(
            &input,
            &key,
            measures.as_deref(),
            (scale, precision),
            max_rows_per_sum,
            &out,
        ),
        Command::Upload {
            file,
            target,
            table,
            mode,
            allow_plaintext,
        } => upload(&file, &target, &table, mode, allow_plaintext).await,
        Command::Decrypt { file, key, format } => decrypt(&file, &key, format),
        Command::Sql {
            target,
            key,
            format,
            commands,
            files,
            memory_limit,
        } => {
            let memory_limit = memory_limit.unwrap_or_default().0;
            sql(
                &target,
                key.as_deref(),
                format,
                &commands,
                &files,
                memory_limit,
            )
            .await
        }
        Command::Serve {
            data_dir,
            listen,
            users,
            users_file,
            insecure_no_auth,
            max_upload_bytes,
            memory_limit,
            query_timeout,
            max_concurrent_queries,
            max_queries_per_user,
            max_concurrent_uploads,
            max_uploads_per_user,
            stall_timeout,
            max_connections,
            max_connections_per_peer,
            first_call_timeout,
            idle_timeout,
            max_connection_age,
            tls_cert,
            tls_key,
            tls_client_ca,
            insecure_plaintext,
        } => {
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(ServerTls {
                    cert: read_pem(&cert)?,
                    key: read_pem(&key)?,
                    client_ca: tls_client_ca.as_deref().map(read_pem).transpose()?,
                }),
                _ => None,
            };
            let config = ServerConfig {
                data_dir: data_dir.unwrap_or_else(default_data_dir),
                users: None,
                max_upload_bytes,
                memory_limit: memory_limit.unwrap_or_default().0,
                limits: Limits {
                    query_timeout: Duration::from_secs_f64(query_timeout),
                    max_queries: max_concurrent_queries as usize,
                    max_queries_per_tenant: max_queries_per_user as usize,
                    max_uploads: max_concurrent_uploads as usize,
                    max_uploads_per_tenant: max_uploads_per_user as usize,
                    stall: Duration::from_secs_f64(stall_timeout),
                },
                connections: ConnectionLimits {
                    total: max_connections as usize,
                    per_peer: (max_connections_per_peer > 0)
                        .then_some(max_connections_per_peer as usize),
                    first_call: Duration::from_secs_f64(first_call_timeout),
                    idle: Duration::from_secs_f64(idle_timeout),
                    max_age: Duration::from_secs_f64(max_connection_age),
                },
                tls,
                insecure_plaintext,
            };
            serve(
                config,
                listen,
                &users,
                users_file.as_deref(),
                insecure_no_auth,
            )
            .await
        }
        Command::Client {
            command: ClientCommand::Demo { server },
        } => client_demo(&server).await,
        Command::HashPassword => hash_password_from_stdin(),
    }
}

async fn demo(data_dir: Option<PathBuf>) -> Result<()> {
    let temp;
    let dir = match data_dir {
        Some(dir) => dir,
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let mut connection = Connection::local(&dir, None, None)?;
    crate::cli::demo::run(&mut connection, &mut std::io::stdout().lock()).await
}

fn keygen(out: &Path, force: bool) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let key = ClientKey::generate();
    key.save(&out.join("client.key"), force)?;
    println!("{}", key.id());
    Ok(())
}

fn encrypt(
    input: &Path,
    key: &Path,
    measures: Option<&[String]>,
    (scale, precision): (Option<i8>, Option<u8>),
    max_rows_per_sum: u64,
    out: &Path,
) -> Result<()> {
    let key = load_key(key)?;
    let started = Instant::now();
    let scanning = progress(None, "scanning");
    let measures: Vec<MeasureColumn> = files::resolve_measures(input, measures, scale)?
        .into_iter()
        .map(|m| match precision {
            Some(precision) => m.with_precision(precision),
            None => m,
        })
        .map(|m| m.with_max_rows_per_sum(max_rows_per_sum))
        .collect();
    scanning.finish_and_clear();
    let bar = progress(files::parquet_rows(input), "encrypting");
    let rows = files::encrypt_to_parquet(&key, input, &measures, out, &mut |rows| {
        bar.set_position(rows as u64)
    });
    bar.finish_and_clear();
    let rows = rows?;
    let columns: Vec<String> = measures
        .iter()
        .map(|m| format!("{} (scale {})", m.name, m.scale))
        .collect();
    eprintln!("{}", files::encoding_report(out)?);
    eprintln!(
        "encrypted {rows} rows of {} into {} (key id {}) in {}",
        columns.join(", "),
        out.display(),
        key.id(),
        rate(rows as u64, started.elapsed())
    );
    Ok(())
}

async fn upload(
    file: &Path,
    target: &Target,
    table: &str,
    mode: Mode,
    allow_plaintext: bool,
) -> Result<()> {
    let (schema, batches) = files::read_encrypted(file)?;
    for warning in plaintext_warnings(&schema) {
        eprintln!("warning: {warning}");
    }
    let options = UploadOptions { allow_plaintext };
    let mode = match mode {
        Mode::Create => IngestMode::CREATE,
        Mode::Append => IngestMode::APPEND,
        Mode::Replace => IngestMode::REPLACE,
    };
    // Connect (and ask for a password) before the progress bar draws.
    let mut connection = target.connect().await?;
    let started = Instant::now();
    let bar = progress(files::parquet_rows(file), "uploading");
    let counted = {
        let bar = bar.clone();
        batches.inspect(move |b| {
            if let Ok(b) = b {
                bar.inc(b.num_rows() as u64)
            }
        })
    };
    let rows = connection
        .upload(table, mode, options, schema, counted)
        .await;
    bar.finish_and_clear();
    let rows = rows?;
    eprintln!(
        "{rows} rows uploaded to {table} in {}",
        rate(rows as u64, started.elapsed())
    );
    Ok(())
}

fn decrypt(file: &Path, key: &Path, format: Format) -> Result<()> {
    let key = load_key(key)?;
    let (schema, batches) = files::read_encrypted(file)?;
    let decrypted = batches
        .map(|b| decrypt_batch(&key, &b?))
        .collect::<Result<Vec<_>>>()?;
    crate::cli::display::write(&mut std::io::stdout().lock(), format, &schema, &decrypted)
}

async fn sql(
    target: &Target,
    key: Option<&Path>,
    format: Format,
    commands: &[String],
    files: &[PathBuf],
    memory_limit: Option<usize>,
) -> Result<()> {
    let started = Instant::now();
    let key = key.map(load_key).transpose()?;
    let connection = match &target.server {
        Some(_) => target.connect().await?,
        None => Connection::local(&target.data_dir(), target.user.as_deref(), memory_limit)?,
    };
    let mut session = Session::new(connection, key, format);
    if commands.is_empty() && files.is_empty() && std::io::stdin().is_terminal() {
        return session
            .interactive(history_path().as_deref(), started.elapsed())
            .await;
    }
    let mut stdout = std::io::stdout().lock();
    for command in commands {
        session.run_script(command, &mut stdout).await?;
    }
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| HedfError::Invalid(format!("cannot read {}: {e}", file.display())))?;
        session.run_script(&text, &mut stdout).await?;
    }
    if commands.is_empty() && files.is_empty() {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        session.run_script(&text, &mut stdout).await?;
    }
    Ok(())
}

/// Runs the server of `config`, its users taken from `user_args` and `users_file`.
async fn serve(
    mut config: ServerConfig,
    listen: SocketAddr,
    user_args: &[String],
    users_file: Option<&Path>,
    insecure_no_auth: bool,
) -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEDF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut flag_users = Users::default();
    for spec in user_args {
        let (name, password) = spec.split_once(':').ok_or_else(|| {
            HedfError::Invalid(format!("--user {spec:?}: expected NAME:PASSWORD"))
        })?;
        flag_users.add(name, password)?;
    }
    let mut users = match users_file {
        Some(path) => Users::load(path)?,
        None => Users::default(),
    };
    users.merge(&flag_users);
    config.users = match (insecure_no_auth, users.is_empty()) {
        (true, true) => {
            tracing::warn!(
                "authentication is OFF (--insecure-no-auth): anyone who can reach {listen} can \
                 read, upload and drop tables. Local demos only."
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
        (false, false) => {
            let directory = Arc::new(Directory::new(users));
            #[cfg(unix)]
            if let Some(path) = users_file {
                reload_users_on_hangup(directory.clone(), path.to_path_buf(), flag_users)?;
            }
            Some(directory)
        }
    };
    if let Some(limit) = config.memory_limit {
        tracing::info!(bytes = limit, "query memory limit");
    }
    let data_dir = config.data_dir.clone();
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    crate::server::flight::serve(
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

/// Re-reads the users file on SIGHUP (`--user` flags stay): new users can log in, removed ones
/// are refused, their tokens too. A file that does not load leaves the previous users.
#[cfg(unix)]
fn reload_users_on_hangup(
    directory: Arc<Directory>,
    path: PathBuf,
    flag_users: Users,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let loaded = Users::load(&path).and_then(|mut users| {
                users.merge(&flag_users);
                if users.is_empty() {
                    return Err(HedfError::Invalid("it names no users".into()));
                }
                Ok(users)
            });
            match loaded {
                Ok(users) => {
                    tracing::info!(users = users.len(), "reloaded the users file");
                    directory.replace(users);
                }
                Err(e) => {
                    tracing::warn!("users file not reloaded, the previous users stay: {e}")
                }
            }
        }
    });
    Ok(())
}

async fn client_demo(server: &ServerArgs) -> Result<()> {
    let login = login(server.user.as_deref())?;
    let login = login.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
    let tls = server.tls.load()?;
    let mut connection = Connection::remote(&server.url, login, &tls).await?;
    crate::cli::demo::run(&mut connection, &mut std::io::stdout().lock()).await
}

fn hash_password_from_stdin() -> Result<()> {
    let mut password = String::new();
    std::io::stdin().read_to_string(&mut password)?;
    println!(
        "{}",
        hash_password(password.trim_end_matches(['\r', '\n']))?
    );
    Ok(())
}

/// `--memory-limit`: bytes for every query together, or `None` for no limit.
#[derive(Clone, Copy, Debug)]
struct MemoryLimit(Option<usize>);

impl Default for MemoryLimit {
    /// A quarter of the machine's memory where it can be read (Linux), else no limit. A
    /// quarter, because DataFusion accounts an aggregation's state after each batch grew it:
    /// a query refused at a 512 MiB limit had reached 1.6 GB of RSS (60,000 groups).
    fn default() -> Self {
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| {
                let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
                let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
                kib.checked_mul(1024)
            });
        MemoryLimit(total.map(|bytes| bytes / 4))
    }
}

/// `4GiB`, `512MiB`, `64KiB`, `1048576` (bytes), or `unlimited`. Units are binary; `G`, `GB`
/// and `GiB` all mean 2^30.
fn parse_memory_limit(text: &str) -> std::result::Result<MemoryLimit, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("unlimited") {
        return Ok(MemoryLimit(None));
    }
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "unknown unit in {text:?}: use KiB, MiB, GiB or TiB"
            ))
        }
    };
    let bytes = number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{text:?} is not a size such as 512MiB or 4GiB"))?;
    Ok(MemoryLimit(Some(bytes)))
}

/// `--query-timeout`: positive seconds, fractions allowed, at most a day.
fn parse_seconds(text: &str) -> std::result::Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 && *s <= 86_400.0)
        .ok_or_else(|| format!("{text:?} is not a number of seconds between 0 and 86400"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_timeouts_are_positive_seconds() {
        assert_eq!(parse_seconds("300"), Ok(300.0));
        assert_eq!(parse_seconds("0.5"), Ok(0.5));
        for bad in ["0", "-1", "NaN", "inf", "1e9", "5m", ""] {
            assert!(parse_seconds(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn memory_limits_parse_with_binary_units() {
        let parse = |s| parse_memory_limit(s).map(|m| m.0);
        assert_eq!(parse("512MiB"), Ok(Some(512 << 20)));
        assert_eq!(parse("4G"), Ok(Some(4 << 30)));
        assert_eq!(parse("64 kb"), Ok(Some(64 << 10)));
        assert_eq!(parse("1048576"), Ok(Some(1 << 20)));
        assert_eq!(parse("Unlimited"), Ok(None));
        for bad in [
            "",
            "0",
            "-1GiB",
            "1.5GiB",
            "12 parsecs",
            "99999999999999999999TiB",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
