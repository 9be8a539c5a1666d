//! A DataFusion session that knows hedf: `he_sum` registered, ciphertext misuse refused.

use std::sync::Arc;

use datafusion::common::TableReference;
use datafusion::datasource::TableProvider;
use datafusion::error::Result as DfResult;
use datafusion::execution::SessionStateBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::guard::CiphertextGuard;
use crate::udaf::he_sum_udaf;

/// A session with DataFusion's defaults plus hedf.
pub fn new_context() -> SessionContext {
    new_context_with_config(SessionConfig::new())
}

/// A session with the given configuration plus hedf.
pub fn new_context_with_config(config: SessionConfig) -> SessionContext {
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .build();
    // The guard runs first, so misuse of a ciphertext is reported as such rather than as a
    // type-coercion error about binary columns.
    let mut rules = state.analyzer().rules.clone();
    rules.insert(0, Arc::new(CiphertextGuard));
    let state = SessionStateBuilder::new_from_existing(state)
        .with_analyzer_rules(rules)
        .build();
    let ctx = SessionContext::new_with_state(state);
    ctx.register_udaf(he_sum_udaf());
    ctx
}

/// Catalog and schema names a served tenant's tables live under (`hedf.public.<table>`).
pub const CATALOG: &str = "hedf";
pub const SCHEMA: &str = "public";

/// A session over one tenant's tables, as the server runs queries: only those tables exist.
pub fn tenant_context<'a>(
    tables: impl IntoIterator<Item = (&'a str, Arc<dyn TableProvider>)>,
) -> DfResult<SessionContext> {
    let config = SessionConfig::new()
        .with_default_catalog_and_schema(CATALOG, SCHEMA)
        .with_information_schema(false);
    let ctx = new_context_with_config(config);
    for (name, table) in tables {
        ctx.register_table(TableReference::bare(name), table)?;
    }
    Ok(ctx)
}
