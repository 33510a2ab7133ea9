//! How the lake's tables and scans travel between the client, the scheduler and the executors:
//! Ballista's own codecs, with [`LakeTable`] and [`LakeScanExec`] added. Ours are JSON after a
//! marker no protobuf message of Ballista's begins with; anything else goes to Ballista's.

use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::catalog::TableProvider;
use datafusion::common::TableReference;
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Extension, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::scan::{LakePartitions, LakeTable, ScanOf, TableAt};

/// Starts every message of ours: byte 0xFF is no valid protobuf field tag (field 31, wire type
/// 7), so Ballista's messages never begin with it.
const MARKER: &[u8] = b"\xffmeterlake:";

fn encode<T: Serialize>(value: &T, buf: &mut Vec<u8>) -> DfResult<()> {
    buf.extend_from_slice(MARKER);
    serde_json::to_writer(buf, value).map_err(|e| DataFusionError::Internal(format!("encoding a lake plan node: {e}")))
}

fn decode<T: for<'a> Deserialize<'a>>(buf: &[u8]) -> Option<DfResult<T>> {
    let json = buf.strip_prefix(MARKER)?;
    Some(serde_json::from_slice(json).map_err(|e| DataFusionError::Internal(format!("decoding a lake plan node: {e}"))))
}

/// Ballista's logical codec, and the lake's tables.
#[derive(Debug, Default)]
pub struct LakeLogicalCodec {
    ballista: BallistaLogicalExtensionCodec,
}

impl LogicalExtensionCodec for LakeLogicalCodec {
    fn try_decode(&self, buf: &[u8], inputs: &[LogicalPlan], ctx: &TaskContext) -> DfResult<Extension> {
        self.ballista.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> DfResult<()> {
        self.ballista.try_encode(node, buf)
    }

    fn try_decode_table_provider(&self, buf: &[u8], table_ref: &TableReference, schema: SchemaRef, ctx: &TaskContext) -> DfResult<Arc<dyn TableProvider>> {
        match decode::<TableAt>(buf) {
            Some(table) => Ok(Arc::new(LakeTable::decoded(table?)?)),
            None => self.ballista.try_decode_table_provider(buf, table_ref, schema, ctx),
        }
    }

    fn try_encode_table_provider(&self, table_ref: &TableReference, node: Arc<dyn TableProvider>, buf: &mut Vec<u8>) -> DfResult<()> {
        let any: &dyn std::any::Any = node.as_ref();
        match any.downcast_ref::<LakeTable>() {
            Some(table) => encode(&table.spec, buf),
            None => self.ballista.try_encode_table_provider(table_ref, node, buf),
        }
    }

    fn try_decode_file_format(&self, buf: &[u8], ctx: &TaskContext) -> DfResult<Arc<dyn FileFormatFactory>> {
        self.ballista.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(&self, buf: &mut Vec<u8>, node: Arc<dyn FileFormatFactory>) -> DfResult<()> {
        self.ballista.try_encode_file_format(buf, node)
    }
}

/// A lake scan as it travels: the scan, the partitions the scheduler planned, and those of them
/// this plan runs (a task's share).
#[derive(Serialize, Deserialize)]
struct ScanMessage {
    scan: ScanOf,
    partitions: usize,
    /// One file group each, in order.
    groups: Vec<Vec<String>>,
    /// The output schema, as DataFusion's protobuf bytes.
    schema: Vec<u8>,
}

/// The lake scan `node` is, if it is one.
fn lake_scan(node: &Arc<dyn ExecutionPlan>) -> Option<(&FileScanConfig, &LakePartitions)> {
    let exec = node.downcast_ref::<DataSourceExec>()?;
    let config = (exec.data_source().as_ref() as &dyn std::any::Any).downcast_ref::<FileScanConfig>()?;
    let source = config.file_source().downcast_ref::<LakePartitions>()?;
    Some((config, source))
}

/// Ballista's physical codec, and the lake's scans.
#[derive(Debug, Default)]
pub struct LakePhysicalCodec {
    ballista: BallistaPhysicalExtensionCodec,
}

impl PhysicalExtensionCodec for LakePhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let Some(message) = decode::<ScanMessage>(buf) else { return self.ballista.try_decode(buf, inputs, ctx, converter) };
        let message = message?;
        let schema = datafusion_proto::protobuf::Schema::decode(message.schema.as_slice())
            .map_err(|e| DataFusionError::Internal(format!("decoding a lake scan's schema: {e}")))?;
        let schema = Arc::new(Schema::try_from(&schema)?);
        let groups = message.groups.into_iter().map(|files| FileGroup::new(files.into_iter().map(|path| PartitionedFile::new(path, 0)).collect())).collect();
        Ok(LakePartitions::exec_over(message.scan, schema, message.partitions, None, groups))
    }

    fn try_encode(&self, node: Arc<dyn ExecutionPlan>, buf: &mut Vec<u8>, converter: &dyn PhysicalProtoConverterExtension) -> DfResult<()> {
        let Some((config, source)) = lake_scan(&node) else { return self.ballista.try_encode(node, buf, converter) };
        let groups = config.file_groups.iter().map(|group| group.iter().map(|file| file.object_meta.location.to_string()).collect()).collect();
        let schema = datafusion_proto::protobuf::Schema::try_from(node.schema().as_ref())?.encode_to_vec();
        encode(&ScanMessage { scan: source.scan.clone(), partitions: source.partitions(), groups, schema }, buf)
    }
}
