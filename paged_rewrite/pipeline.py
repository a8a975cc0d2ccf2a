"""The rewrite, top to bottom: find the cache, page its writes and reads, rewire everything that
looked at its shape, reshape its I/O, and finish the model. Each step is one file in ``passes/``."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from paged_rewrite.passes.add_paged_inputs import add_paged_inputs
from paged_rewrite.passes.finalize_model import finalize_model
from paged_rewrite.passes.find_cache_sites import find_cache_sites
from paged_rewrite.passes.page_reads import page_reads
from paged_rewrite.passes.page_writes import page_writes
from paged_rewrite.passes.reshape_cache_io import reshape_cache_io
from paged_rewrite.passes.rewire_logical_shape import rewire_logical_shape
from paged_rewrite.report import CacheReport, RewriteReport, TensorSpec


@dataclass(frozen=True)
class RewriteOptions:
    """User choices: the page size, and optionally the context and pool sizes to make static."""

    kv_block_size: int
    ctx_len: int | None = None
    num_blocks: int | None = None


def rewrite_model(model: ir.Model, options: RewriteOptions) -> RewriteReport:
    """Rewrite ``model`` in place into a paged-KV model and report what was done."""
    sites = find_cache_sites(model)
    caches = [CacheReport.of(tensor) for tensor in sites.tensors]
    write_ops = {t.write.op_type for t in sites.tensors}
    read_ops = {r.op_type for t in sites.tensors for r in t.reads}

    layout = add_paged_inputs(model, sites, options.kv_block_size, options.ctx_len, options.num_blocks)
    writes = page_writes(sites, layout)
    reads = page_reads(sites, layout)
    shapes = rewire_logical_shape(sites, layout)
    reshape_cache_io(sites, layout)
    removed = finalize_model(model, keep_inputs={t.name for t in sites.tensors})

    return RewriteReport(
        input_path="",
        output_path=None,
        kv_block_size=layout.kv_block_size,
        num_kv_blocks=layout.num_kv_blocks,
        total_num_kv_blocks=layout.total_num_kv_blocks,
        caches=caches,
        rewritten={
            f"{'/'.join(sorted(write_ops))} -> PagedCtxScatter": writes,
            f"{'/'.join(sorted(read_ops))} -> PagedCtxGather": reads,
            "Shape(cache) -> PagedLogicalShape": shapes,
        },
        added_inputs=[str(layout.block_table.name), str(layout.slot_id.name)],
        removed_inputs=removed,
        inputs=[TensorSpec.of(v) for v in model.graph.inputs],
        outputs=[TensorSpec.of(v) for v in model.graph.outputs],
    )
