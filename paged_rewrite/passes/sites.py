"""The types every pass shares: where a node lives, one KV cache tensor, what the finder found
(cache sites to rewrite, and the Ctx ops it left alone, with why), the paged layout the later
passes build on (``add_paged_inputs`` fixes it), and what a pass returns."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import onnx

from paged_rewrite.graph import Body, dims_of

Dim = int | str | None


def where(node: onnx.NodeProto) -> str:
    """How errors name a node: its name and ``domain::op``; a nameless node (names are optional
    in ONNX) by its first output, which is unique."""
    op = f"{node.domain or 'ai.onnx'}::{node.op_type}"
    if node.name:
        return f"node {node.name!r} ({op})"
    return f"the {op} node computing {node.output[0]!r}" if node.output else f"a nameless {op} node"


@dataclass
class Site:
    """A node to rewrite, the body (graph or function) it lives in, and the cache it touches (the
    first one found, for a node of a function body that serves several layers)."""

    node: onnx.NodeProto
    body: Body
    cache: CacheTensor | None = field(default=None, repr=False, compare=False)


@dataclass
class CacheTensor:
    """One layer's K or V cache as the model's interface shows it."""

    input: onnx.ValueInfoProto
    output: onnx.ValueInfoProto
    write: Site
    call: onnx.NodeProto | None = None  # the call passing the cache into a local function, if any

    @property
    def name(self) -> str:
        return self.input.name

    @cached_property
    def shape(self) -> tuple[Dim, ...]:
        """The original shape (captured before the rewrite reshapes the input)."""
        return tuple(dims_of(self.input))

    @property
    def kv_heads(self) -> int:
        return int(self.shape[1])  # type: ignore[arg-type]

    @property
    def head_dim(self) -> int:
        return int(self.shape[3])  # type: ignore[arg-type]

    @property
    def length_dim(self) -> Dim:
        return self.shape[2]

    @property
    def layer(self) -> int:
        """The layer number: the last number in the name (``past_key.3``, ``past_key.3_llm``)."""
        numbers = re.findall(r"\d+", self.name)
        return int(numbers[-1]) if numbers else -1

    @property
    def kind(self) -> str:
        return "value" if "value" in self.name else "key"

    @property
    def pool_signature(self) -> tuple[int, int]:
        """The pool's heads and head_dim; ``PagedLayout.pool_signature`` adds the table group,
        whose pools share their number of blocks."""
        return (self.kv_heads, self.head_dim)


@dataclass(frozen=True)
class LeftAlone:
    """A Ctx op the rewrite did not touch, and why it is not a KV cache op."""

    node: str
    op: str
    function: str | None  # the local function it sits in, if any
    data: str  # its data operand (in the main graph's names where it could be resolved)
    reason: str


@dataclass
class CacheSites:
    """Every cache of the model in layer order, and every node to rewrite (each once, even when
    a shared function body serves several layers)."""

    model: onnx.ModelProto
    main: Body
    tensors: list[CacheTensor] = field(default_factory=list)
    writes: list[Site] = field(default_factory=list)
    reads: list[Site] = field(default_factory=list)
    shape_reads: list[tuple[Site, Dim]] = field(default_factory=list)  # Shape node, cache length dim
    functions: list[Body] = field(default_factory=list)  # local functions holding KV sites
    left_alone: list[LeftAlone] = field(default_factory=list)
    row_dim: Dim = None  # batch dim of the token rows (block_table rows); see find_cache_sites

    @property
    def batch_dim(self) -> Dim:
        return self.tensors[0].shape[0]

    @property
    def length_dims(self) -> list[Dim]:
        return list(dict.fromkeys(t.length_dim for t in self.tensors))

    @property
    def bodies(self) -> list[Body]:
        return [self.main, *self.functions]


BLOCK_TABLE = "block_table"
SLOT_ID = "slot_id"


@dataclass(frozen=True)
class WriteModulus:
    """What a cache's write positions are taken modulo: ``modulus`` (loose: any ``Mod`` by a
    constant a few producers up), and ``ring``, the ``C`` when the positions are exactly ring
    slots ``p % C`` with padding kept (the strict structure of ``ring_writes.py``), else None."""

    modulus: int | None
    ring: int | None

    @property
    def wraps_at(self) -> int | None:
        """The length the writes wrap at: the ring's where exact, else the loose modulus."""
        return self.ring or self.modulus


@dataclass(frozen=True)
class TableGroup:
    """The caches addressed through one block table: its name, its width (static columns, or the
    symbolic ``num_kv_blocks``), the dim their pools share, and their ring length (None: full
    context)."""

    table: str
    columns: int | str
    pool_dim: int | str
    window: int | None = None
    # a window over logical positions [p0 - W, p0 + S) of a full-length cache, not a ring: the
    # table spans the context and a runtime frees the blocks behind the window
    logical: bool = False

    @property
    def addressing(self) -> str | None:
        """How its caches are addressed: ``ring``, ``logical_positions``, or None (full context)."""
        if self.window is None:
            return None
        return "logical_positions" if self.logical else "ring"


@dataclass
class PagedLayout:
    """The paged cache layout every later pass builds on."""

    kv_block_size: int
    num_kv_blocks: int | str
    total_num_kv_blocks: int | str
    batch_dim: Dim
    context_dim: Dim  # the length dim of full-context caches: they span the whole table
    windows: dict[Dim, int]  # length dim (a name, or a static size) -> ring length
    bound_dims: dict[str, int]  # every symbolic dim of the input the user gave a value
    ctx_buckets: tuple[int, ...] = ()  # table widths in tokens, ascending (see buckets.py)
    # The same two names address the cache in the main graph and in every function body.
    block_table: str = BLOCK_TABLE
    slot_id: str = SLOT_ID
    # length dim -> its table group; a dim absent here (the context dim) uses the full group
    window_groups: dict[Dim, TableGroup] = field(default_factory=dict)
    # cache name -> its group, for groups found per cache rather than per length dim: full-length
    # caches read as a logical-position window, or written as a ring (``ring_writes.py``)
    cache_groups: dict[str, TableGroup] = field(default_factory=dict)
    shared_window_table: bool = False
    # every cache's write modulus (ring_writes.py), found once for every pass that needs it, and
    # those of the caches of block_table whose writes wrap
    write_moduli: dict[str, WriteModulus] = field(default_factory=dict)
    wrapping_caches: dict[str, WriteModulus] = field(default_factory=dict)
    _names: Iterator[int] = field(default_factory=itertools.count)

    def fresh_name(self, what: str) -> str:
        """A new value name no exporter uses (node names are optional and need not be unique)."""
        return f"paged_rewrite.{what}.{next(self._names)}"

    @property
    def full_group(self) -> TableGroup:
        return TableGroup(self.block_table, self.num_kv_blocks, self.total_num_kv_blocks)

    def group_of(self, tensor: CacheTensor) -> TableGroup:
        """The table group of ``tensor``: its own (``cache_groups``), its ring, or the full one."""
        found = self.cache_groups.get(tensor.name)
        return found if found is not None else self.window_groups.get(tensor.length_dim, self.full_group)

    def pool_signature(self, tensor: CacheTensor) -> tuple[int, int, str]:
        """What a paged address depends on besides its operands: the pool's heads and head_dim,
        and its group's table (pools of different groups differ in their number of blocks, which
        bounds the table entries an index op accepts)."""
        return (*tensor.pool_signature, self.group_of(tensor).table)

    @property
    def groups(self) -> list[TableGroup]:
        """Every table group, the full one first, then the windows in ascending order."""
        windows = {*self.window_groups.values(), *self.cache_groups.values()}
        return [self.full_group, *sorted(windows, key=lambda g: (g.window or 0, g.logical))]

    @property
    def tables(self) -> list[str]:
        return [group.table for group in self.groups]

    @property
    def logical_length(self) -> int | None:
        """``num_kv_blocks * kv_block_size`` when static: the context full layers see."""
        return self.num_kv_blocks * self.kv_block_size if isinstance(self.num_kv_blocks, int) else None


@dataclass
class PassResult:
    """What a pass changed: how many nodes it rewrote, and the values the rewritten nodes stopped
    reading (``batch_index``, positions now read by a shared index op, a layer's moved values).
    The pipeline hands their union to ``finalize_model``, which removes what nothing reads any
    more, and nothing else."""

    changed: int = 0
    dropped: set[str] = field(default_factory=set)
