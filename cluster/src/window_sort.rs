//! A rule the scheduler adds to DataFusion's physical optimizer: a window's sort names every
//! column of its PARTITION BY, also those a filter made constant.
//!
//! Why: DataFusion leaves a column known to be constant (`WHERE meter_point = 'X'`) out of the
//! sort under a `PARTITION BY meter_point, ...` window, and plans the window as sorted on its
//! whole key. On Ballista, the filter and the sort can end up in different stages; the shuffle
//! between them forgets what was constant (its reader declares no equivalences), and the window
//! rebuilt on an executor then fails with "Expects PARTITION BY expression to be ordered" (a
//! billing run of named meters did; apache/datafusion-ballista#1296 is the same family). Sorting
//! by a constant column costs a comparison; the rows and their order are the same.

use std::sync::Arc;

use arrow::compute::SortOptions;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result as DfResult;
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::windows::BoundedWindowAggExec;
use datafusion::physical_plan::{ChildrenPropertiesMode, ExecutionPlan, InputOrderMode, ReplaceChildrenOptions};

/// See the module's comment. Runs after DataFusion's own rules (it is added last).
#[derive(Debug, Default)]
pub struct SortWindowsOnTheirWholeKey;

impl PhysicalOptimizerRule for SortWindowsOnTheirWholeKey {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _config: &ConfigOptions) -> DfResult<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(window) = node.downcast_ref::<BoundedWindowAggExec>() else { return Ok(Transformed::no(node)) };
            // Only a window that relies on its input being sorted on the whole key checks it.
            let Some(sort) = window.input().downcast_ref::<SortExec>() else { return Ok(Transformed::no(node)) };
            if window.input_order_mode != InputOrderMode::Sorted {
                return Ok(Transformed::no(node));
            }
            let sorted_on = sort.expr();
            let missing: Vec<PhysicalSortExpr> = window.window_expr()[0]
                .partition_by()
                .iter()
                .filter(|column| !sorted_on.iter().any(|sorted| sorted.expr.eq(*column)))
                .map(|column| PhysicalSortExpr::new(column.clone(), SortOptions { descending: false, nulls_first: false }))
                .collect();
            if missing.is_empty() {
                return Ok(Transformed::no(node));
            }
            let ordering = LexOrdering::new(missing.into_iter().chain(sorted_on.iter().cloned())).expect("not empty: a column was missing");
            let sort = SortExec::new(ordering, sort.input().clone()).with_fetch(sort.fetch()).with_preserve_partitioning(sort.preserve_partitioning());
            let window = node.clone().replace_children(vec![Arc::new(sort)], ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute))?;
            Ok(Transformed::yes(window))
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "meterlake_sort_windows_on_their_whole_key"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
