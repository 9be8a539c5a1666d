//! `CellAssembleExec`: turns stored ciphertext parts back into cells as batches stream by.

use std::fmt;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use futures::StreamExt;

use super::storage::{assemble_cells, ColumnLayout};

#[derive(Debug)]
pub(crate) struct CellAssembleExec {
    input: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    /// Output columns, with indices into the input (stored) batch.
    columns: Arc<Vec<ColumnLayout>>,
    properties: Arc<PlanProperties>,
}

impl CellAssembleExec {
    pub fn new(
        input: Arc<dyn ExecutionPlan>,
        schema: SchemaRef,
        columns: Vec<ColumnLayout>,
    ) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            input.output_partitioning().clone(),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        CellAssembleExec {
            input,
            schema,
            columns: Arc::new(columns),
            properties,
        }
    }
}

fn assemble(
    batch: RecordBatch,
    schema: &SchemaRef,
    columns: &[ColumnLayout],
) -> Result<RecordBatch> {
    let out: Vec<ArrayRef> = columns
        .iter()
        .map(|c| match c {
            ColumnLayout::Plain { storage } => Ok(batch.column(*storage).clone()),
            ColumnLayout::Cell {
                marking,
                body,
                row,
                seed,
            } => Ok(Arc::new(assemble_cells(
                &marking.crypto,
                batch.column(*body),
                batch.column(*row),
                batch.column(*seed),
            )?) as ArrayRef),
        })
        .collect::<Result<_>>()?;
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        out,
        &options,
    )?)
}

impl DisplayAs for CellAssembleExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "CellAssembleExec")
    }
}

impl ExecutionPlan for CellAssembleExec {
    fn name(&self) -> &str {
        "CellAssembleExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(CellAssembleExec::new(
            children[0].clone(),
            self.schema.clone(),
            self.columns.to_vec(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let (schema, columns) = (self.schema.clone(), self.columns.clone());
        let stream = input.map(move |batch| assemble(batch?, &schema, &columns));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream,
        )))
    }
}
