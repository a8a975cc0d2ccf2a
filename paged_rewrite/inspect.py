"""``inspect``: the cache sites of a model and the rewrite a given block size would make,
computed on an in-memory copy; nothing is written."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from paged_rewrite.api import rewrite
from paged_rewrite.errors import PagedRewriteError
from paged_rewrite.model_io import load_model
from paged_rewrite.passes.find_cache_sites import find_cache_sites
from paged_rewrite.pipeline import run_pass
from paged_rewrite.report import RewriteReport

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from paged_rewrite.api import PlanFlags


@dataclass(frozen=True)
class CacheSiteInfo:
    """One cache tensor as found: layer, ops, enclosing function, names and dims."""

    layer: int
    kind: str
    input: str
    output: str
    write_op: str
    read_ops: list[str]
    function: str | None
    shape: list[int | str | None]


@dataclass
class Inspection:
    model: str
    sites: list[CacheSiteInfo]
    plan: RewriteReport | None
    plan_error: str | None = None  # why no rewrite can be planned with these flags
    plan_error_kind: str | None = None  # its kind and exit code: what a rewrite would exit with
    plan_exit_code: int = 0

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan.to_dict() if self.plan is not None else None
        return {
            "model": self.model,
            "sites": [asdict(s) for s in self.sites],
            "plan": plan,
            "plan_error": self.plan_error,
            "plan_error_kind": self.plan_error_kind,
            "exit_code": self.plan_exit_code,
        }

    def summary(self) -> str:
        lines = [f"{self.model}: {len(self.sites)} cache tensors"]
        for s in self.sites:
            where = f" in function {s.function}" if s.function else ""
            reads = ", ".join(sorted(set(s.read_ops))) or "-"
            lines.append(f"  layer {s.layer} {s.kind:5s} {s.input} {s.shape}: {s.write_op} / {reads}{where}")
        if self.plan is None:
            lines.append(f"no rewrite with these flags: {self.plan_error}")
        else:
            lines.append("a rewrite would do:")
            lines += ["  " + line for line in self.plan.summary().splitlines()]
        return "\n".join(lines)


def inspect_model(path: str | os.PathLike[str], kv_block_size: int, **plan: Unpack[PlanFlags]) -> Inspection:
    """Find the cache sites of ``path`` and plan a rewrite with the flags ``plan`` (those of
    ``rewrite``: ``ctx_len``, ``dims``, ...) as a dry run. A model whose sites cannot be
    listed raises (naming the file); a plan that fails is reported with the error a rewrite with
    the same flags would raise (``plan_error``, ``plan_error_kind``, ``plan_exit_code``)."""
    try:
        sites = run_pass(find_cache_sites, load_model(path))
    except PagedRewriteError as error:
        raise _naming(path, error) from None
    infos = []
    for tensor in sites.tensors:
        body = tensor.write.body
        outputs = {tensor.write.node.output[0]}
        reads = [s.node.op_type for s in sites.reads if s.body is body and s.node.input[0] in outputs]
        infos.append(
            CacheSiteInfo(
                layer=tensor.layer,
                kind=tensor.kind,
                input=tensor.name,
                output=tensor.output.name,
                write_op=tensor.write.node.op_type,
                read_ops=reads,
                function=body.name if body.is_function else None,
                shape=list(tensor.shape),
            )
        )
    try:
        return Inspection(str(path), infos, rewrite(path, None, kv_block_size, **plan))
    except PagedRewriteError as error:  # e.g. a ring buffer whose length was not given
        named = _naming(path, error)
        return Inspection(str(path), infos, None, str(named), named.kind, named.exit_code)


def _naming(path: str | os.PathLike[str], error: PagedRewriteError) -> PagedRewriteError:
    """``error`` with its message starting with the file, as a rewrite's errors do."""
    if str(error).startswith(str(path)):
        return error
    return type(error)(f"{path}: {error}")
