"""What a rewrite found, changed and produced: the object ``rewrite()`` returns and ``--json`` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import onnx

from paged_rewrite.graph import dims_of
from paged_rewrite.passes.sites import CacheTensor, Dim

if TYPE_CHECKING:  # the static-shape machinery loads only with --full-check
    from paged_rewrite.static_shapes import StaticShapeReport


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and shape (ints static, strings symbolic)."""

    name: str
    dtype: str
    shape: list[Dim]

    @classmethod
    def of(cls, value: onnx.ValueInfoProto) -> TensorSpec:
        elem_type = value.type.tensor_type.elem_type
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(elem_type)) if elem_type else "unknown"
        return cls(name=value.name, dtype=dtype, shape=dims_of(value))


@dataclass(frozen=True)
class CacheReport:
    """One paged cache tensor (a layer's K or V)."""

    input: str
    output: str
    layer: int
    kind: str
    kv_heads: int
    head_dim: int
    write_op: str
    function: str | None
    original_shape: list[Dim]

    @classmethod
    def of(cls, tensor: CacheTensor) -> CacheReport:
        return cls(
            input=tensor.name,
            output=tensor.output.name,
            layer=tensor.layer,
            kind=tensor.kind,
            kv_heads=tensor.kv_heads,
            head_dim=tensor.head_dim,
            write_op=tensor.write.node.op_type,
            function=tensor.call.op_type if tensor.call is not None else None,
            original_shape=list(tensor.shape),
        )


@dataclass(frozen=True)
class LeftAloneReport:
    """A Ctx op the rewrite left exactly as it was, and why it is not a KV cache op."""

    node: str
    op: str
    function: str | None
    data: str
    reason: str


@dataclass
class RewriteReport:
    """The result of a rewrite: the caches found, the ops rewritten and the new interface."""

    input_path: str
    output_path: str | None
    kv_block_size: int
    num_kv_blocks: int | str
    total_num_kv_blocks: int | str
    null_block: int = 0
    ctx_buckets: list[int] = field(default_factory=list)  # table widths in tokens (buckets.py)
    prefill_lengths: list[int] = field(default_factory=list)  # prefill seq_len values (buckets.py)
    caches: list[CacheReport] = field(default_factory=list)
    rewritten: dict[str, int] = field(default_factory=dict)
    added_inputs: list[str] = field(default_factory=list)
    removed_inputs: list[str] = field(default_factory=list)
    custom_io_dropped: list[str] = field(default_factory=list)  # --custom-io entries of removed inputs
    kept_inputs: dict[str, str] = field(default_factory=dict)  # dropped by a paged op, still read by others
    left_alone: list[LeftAloneReport] = field(default_factory=list)
    other_retained_states: list[str] = field(
        default_factory=list
    )  # X / X_RetainedState pairs that are not KV
    context_dim: str | None = None  # the symbolic length dim of the full-context caches
    bound_dims: dict[str, int] = field(default_factory=dict)  # every symbolic dim given a value
    functions: list[str] = field(default_factory=list)
    paged_op_nodes: dict[str, int] = field(default_factory=dict)  # emitted paged op -> nodes in its flat body
    windows: dict[str, int] = field(default_factory=dict)
    # per block table: its caches, width, pool dim and window (pipeline._kv_groups)
    kv_groups: list[dict[str, Any]] = field(default_factory=list)
    # the caches of block_table written at p % C: {"modulus": C, "ring": exactly p % C}
    wrapping_caches: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # sidecar files written beside the output
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    static_shapes: list[StaticShapeReport] = field(default_factory=list)  # per specialization, --full-check
    warnings: list[str] = field(default_factory=list)  # the output is right, but not what one might assume

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for humans."""
        layers = sorted({c.layer for c in self.caches})
        ops = ", ".join(f"{k} x{v}" for k, v in self.rewritten.items())
        lines = [
            f"paged {len(self.caches)} cache tensors over {len(layers)} layers: {ops}",
            f"kv_block_size={self.kv_block_size} num_kv_blocks={self.num_kv_blocks} "
            f"total_num_kv_blocks={self.total_num_kv_blocks} (block {self.null_block} is the null block)",
            f"added inputs: {', '.join(self.added_inputs)}",
        ]
        lines += [f"warning: {warning}" for warning in self.warnings]
        if self.paged_op_nodes:
            nodes = ", ".join(f"{op} {count}" for op, count in self.paged_op_nodes.items())
            lines.append(f"paged ops emitted (nodes in each flat body): {nodes}")
        if self.ctx_buckets:
            widths = ", ".join(f"{b} ({-(-b // self.kv_block_size)})" for b in self.ctx_buckets)
            lines.append(f"context buckets, tokens (num_kv_blocks): {widths}")
        if self.prefill_lengths:
            lines.append(f"prefill lengths, tokens: {', '.join(map(str, self.prefill_lengths))}")
        if self.functions:
            lines.append(
                f"rewrote inside local functions (one shared body each): {', '.join(self.functions)}"
            )
        windowed = [g for g in self.kv_groups if g["window"] is not None]
        for group in windowed:
            kind, width = f"ring caches (slot p % {group['window']})", f"{group['num_kv_blocks']} columns"
            if group["window_addressing"] == "logical_positions":
                kind, width = "full-length caches read over logical positions", "as wide as block_table"
            lines.append(
                f"{kind}, window {group['window']}, in their own pools "
                f"[{group['pool_dim'] or group['total_num_kv_blocks']}, ...] "
                f"addressed by {group['table']} ({width}): {', '.join(group['caches'])}"
            )
        if self.windows and not windowed:
            lines.append(f"ring-buffer caches paged onto the first table columns: {self.windows}")
        for modulus in sorted({r["modulus"] for r in self.wrapping_caches.values()}):
            wrapping = [cache for cache, r in self.wrapping_caches.items() if r["modulus"] == modulus]
            lines.append(
                f"caches written at p % {modulus} through block_table, wrapping in its first columns "
                f"(a runtime must treat them as a ring; README): {', '.join(wrapping)}"
            )
        if self.removed_inputs:
            lines.append(f"removed inputs (no longer used): {', '.join(self.removed_inputs)}")
        if self.custom_io_dropped:
            lines.append(
                f"custom_io: dropped the entries of removed inputs: {', '.join(self.custom_io_dropped)}"
            )
        for name, readers in self.kept_inputs.items():
            lines.append(f"kept input {name}: still read by {readers}")
        if self.other_retained_states:
            lines.append(
                f"retained states that are not KV (fed back as they are): {', '.join(self.other_retained_states)}"
            )
        if self.left_alone:
            reasons: dict[tuple[str, str], int] = {}
            for op in self.left_alone:
                reasons[(op.op, op.reason)] = reasons.get((op.op, op.reason), 0) + 1
            lines.append(f"left {len(self.left_alone)} Ctx ops as they were (not KV caches):")
            lines += [f"  {op} x{n}: {reason}" for (op, reason), n in sorted(reasons.items())]
        for check in self.static_shapes:
            static = check.values - len(check.already_non_static) - len(check.made_non_static)
            inherited = f"; non-static as in the input: {len(check.already_non_static)}"
            lines.append(
                f"specialization {check.specialization!r}: {static} of {check.values} values static"
                + (inherited if check.already_non_static else "")
                + (f" (open symbols checked at {check.placeholders})" if check.placeholders else "")
            )
        if self.output_path:
            lines.append(f"wrote {self.output_path}" + "".join(f", {path}" for path in self.files.values()))
        return "\n".join(lines)
