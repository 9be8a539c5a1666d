//! The server's store of encrypted tables: one folder per tenant holding immutable Parquet
//! segments and a manifest naming each table's segments.
//!
//! Every change writes its new segment first (temporary file, fsync, rename), then replaces the
//! manifest the same way. A crash, `kill -9` or dropped upload therefore leaves either the old
//! manifest or the new one, never a partial table; segments no manifest names are leftovers and
//! are deleted when the tenant is next loaded. Segments a change retires are deleted once the
//! last query reading them finishes (they are reference counted).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::TableProvider;

use crate::error::{HedfError, Result};
use crate::table::{EncryptedTable, SegmentWriter, StorageLayout};

const MANIFEST: &str = "manifest";
const MANIFEST_HEADER: &str = "hedf-manifest 1";

/// What an upload does when its table is missing or already there (Flight SQL's
/// `TableDefinitionOptions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngestMode {
    pub create_if_missing: bool,
    pub if_exists: IfExists,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfExists {
    Fail,
    Append,
    Replace,
}

impl IngestMode {
    pub const CREATE: IngestMode = IngestMode {
        create_if_missing: true,
        if_exists: IfExists::Fail,
    };
    pub const APPEND: IngestMode = IngestMode {
        create_if_missing: false,
        if_exists: IfExists::Append,
    };
    pub const REPLACE: IngestMode = IngestMode {
        create_if_missing: true,
        if_exists: IfExists::Replace,
    };

    fn check(&self, name: &str, exists: bool) -> Result<()> {
        match (exists, self.if_exists, self.create_if_missing) {
            (true, IfExists::Fail, _) => Err(HedfError::TableExists(name.to_string())),
            (false, _, false) => Err(HedfError::NoSuchTable(name.to_string())),
            _ => Ok(()),
        }
    }
}

/// All tenants' tables under one data folder.
pub struct Catalog {
    root: PathBuf,
    tenants: Mutex<HashMap<String, Arc<Tenant>>>,
}

impl Catalog {
    pub fn open(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root.join("tenants"))?;
        Ok(Catalog {
            root: root.to_path_buf(),
            tenants: Mutex::new(HashMap::new()),
        })
    }

    /// The tenant of `user`, loaded (and cleaned of upload leftovers) on first use.
    pub fn tenant(&self, user: &str) -> Result<Arc<Tenant>> {
        check_name("user", user, ".-")?;
        let mut tenants = self.tenants.lock().expect("tenant map lock");
        if let Some(t) = tenants.get(user) {
            return Ok(t.clone());
        }
        let tenant = Arc::new(Tenant::load(&self.root.join("tenants").join(user))?);
        tenants.insert(user.to_string(), tenant.clone());
        Ok(tenant)
    }
}

/// One immutable Parquet file of a table; deleted on drop once a change has retired it.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    retired: AtomicBool,
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.retired.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One committed state of a table. Queries hold it while they run, which keeps its files.
#[derive(Debug)]
pub struct TableVersion {
    table: Arc<EncryptedTable>,
    segments: Vec<Arc<Segment>>,
}

impl TableVersion {
    fn open(segments: Vec<Arc<Segment>>) -> Result<Self> {
        let files: Vec<PathBuf> = segments.iter().map(|s| s.path.clone()).collect();
        Ok(TableVersion {
            table: Arc::new(EncryptedTable::from_files(&files)?),
            segments,
        })
    }

    pub fn provider(&self) -> Arc<dyn TableProvider> {
        self.table.clone()
    }

    pub fn rows(&self) -> u64 {
        self.table.rows()
    }

    /// The schema queries see: plaintext columns and ciphertext cells with their metadata.
    pub fn schema(&self) -> SchemaRef {
        self.table.schema()
    }
}

/// A tenant's tables by name.
pub type Tables = BTreeMap<String, Arc<TableVersion>>;

/// One user's tables. Reads take a snapshot; changes are serialised by `commit`.
pub struct Tenant {
    dir: PathBuf,
    tables: RwLock<Arc<Tables>>,
    commit: Mutex<()>,
}

impl Tenant {
    fn load(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut tables = Tables::new();
        let manifest = dir.join(MANIFEST);
        if manifest.exists() {
            let text = std::fs::read_to_string(&manifest)?;
            let mut lines = text.lines();
            if lines.next() != Some(MANIFEST_HEADER) {
                return Err(HedfError::Malformed(format!(
                    "{} is not a hedf manifest",
                    manifest.display()
                )));
            }
            for line in lines.filter(|l| !l.is_empty()) {
                let (name, files) = line.split_once('\t').ok_or_else(|| {
                    HedfError::Malformed(format!("bad line in {}", manifest.display()))
                })?;
                let segments = files
                    .split(' ')
                    .map(|f| {
                        Arc::new(Segment {
                            path: dir.join(f),
                            retired: AtomicBool::new(false),
                        })
                    })
                    .collect();
                tables.insert(name.to_string(), Arc::new(TableVersion::open(segments)?));
            }
        }
        let tenant = Tenant {
            dir: dir.to_path_buf(),
            tables: RwLock::new(Arc::new(tables)),
            commit: Mutex::new(()),
        };
        tenant.remove_leftovers()?;
        Ok(tenant)
    }

    /// Deletes files no table names: segments of uploads that never committed.
    fn remove_leftovers(&self) -> Result<()> {
        let tables = self.snapshot();
        let live: Vec<&Path> = tables
            .values()
            .flat_map(|v| v.segments.iter().map(|s| s.path.as_path()))
            .collect();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let data = name.ends_with(".parquet") || name.ends_with(".tmp");
            if data && !live.contains(&path.as_path()) {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
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

    /// Starts an upload into `name`: checks the mode and the uploaded schema now, so a bad
    /// upload fails before any data is sent; the table changes only at [`Upload::commit`].
    pub fn begin_upload(
        self: &Arc<Self>,
        name: &str,
        mode: IngestMode,
        schema: &Schema,
    ) -> Result<Upload> {
        check_name("table", name, "")?;
        let (layout, format) = StorageLayout::from_upload(schema)?;
        let current = self.snapshot().get(name).cloned();
        mode.check(name, current.is_some())?;
        if let (Some(current), IfExists::Append) = (&current, mode.if_exists) {
            current.table.layout().check_compatible(&layout)?;
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

    /// Removes a table; its files go once no running query reads them.
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

    /// Writes the manifest for `tables` atomically, then makes it the current state.
    fn publish(&self, tables: Tables) -> Result<()> {
        let mut text = format!("{MANIFEST_HEADER}\n");
        for (name, version) in &tables {
            let files: Vec<&str> = version
                .segments
                .iter()
                .map(|s| s.path.file_name().and_then(|n| n.to_str()).unwrap_or(""))
                .collect();
            text += &format!("{name}\t{}\n", files.join(" "));
        }
        let tmp = self.dir.join(format!("{MANIFEST}.tmp"));
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(MANIFEST))?;
        File::open(&self.dir)?.sync_all()?;
        *self.tables.write().expect("tables lock") = Arc::new(tables);
        Ok(())
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
        let segment = Arc::new(Segment {
            path,
            retired: AtomicBool::new(false),
        });
        let result = (|| {
            let _commit = tenant.commit.lock().expect("commit lock");
            let mut tables = (*tenant.snapshot()).clone();
            let current = tables.get(&name).cloned();
            // Checked again: another upload may have committed since this one began.
            mode.check(&name, current.is_some())?;
            let mut segments = Vec::new();
            if let (Some(current), IfExists::Append) = (&current, mode.if_exists) {
                current.table.layout().check_compatible(&layout)?;
                segments.extend(current.segments.iter().cloned());
            }
            segments.push(segment.clone());
            let version = TableVersion::open(segments)?;
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

fn random_u64() -> Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| HedfError::Io(std::io::Error::other(e)))?;
    Ok(u64::from_le_bytes(bytes))
}
