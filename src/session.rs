//! A DataFusion session that knows hedf: `he_sum` registered, ciphertext misuse refused.

use std::sync::Arc;

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
