"""The types every pass shares: where a node lives, one KV cache tensor, what the finder found
(cache sites to rewrite, and the Ctx ops it left alone, with why)."""

from __future__ import annotations

import re
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
