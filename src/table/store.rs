//! The only object store a tenant's session has: it reads the named segment files of one folder
//! and nothing else, and writes nothing. So no SQL a tenant sends can reach another file on the
//! server (a `COPY ... TO` that slipped past planning would find no store to write to), and
//! plans show segment names relative to the tenant, not server paths.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::path::Path as FsPath;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// Reads `allowed` files of one folder; every other path is "not found", every write refused.
#[derive(Debug)]
pub struct SegmentStore {
    folder: LocalFileSystem,
    allowed: HashSet<Path>,
}

impl SegmentStore {
    /// A store over `folder` that serves exactly the files named in `allowed` (paths relative
    /// to the folder).
    pub fn new(
        folder: &FsPath,
        allowed: impl IntoIterator<Item = Path>,
    ) -> object_store::Result<Arc<Self>> {
        Ok(Arc::new(SegmentStore {
            folder: LocalFileSystem::new_with_prefix(folder)?,
            allowed: allowed.into_iter().collect(),
        }))
    }

    fn check(&self, location: &Path) -> object_store::Result<()> {
        if self.allowed.contains(location) {
            Ok(())
        } else {
            Err(object_store::Error::NotFound {
                path: location.to_string(),
                source: "not a segment of this tenant's tables".into(),
            })
        }
    }
}

fn read_only(location: &Path) -> object_store::Error {
    object_store::Error::PermissionDenied {
        path: location.to_string(),
        source: "tenant sessions cannot write files".into(),
    }
}

impl fmt::Display for SegmentStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SegmentStore({} files)", self.allowed.len())
    }
}

#[async_trait]
impl ObjectStore for SegmentStore {
    async fn put_opts(
        &self,
        location: &Path,
        _payload: PutPayload,
        _opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        Err(read_only(location))
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(read_only(location))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.check(location)?;
        self.folder.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.check(location)?;
        self.folder.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        locations
            .map(|l| l.and_then(|l| Err(read_only(&l))))
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let allowed = self.allowed.clone();
        self.folder
            .list(prefix)
            .filter(move |m| {
                let keep = m.as_ref().map_or(true, |m| allowed.contains(&m.location));
                futures::future::ready(keep)
            })
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let mut listed = self.folder.list_with_delimiter(prefix).await?;
        listed.common_prefixes.clear();
        listed
            .objects
            .retain(|m| self.allowed.contains(&m.location));
        Ok(listed)
    }

    async fn copy_opts(
        &self,
        _from: &Path,
        to: &Path,
        _options: CopyOptions,
    ) -> object_store::Result<()> {
        Err(read_only(to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    #[tokio::test]
    async fn reads_only_allowed_files_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seg.parquet"), b"segment").unwrap();
        std::fs::write(dir.path().join("manifest"), b"private").unwrap();
        let store = SegmentStore::new(dir.path(), [Path::from("seg.parquet")]).unwrap();
        let got = store.get(&Path::from("seg.parquet")).await.unwrap();
        assert_eq!(got.bytes().await.unwrap().as_ref(), b"segment");
        for other in [
            "manifest",
            "../etc/passwd",
            "/etc/passwd",
            "sub/seg.parquet",
        ] {
            assert!(store.get(&Path::from(other)).await.is_err(), "{other}");
        }
        let listed: Vec<_> = store.list(None).collect().await;
        assert_eq!(listed.len(), 1);
        assert!(store
            .put(&Path::from("seg.parquet"), PutPayload::from_static(b"x"))
            .await
            .is_err());
        assert!(store.delete(&Path::from("seg.parquet")).await.is_err());
        assert!(store
            .copy(&Path::from("seg.parquet"), &Path::from("copy.parquet"))
            .await
            .is_err());
        assert_eq!(
            std::fs::read(dir.path().join("seg.parquet")).unwrap(),
            b"segment"
        );
        assert!(!dir.path().join("copy.parquet").exists());
    }
}
