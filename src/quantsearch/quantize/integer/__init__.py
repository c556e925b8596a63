"""Integer operators for integer-only ViTs (I-ViT, FQ-ViT): softmax, GELU, LayerNorm and residual adds in int64
codes, placed per operator by name glob or preset (:class:`IntegerOps`), calibrated in the quantizers' pass."""
from .operators import IntegerGELU, IntegerLayerNorm, IntegerOperator, IntegerSoftmax, ResidualGrid
from .timm_vit import IntegerOps, IntegerOpsError, find_operators, float_operators

__all__ = ["IntegerOps", "IntegerOpsError", "IntegerOperator", "IntegerSoftmax", "IntegerGELU", "IntegerLayerNorm",
           "ResidualGrid", "find_operators", "float_operators"]
