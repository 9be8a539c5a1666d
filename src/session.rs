//! A DataFusion session that knows hedf: `he_sum` registered, ciphertext misuse refused.

use std::sync::Arc;

use datafusion::prelude::{SessionConfig, SessionContext};

use crate::guard::CiphertextGuard;
use crate::udaf::he_sum_udaf;

/// A session with DataFusion's defaults plus hedf.
pub fn new_context() -> SessionContext {
    new_context_with_config(SessionConfig::new())
}

/// A session with the given configuration plus hedf.
pub fn new_context_with_config(config: SessionConfig) -> SessionContext {
    let ctx = SessionContext::new_with_config(config);
    ctx.register_udaf(he_sum_udaf());
    ctx.add_analyzer_rule(Arc::new(CiphertextGuard));
    ctx
}
