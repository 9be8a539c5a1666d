//! The server's store of encrypted tables: one folder per tenant holding immutable Parquet
//! segments and a manifest naming each table's segments with their row counts and sizes.
//!
//! Every change writes its new segment first (temporary file, fsync, rename), then replaces the
//! manifest the same way. A crash, `kill -9` or dropped upload therefore leaves either the old
//! manifest or the new one, never a partial table; files no manifest names are leftovers and
//! are deleted when the tenant is next loaded. Segments a change retires are deleted once the
//! last query reading them finishes (they are reference counted).
//!
//! A table whose segment was lost, cut short or replaced under the server is *damaged*: queries
//! on it fail with an error naming it, while the tenant's other tables work, before and after a
//! restart. Dropping or replacing the table repairs it. Folders are private to the server's OS
//! user (0700, files 0600).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::TableProvider;
use datafusion::execution::memory_pool::MemoryPool;

use crate::engine::session::{memory_pool, tenant_store_url};
use crate::error::{HedfError, Result};
use crate::protocol::{IfExists, IngestMode, UploadOptions};
use crate::table::{EncryptedTable, SegmentFile, SegmentStore, SegmentWriter, StorageLayout};

const MANIFEST: &str = "manifest";
const MANIFEST_HEADER: &str = "hedf-manifest 2";

/// All tenants' tables under one data folder.
pub struct Catalog {
    root: PathBuf,
    tenants: Mutex<HashMap<String, Arc<Tenant>>>,
    memory_pool: Arc<dyn MemoryPool>,
}

impl Catalog {
    /// The tables under `root`; queries over them draw on one memory pool of `memory_limit`
    /// bytes (unbounded if `None`), shared by every tenant.
    pub fn open(root: &Path, memory_limit: Option<usize>) -> Result<Self> {
        create_private_dir(root)?;
        let tenants = root.join("tenants");
        create_private_dir(&tenants)?;
        // Whatever the root's mode, nothing below `tenants` is reachable by other users.
        set_mode(&tenants, 0o700)?;
        Ok(Catalog {
            root: root.to_path_buf(),
            tenants: Mutex::new(HashMap::new()),
            memory_pool: memory_pool(memory_limit),
        })
    }

    /// The tenant of `user`, loaded (and cleaned of upload leftovers) on first use.
    pub fn tenant(&self, user: &str) -> Result<Arc<Tenant>> {
        check_name("user", user, ".-")?;
        let mut tenants = self.tenants.lock().expect("tenant map lock");
        if let Some(t) = tenants.get(user) {
            return Ok(t.clone());
        }
        let dir = self.root.join("tenants").join(user);
        let tenant = Arc::new(Tenant::load(&dir, self.memory_pool.clone())?);
        tenants.insert(user.to_string(), tenant.clone());
        Ok(tenant)
    }
}

/// One immutable Parquet file of a table; deleted on drop once a change has retired it.
#[derive(Debug)]
struct Segment {
    file: SegmentFile,
    retired: AtomicBool,
}

impl Segment {
    fn new(file: SegmentFile) -> Arc<Self> {
        Arc::new(Segment {
            file,
            retired: AtomicBool::new(false),
        })
    }

    fn name(&self) -> &str {
        self.file.location.as_ref()
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.retired.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.file.local);
        }
    }
}

/// One committed state of a table. Queries hold it while they run, which keeps its files.
#[derive(Debug)]
pub struct TableVersion {
    name: String,
    segments: Vec<Arc<Segment>>,
    /// The readable table, or why it is damaged.
    table: std::result::Result<Arc<EncryptedTable>, String>,
}

impl TableVersion {
    /// Opens the table's segments; a damaged table is recorded as such, not an error.
    fn open(name: &str, segments: Vec<Arc<Segment>>) -> Self {
        let files = segments.iter().map(|s| s.file.clone()).collect();
        let table = EncryptedTable::from_segments(name, tenant_store_url(), files)
            .map(Arc::new)
            .map_err(|e| match e {
                HedfError::Damaged { why, .. } => why,
                other => other.user_message(),
            });
        if let Err(why) = &table {
            tracing::warn!(table = name, %why, "damaged table");
        }
        TableVersion {
            name: name.to_string(),
            segments,
            table,
        }
    }

    /// The readable table, or the error saying it is damaged.
    pub fn table(&self) -> Result<&Arc<EncryptedTable>> {
        self.table.as_ref().map_err(|why| HedfError::Damaged {
            table: self.name.clone(),
            why: why.clone(),
        })
    }

    pub fn provider(&self) -> Result<Arc<dyn TableProvider>> {
        Ok(self.table()?.clone())
    }

    pub fn rows(&self) -> Result<u64> {
        Ok(self.table()?.rows())
    }

    /// The schema queries see (plaintext columns and ciphertext cells with their metadata);
    /// empty for a damaged table.
    pub fn schema(&self) -> SchemaRef {
        match &self.table {
            Ok(table) => table.schema(),
            Err(_) => Arc::new(Schema::empty()),
        }
    }

    /// The segment names a query of this table reads.
    fn locations(&self) -> impl Iterator<Item = object_store::path::Path> + '_ {
        self.segments.iter().map(|s| s.file.location.clone())
    }
}

/// A tenant's tables by name.
pub type Tables = BTreeMap<String, Arc<TableVersion>>;

/// One user's tables. Reads take a snapshot; changes are serialised by `commit`.
pub struct Tenant {
    name: String,
    dir: PathBuf,
    tables: RwLock<Arc<Tables>>,
    commit: Mutex<()>,
    memory_pool: Arc<dyn MemoryPool>,
}

impl Tenant {
    fn load(dir: &Path, memory_pool: Arc<dyn MemoryPool>) -> Result<Self> {
        create_private_dir(dir)?;
        set_mode(dir, 0o700)?;
        let mut tables = Tables::new();
        let manifest = dir.join(MANIFEST);
        if manifest.is_file() {
            let text = std::fs::read_to_string(&manifest)?;
            let mut lines = text.lines();
            if lines.next() != Some(MANIFEST_HEADER) {
                // The operator's problem, not the tenant's: the path goes to the log only.
                return Err(HedfError::Internal(format!(
                    "{} is not a hedf manifest (expected {MANIFEST_HEADER:?})",
                    manifest.display()
                )));
            }
            for line in lines.filter(|l| !l.is_empty()) {
                let (name, segments) = parse_entry(dir, line).map_err(|why| {
                    HedfError::Internal(format!("{}: {why}: {line:?}", manifest.display()))
                })?;
                tables.insert(name.clone(), Arc::new(TableVersion::open(&name, segments)));
            }
        }
        let tenant = Tenant {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            dir: dir.to_path_buf(),
            tables: RwLock::new(Arc::new(tables)),
            commit: Mutex::new(()),
            memory_pool,
        };
        tenant.remove_leftovers();
        Ok(tenant)
    }

    /// Deletes files no table names: segments and manifests of changes that never committed.
    /// Anything else (a folder, a file it cannot delete) is left alone and logged: it must not
    /// stop the tenant's tables from loading.
    fn remove_leftovers(&self) {
        let tables = self.snapshot();
        let live: Vec<&Path> = tables
            .values()
            .flat_map(|v| v.segments.iter().map(|s| s.file.local.as_path()))
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.ends_with(".parquet") || name.starts_with(".tmp");
            if !ours || live.contains(&path.as_path()) {
                continue;
            }
            let removed = match entry.file_type() {
                Ok(t) if t.is_file() => std::fs::remove_file(&path),
                _ => Err(std::io::Error::other("not a regular file")),
            };
            if let Err(e) = removed {
                tracing::warn!(path = %path.display(), error = %e, "left a stray entry in place");
            }
        }
    }

    /// The memory pool the tenant's queries draw on (shared with every other tenant).
    pub fn memory_pool(&self) -> &Arc<dyn MemoryPool> {
        &self.memory_pool
    }

    /// The user whose tables these are.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tables as of now; unaffected by later changes.
    pub fn snapshot(&self) -> Arc<Tables> {
        self.tables.read().expect("tables lock").clone()
    }

    pub fn get(&self, name: &str) -> Result<Arc<TableVersion>> {
        self.snapshot()
            .get(name)
            .cloned()
            .ok_or_else(|| HedfError::NoSuchTable(name.to_string()))
    }

    /// The read-only object store a query over `tables` reads through: their segments only.
    pub fn store<'a>(
        &self,
        tables: impl IntoIterator<Item = &'a TableVersion>,
    ) -> Result<Arc<SegmentStore>> {
        let locations: Vec<_> = tables.into_iter().flat_map(|t| t.locations()).collect();
        SegmentStore::new(&self.dir, locations).map_err(HedfError::internal)
    }

    /// Starts an upload into `name`: checks the mode and the uploaded schema now, so a bad
    /// upload fails before any data is sent; the table changes only at [`Upload::commit`].
    pub fn begin_upload(
        self: &Arc<Self>,
        name: &str,
        mode: IngestMode,
        options: UploadOptions,
        schema: &Schema,
    ) -> Result<Upload> {
        check_name("table", name, "")?;
        let (layout, format) = StorageLayout::from_upload(schema)?;
        if layout.key_id.is_none() && !options.allow_plaintext {
            return Err(HedfError::Invalid(format!(
                "refusing to store table {name}: it has no encrypted column, so every value would \
                 be stored in clear. Encrypt its measures first (hedf encrypt), or say that a \
                 plaintext table is intended (hedf upload --allow-plaintext)"
            )));
        }
        let current = self.snapshot().get(name).cloned();
        check_mode(mode, name, current.is_some())?;
        if let (Some(current), IfExists::Append) = (&current, mode.if_exists) {
            current.table()?.layout().check_compatible(&layout)?;
        }
        let path = self
            .dir
            .join(format!("{name}-{:016x}.parquet", random_u64()?));
        let writer = SegmentWriter::create(&path, Arc::new(layout), format)?;
        Ok(Upload {
            tenant: self.clone(),
            name: name.to_string(),
            mode,
            writer,
            path,
        })
    }

    /// Removes a table (damaged or not); its files go once no running query reads them.
    pub fn drop_table(&self, name: &str, if_exists: bool) -> Result<bool> {
        let _commit = self.commit.lock().expect("commit lock");
        let mut tables = (*self.snapshot()).clone();
        let Some(old) = tables.remove(name) else {
            return if if_exists {
                Ok(false)
            } else {
                Err(HedfError::NoSuchTable(name.to_string()))
            };
        };
        self.publish(tables)?;
        retire(&old, &[]);
        Ok(true)
    }

    /// Writes the manifest for `tables` atomically, then makes it the current state. The
    /// temporary file has a fresh random name opened exclusively, so nothing can be planted in
    /// its place.
    fn publish(&self, tables: Tables) -> Result<()> {
        let mut text = format!("{MANIFEST_HEADER}\n");
        for (name, version) in &tables {
            let segments: Vec<String> = version
                .segments
                .iter()
                .map(|s| format!("{}:{}:{}", s.name(), s.file.rows, s.file.bytes))
                .collect();
            text += &format!("{name}\t{}\n", segments.join(" "));
        }
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)?;
        file.write_all(text.as_bytes())?;
        file.as_file().sync_all()?;
        file.persist(self.dir.join(MANIFEST))
            .map_err(|e| HedfError::Io(e.error))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        *self.tables.write().expect("tables lock") = Arc::new(tables);
        Ok(())
    }
}

/// One manifest line: `name<TAB>file:rows:bytes file:rows:bytes ...`.
fn parse_entry(dir: &Path, line: &str) -> std::result::Result<(String, Vec<Arc<Segment>>), String> {
    let (name, files) = line.split_once('\t').ok_or("no tab")?;
    check_name("table", name, "").map_err(|e| e.to_string())?;
    let segments = files
        .split(' ')
        .map(|entry| {
            let mut parts = entry.split(':');
            let (Some(file), Some(rows), Some(bytes), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("bad segment entry {entry:?}"));
            };
            let valid = file.ends_with(".parquet") && !file.starts_with('.') && !file.contains('/');
            if !valid {
                return Err(format!("bad segment file name {file:?}"));
            }
            Ok(Segment::new(SegmentFile {
                location: object_store::path::Path::from(file),
                local: dir.join(file),
                rows: rows
                    .parse()
                    .map_err(|_| format!("bad row count {rows:?}"))?,
                bytes: bytes.parse().map_err(|_| format!("bad size {bytes:?}"))?,
            }))
        })
        .collect::<std::result::Result<_, _>>()?;
    Ok((name.to_string(), segments))
}

/// Whether `mode` allows an upload into `name`, given whether the table exists.
fn check_mode(mode: IngestMode, name: &str, exists: bool) -> Result<()> {
    match (exists, mode.if_exists, mode.create_if_missing) {
        (true, IfExists::Fail, _) => Err(HedfError::TableExists(name.to_string())),
        (false, _, false) => Err(HedfError::NoSuchTable(name.to_string())),
        _ => Ok(()),
    }
}

/// Marks the segments of `old` that `kept` does not reuse for deletion.
fn retire(old: &TableVersion, kept: &[Arc<Segment>]) {
    for s in &old.segments {
        if !kept.iter().any(|k| Arc::ptr_eq(k, s)) {
            s.retired.store(true, Ordering::Release);
        }
    }
}

/// An upload in progress: validated batches go to a new segment; nothing is visible until
/// [`Upload::commit`]. Dropping it abandons the upload and deletes its temporary file.
pub struct Upload {
    tenant: Arc<Tenant>,
    name: String,
    mode: IngestMode,
    writer: SegmentWriter,
    path: PathBuf,
}

impl Upload {
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch)
    }

    /// Makes the upload durable and visible; returns the rows it added.
    pub fn commit(self) -> Result<usize> {
        let Upload {
            tenant,
            name,
            mode,
            writer,
            path,
        } = self;
        let layout = writer.layout().clone();
        let rows = writer.finish()?;
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("segment names are UTF-8");
        let segment = Segment::new(SegmentFile {
            location: object_store::path::Path::from(file_name),
            bytes: std::fs::metadata(&path)?.len(),
            rows: rows as u64,
            local: path.clone(),
        });
        let result = (|| {
            let _commit = tenant.commit.lock().expect("commit lock");
            let mut tables = (*tenant.snapshot()).clone();
            let current = tables.get(&name).cloned();
            // Checked again: another upload may have committed since this one began.
            check_mode(mode, &name, current.is_some())?;
            let mut segments = Vec::new();
            if let (Some(current), IfExists::Append) = (&current, mode.if_exists) {
                current.table()?.layout().check_compatible(&layout)?;
                segments.extend(current.segments.iter().cloned());
            }
            segments.push(segment.clone());
            let version = TableVersion::open(&name, segments);
            version.table()?;
            let kept = version.segments.clone();
            tables.insert(name.clone(), Arc::new(version));
            tenant.publish(tables)?;
            if let Some(current) = &current {
                retire(current, &kept);
            }
            Ok(rows)
        })();
        if result.is_err() {
            segment.retired.store(true, Ordering::Release);
        }
        result
    }
}

/// Warnings for an upload's schema: numeric columns that are not encrypted (a measure left in
/// clear by mistake is the likeliest way to leak one).
pub fn plaintext_warnings(schema: &Schema) -> Vec<String> {
    schema
        .fields()
        .iter()
        .filter(|f| !f.metadata().contains_key(crate::crypto::cell::META_KIND))
        .filter(|f| f.data_type().is_numeric() || matches!(f.data_type(), DataType::Decimal128(..)))
        .filter(|f| !StorageLayout::is_reserved(f.name()))
        .map(|f| {
            format!(
                "column {:?} ({}) is not encrypted: its values are stored in clear",
                f.name(),
                f.data_type()
            )
        })
        .collect()
}

/// Names become file and folder names: a conservative alphabet, no path tricks.
fn check_name(what: &str, name: &str, extra: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(c));
    if ok {
        Ok(())
    } else {
        Err(HedfError::Invalid(format!(
            "invalid {what} name {name:?}: use letters, digits and _ (at most 128)"
        )))
    }
}

/// Creates `dir` (and missing parents) readable by its owner only.
fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    #[cfg(unix)]
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

fn random_u64() -> Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(HedfError::internal)?;
    Ok(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stray_entries_do_not_stop_a_tenant_from_loading() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tenants").join("alice");
        std::fs::create_dir_all(dir.join("x.parquet")).unwrap();
        std::fs::create_dir_all(dir.join(".tmp-dir")).unwrap();
        for file in ["orphan.parquet", ".tmpAbC", "notes.txt"] {
            std::fs::write(dir.join(file), b"left over").unwrap();
        }
        let tenant = Catalog::open(root.path(), None)
            .unwrap()
            .tenant("alice")
            .unwrap();
        assert!(tenant.snapshot().is_empty());
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        // Uncommitted files are deleted; what hedf did not write is left alone.
        assert_eq!(left, [".tmp-dir", "notes.txt", "x.parquet"]);
    }
}
