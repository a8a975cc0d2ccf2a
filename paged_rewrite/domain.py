"""QEfficient's custom-op domain. Its cache ops (``CtxScatter``, ``CtxGather``...) are model-local
functions there, and the paged ops that replace them are emitted into the same domain: the QAIC
compiler looks for model-local functions of the ops a graph calls, whatever their domain, and
keeping QEfficient's lets a QEfficient toolchain treat the paged model like its own exports."""

QEFF_DOMAIN = "com.qualcomm.cloud"
