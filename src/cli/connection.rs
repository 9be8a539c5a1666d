//! Where a client's SQL and uploads go: a local data folder (the server's own store and
//! planning, in this process) or a hedf Flight SQL server. Both return ciphertext results;
//! decryption is the caller's job.

use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use futures::future::BoxFuture;

use crate::cli::remote::{ClientTls, Remote};
use crate::engine::statement;
use crate::error::Result;
use crate::protocol::{IngestMode, UploadOptions, ANONYMOUS};
use crate::server::catalog::{Catalog, Tenant};

#[derive(Clone)]
pub enum Connection {
    Local { tenant: Arc<Tenant>, label: String },
    Remote { remote: Box<Remote>, label: String },
}

impl Connection {
    /// `user`'s tables in a server data folder, read and changed in this process, its
    /// queries holding at most `memory_limit` bytes. Without a user, the tenant a server
    /// started with `--insecure-no-auth` uses.
    pub fn local(data_dir: &Path, user: Option<&str>, memory_limit: Option<usize>) -> Result<Self> {
        let user = user.unwrap_or(ANONYMOUS);
        let tenant = Catalog::open(data_dir, memory_limit)?.tenant(user)?;
        Ok(Connection::Local {
            tenant,
            label: format!("{} (user {user})", data_dir.display()),
        })
    }

    /// A server at `url`, logged in as `login`'s user if given.
    pub async fn remote(url: &str, login: Option<(&str, &str)>, tls: &ClientTls) -> Result<Self> {
        let remote = Box::new(Remote::connect(url, login, tls).await?);
        let label = match login {
            Some((user, _)) => format!("{url} as {user}"),
            None => url.to_string(),
        };
        Ok(Connection::Remote { remote, label })
    }

    /// Where this connection goes, for a banner.
    pub fn label(&self) -> &str {
        match self {
            Connection::Local { label, .. } | Connection::Remote { label, .. } => label,
        }
    }

    /// Runs one statement as its own task-ready future (it owns what it uses); a
    /// `DROP TABLE` returns an empty schema.
    pub fn query(&self, sql: &str) -> BoxFuture<'static, Result<(SchemaRef, Vec<RecordBatch>)>> {
        let sql = sql.to_string();
        match self {
            Connection::Local { tenant, .. } => {
                let tenant = tenant.clone();
                Box::pin(async move { statement::run(&tenant, &sql).await })
            }
            Connection::Remote { remote, .. } => {
                let mut remote = remote.as_ref().clone();
                Box::pin(async move { remote.query(&sql).await })
            }
        }
    }

    /// Bulk ingest of encrypted batches into `table`; returns the rows committed. Locally it
    /// takes the server's own atomic path: the table changes only once every batch is written.
    pub async fn upload(
        &mut self,
        table: &str,
        mode: IngestMode,
        options: UploadOptions,
        schema: SchemaRef,
        batches: impl Iterator<Item = Result<RecordBatch>> + Send + 'static,
    ) -> Result<i64> {
        match self {
            Connection::Local { tenant, .. } => {
                let mut upload = tenant.begin_upload(table, mode, options, &schema)?;
                for batch in batches {
                    upload.write(&batch?)?;
                }
                Ok(upload.commit()? as i64)
            }
            Connection::Remote { remote, .. } => {
                remote
                    .upload(table, mode, options, schema, futures::stream::iter(batches))
                    .await
            }
        }
    }

    /// The tables and their schemas (with hedf's column metadata).
    pub async fn tables(&mut self) -> Result<Vec<(String, SchemaRef)>> {
        match self {
            Connection::Local { tenant, .. } => Ok(tenant
                .snapshot()
                .iter()
                .map(|(name, version)| (name.clone(), version.schema()))
                .collect()),
            Connection::Remote { remote, .. } => remote.tables().await,
        }
    }
}
