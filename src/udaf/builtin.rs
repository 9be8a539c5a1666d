//! DataFusion's built-in aggregates as they meet an encrypted column.
//!
//! Users and BI tools write `SUM`, not `he_sum`: `SUM(enc)` is `he_sum(enc)` (same result,
//! marked as a sum), and `SUM` of a plaintext column is DataFusion's own. Aggregates that need
//! a measure's plaintext (`AVG`, `MEDIAN`, `STDDEV`, ...) are refused at planning with a message
//! that names the column and says what to ask instead, not DataFusion's "failed to match any
//! signature" text. Each wrapper keeps the built-in's name, so plaintext queries plan, name
//! their columns and optimise exactly as before.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::plan_err;
use datafusion::error::Result;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::type_coercion::functions::fields_with_udf;
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Documentation, GroupsAccumulator, ReversedUDAF,
    SetMonotonicity, Signature, StatisticsArgs,
};
use datafusion::scalar::ScalarValue;

use crate::crypto::cell::META_KIND;
use crate::udaf::IN_A_CLIENT;

/// The built-in aggregates that need a measure's plaintext; `SUM` is not among them.
pub const NEEDS_PLAINTEXT: [&str; 7] = [
    "avg",
    "median",
    "stddev",
    "stddev_pop",
    "var",
    "var_pop",
    "approx_median",
];

/// What a wrapped built-in does with an encrypted argument.
#[derive(Debug, PartialEq, Eq, Hash)]
enum OnEncrypted {
    /// Runs this aggregate instead (`SUM` runs `he_sum`).
    Run(Arc<AggregateUDF>),
    /// Refused at planning.
    Refuse,
}

/// A built-in aggregate that knows encrypted columns (see the module comment).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct EncryptionAware {
    plain: Arc<AggregateUDF>,
    on_encrypted: OnEncrypted,
    signature: Signature,
}

impl EncryptionAware {
    /// `SUM` that runs `he_sum` on an encrypted column.
    pub fn sum(builtin: Arc<AggregateUDF>, he_sum: Arc<AggregateUDF>) -> AggregateUDF {
        Self::wrap(builtin, OnEncrypted::Run(he_sum))
    }

    /// A built-in aggregate refused on an encrypted column.
    pub fn refusing(builtin: Arc<AggregateUDF>) -> AggregateUDF {
        Self::wrap(builtin, OnEncrypted::Refuse)
    }

    fn wrap(plain: Arc<AggregateUDF>, on_encrypted: OnEncrypted) -> AggregateUDF {
        // Type checking happens in `coerce_types`, which sees the argument types only; the
        // decision needs the argument's metadata, which `return_field` sees.
        let signature = Signature::user_defined(plain.signature().volatility);
        AggregateUDF::from(EncryptionAware {
            plain,
            on_encrypted,
            signature,
        })
    }

    /// The aggregate that runs on these arguments, or a planning error for a refused one.
    fn target(&self, fields: &[FieldRef]) -> Result<&Arc<AggregateUDF>> {
        let Some(encrypted) = fields.iter().find(|f| is_encrypted(f)) else {
            return Ok(&self.plain);
        };
        let (column, name) = (encrypted.name(), self.plain.name().to_uppercase());
        match &self.on_encrypted {
            OnEncrypted::Run(udaf) => Ok(udaf),
            OnEncrypted::Refuse if name == "AVG" => plan_err!(
                "{column} is encrypted: AVG needs its plaintext, which only the key's owner has; \
                 ask the server for SUM({column}) and COUNT({column}) and divide after \
                 decrypting; {IN_A_CLIENT}"
            ),
            OnEncrypted::Refuse => plan_err!(
                "{column} is encrypted: {name} needs its plaintext, which only the key's owner \
                 has; on the server an encrypted column can only be selected, summed (SUM) or \
                 counted"
            ),
        }
    }
}

fn is_encrypted(field: &FieldRef) -> bool {
    field.metadata().contains_key(META_KIND)
}

/// Binary types are what cells and sums are; everything else is the built-in's business.
fn maybe_encrypted(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::FixedSizeBinary(_) | DataType::LargeBinary | DataType::Binary
    )
}

impl AggregateUDFImpl for EncryptionAware {
    fn name(&self) -> &str {
        self.plain.name()
    }

    fn aliases(&self) -> &[String] {
        self.plain.aliases()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if arg_types.iter().any(maybe_encrypted) {
            return Ok(arg_types.to_vec());
        }
        let fields: Vec<FieldRef> = arg_types
            .iter()
            .map(|t| Arc::new(Field::new("", t.clone(), true)))
            .collect();
        Ok(fields_with_udf(&fields, self.plain.as_ref())?
            .iter()
            .map(|f| f.data_type().clone())
            .collect())
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.plain.return_type(arg_types)
    }

    fn return_field(&self, arg_fields: &[FieldRef]) -> Result<FieldRef> {
        self.target(arg_fields)?.return_field(arg_fields)
    }

    fn is_nullable(&self) -> bool {
        self.plain.is_nullable()
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        self.target(args.input_fields)?.state_fields(args)
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.target(args.expr_fields)?.accumulator(args)
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        self.target(args.expr_fields)
            .is_ok_and(|udaf| udaf.groups_accumulator_supported(args))
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        self.target(args.expr_fields)?
            .create_groups_accumulator(args)
    }

    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.target(args.expr_fields)?
            .create_sliding_accumulator(args)
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        self.plain.inner().order_sensitivity()
    }

    fn reverse_expr(&self) -> ReversedUDAF {
        // Reversing keeps the same function, which is this wrapper, not the built-in.
        match self.plain.reverse_udf() {
            ReversedUDAF::Identical => ReversedUDAF::Identical,
            ReversedUDAF::NotSupported | ReversedUDAF::Reversed(_) => ReversedUDAF::NotSupported,
        }
    }

    fn value_from_stats(&self, args: &StatisticsArgs) -> Option<ScalarValue> {
        self.plain.value_from_stats(args)
    }

    fn default_value(&self, data_type: &DataType) -> Result<ScalarValue> {
        self.plain.default_value(data_type)
    }

    fn set_monotonicity(&self, data_type: &DataType) -> SetMonotonicity {
        self.plain.inner().set_monotonicity(data_type)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.plain.documentation()
    }
}

/// DataFusion's `SUM`, `he_sum` behind it for encrypted columns, and the built-ins of
/// [`NEEDS_PLAINTEXT`] refusing encrypted columns: the aggregates to register over the
/// built-ins of `registered` (which must hold DataFusion's defaults).
pub fn encryption_aware_builtins(
    registered: impl Fn(&str) -> Option<Arc<AggregateUDF>>,
    he_sum: Arc<AggregateUDF>,
) -> Vec<AggregateUDF> {
    let sum = registered("sum").map(|sum| EncryptionAware::sum(sum, he_sum));
    let refusing = NEEDS_PLAINTEXT
        .iter()
        .filter_map(|name| registered(name))
        .map(EncryptionAware::refusing);
    sum.into_iter().chain(refusing).collect()
}
