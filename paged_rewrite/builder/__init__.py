"""Builders of synthetic models for tests (no torch, numpy + onnx only)."""

from paged_rewrite.builder.qeff_export import (
    INT32_MAX_SENTINEL,
    QAIC_DOMAIN,
    QTI_DOMAIN,
    ExportSpec,
    build_qeff_export,
    write_qeff_export,
)

__all__ = [
    "INT32_MAX_SENTINEL",
    "QAIC_DOMAIN",
    "QTI_DOMAIN",
    "ExportSpec",
    "build_qeff_export",
    "write_qeff_export",
]
