//! A DataFusion session that knows hedf: `he_sum` registered (and behind `SUM` of an encrypted
//! column), ciphertext misuse refused.

use std::num::NonZeroUsize;
use std::sync::Arc;

use datafusion::common::TableReference;
use datafusion::datasource::TableProvider;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::memory_pool::{
    FairSpillPool, MemoryPool, TrackConsumersPool, UnboundedMemoryPool,
};
use datafusion::execution::object_store::{ObjectStoreRegistry, ObjectStoreUrl};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{FunctionRegistry, SessionStateBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};
use object_store::ObjectStore;
use url::Url;

use crate::engine::fusion::FuseHeSums;
use crate::engine::guard::{CiphertextGuard, OperatorGuard};
use crate::udaf::builtin::encryption_aware_builtins;
use crate::udaf::he_sum_udaf;

/// Stack size of every runtime thread. Planning and evaluating deep expressions (a BI tool's
/// 5,000-term OR chain) recurses deeply; DataFusion's recursion protection grows the stack of
/// its planner on demand, and this leaves room for the rest (physical evaluation, drops).
pub const THREAD_STACK_BYTES: usize = 64 << 20;

/// The multi-threaded tokio runtime hedf's servers and shells run on: large thread stacks
/// (see [`THREAD_STACK_BYTES`]), all drivers enabled.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(THREAD_STACK_BYTES)
        .build()
}

/// A session with DataFusion's defaults plus hedf.
pub fn new_context() -> SessionContext {
    new_context_with_config(SessionConfig::new())
}

/// A session with the given configuration plus hedf.
pub fn new_context_with_config(config: SessionConfig) -> SessionContext {
    context(SessionStateBuilder::new().with_config(config))
}

fn context(builder: SessionStateBuilder) -> SessionContext {
    let state = builder.with_default_features().build();
    // The guard runs first, so misuse of a ciphertext is reported as such rather than as a
    // type-coercion error about binary columns.
    let mut analyzer_rules = state.analyzer().rules.clone();
    analyzer_rules.insert(0, Arc::new(CiphertextGuard));
    // This rule splits SUM(x) next to one COUNT(DISTINCT y) into SUM(SUM(x)); with SUM(enc)
    // meaning he_sum, the outer SUM would be a sum of sums. It only saves a hash table for
    // plaintext queries.
    let mut optimizer_rules: Vec<_> = state
        .optimizers()
        .iter()
        .filter(|rule| rule.name() != "single_distinct_aggregation_to_group_by")
        .cloned()
        .collect();
    // Last, so it sees aggregations as the other rules left them (unused sums pruned).
    optimizer_rules.push(Arc::new(FuseHeSums::default()));
    let mut expr_planners = state.expr_planners().to_vec();
    expr_planners.insert(0, Arc::new(OperatorGuard::default()));
    let state = SessionStateBuilder::new_from_existing(state)
        .with_analyzer_rules(analyzer_rules)
        .with_optimizer_rules(optimizer_rules)
        .with_expr_planners(expr_planners)
        .build();
    let ctx = SessionContext::new_with_state(state);
    let he_sum = Arc::new(he_sum_udaf());
    ctx.register_udaf(he_sum.as_ref().clone());
    for builtin in encryption_aware_builtins(|name| ctx.udaf(name).ok(), he_sum) {
        ctx.register_udaf(builtin);
    }
    ctx
}

/// The memory pool all queries of a process share, `limit` bytes or unbounded: DataFusion's
/// fair spill pool (operators that can spill or emit early, such as aggregations, each get an
/// equal share; the others take what is left), naming its largest users when it runs out.
pub fn memory_pool(limit: Option<usize>) -> Arc<dyn MemoryPool> {
    match limit {
        Some(bytes) => Arc::new(TrackConsumersPool::new(
            FairSpillPool::new(bytes),
            NonZeroUsize::new(3).expect("non-zero"),
        )),
        None => Arc::new(UnboundedMemoryPool::default()),
    }
}

/// Catalog and schema names a served tenant's tables live under (`hedf.public.<table>`).
pub const CATALOG: &str = "hedf";
pub const SCHEMA: &str = "public";

/// The object store URL a tenant's segments are read through (see [`tenant_context`]).
pub fn tenant_store_url() -> ObjectStoreUrl {
    ObjectStoreUrl::parse("hedf://tenant").expect("a valid URL")
}

/// A session over one tenant's tables, as the server runs queries: only those tables exist,
/// and the only object store is `store` (the tenant's segments, read-only) at
/// [`tenant_store_url`]; the local file system is not reachable.
pub fn tenant_context<'a>(
    tables: impl IntoIterator<Item = (&'a str, Arc<dyn TableProvider>)>,
    store: Arc<dyn ObjectStore>,
    target_partitions: usize,
    memory_pool: Arc<dyn MemoryPool>,
) -> DfResult<SessionContext> {
    let config = SessionConfig::new()
        .with_default_catalog_and_schema(CATALOG, SCHEMA)
        .with_information_schema(false)
        .with_target_partitions(target_partitions);
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(memory_pool)
        .with_object_store_registry(Arc::new(OneStore {
            url: tenant_store_url(),
            store,
        }))
        .build_arc()?;
    let ctx = context(
        SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime),
    );
    for (name, table) in tables {
        ctx.register_table(TableReference::bare(name), table)?;
    }
    Ok(ctx)
}

/// An object store registry that knows exactly one store and accepts no other.
#[derive(Debug)]
struct OneStore {
    url: ObjectStoreUrl,
    store: Arc<dyn ObjectStore>,
}

impl ObjectStoreRegistry for OneStore {
    fn register_store(
        &self,
        _url: &Url,
        _store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        None
    }

    fn get_store(&self, url: &Url) -> DfResult<Arc<dyn ObjectStore>> {
        let wanted: &Url = self.url.as_ref();
        if url.scheme() == wanted.scheme() && url.host_str() == wanted.host_str() {
            Ok(self.store.clone())
        } else {
            Err(DataFusionError::Plan(
                "this session reads only its tenant's tables; no other file can be reached".into(),
            ))
        }
    }
}
