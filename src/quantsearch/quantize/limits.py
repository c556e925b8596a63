"""The bit-widths and forms a quantizer may take, importable without torch (settings are checked against them first).

pytorch-quantization's fake quantization is exact from 2 to 16 bits. A form is the grid a quantizer rounds to
(:mod:`quantsearch.quantize.forms`): ``uniform`` (pytorch-quantization's, symmetric or unsigned), ``asymmetric``
(a zero point), ``log2``, ``log2-narrow`` (log2 at 4 bits and below, uniform above: the log grid where it pays),
``log-sqrt2`` and ``log-sqrt2-narrow`` (the same with RepQ-ViT's base sqrt(2): two powers per octave),
``per-head`` (one uniform range per attention head and q/k/v part, for Linear features split into heads), or
``per-channel`` (RepQ-ViT: a LayerNorm output's per-channel ranges folded into it and the Linear layers after it).
"""
__all__ = ["MIN_BITS", "MAX_BITS", "FORMS", "DEFAULT_FORM", "LOG2_NARROW_TOP", "LOG_FORMS", "NARROW_LOG_FORMS",
           "REFINEMENTS", "check_forms", "check_refinement", "log_grid_at", "log_steps", "INTEGER_KINDS",
           "INTEGER_PRESETS", "INTEGER_ADD_BITS", "check_integer_ops"]

MIN_BITS, MAX_BITS = 2, 16
FORMS = ("uniform", "asymmetric", "log2", "log2-narrow", "per-head", "per-channel", "log-sqrt2",
         "log-sqrt2-narrow")
LOG2_NARROW_TOP = 4  # the -narrow log forms: the log grid at this width and below, uniform (unsigned) above
LOG_STEPS = {"log2": 1, "log2-narrow": 1, "log-sqrt2": 2, "log-sqrt2-narrow": 2}  # grid powers per octave
LOG_FORMS = tuple(LOG_STEPS)  # forms with a log grid at some width: non-negative data, unsigned
NARROW_LOG_FORMS = ("log2-narrow", "log-sqrt2-narrow")  # the log grid only up to LOG2_NARROW_TOP bits
DEFAULT_FORM = "uniform"
REFINEMENTS = ("bias-correction", "adaround", "brecq", "brecq-lsq", "qdrop")  # quantize.refine's methods; chain with commas


def check_forms(forms, where: str = "quant-forms") -> dict[str, str]:
    """``{name glob: form}`` as given in settings, checked; the message of a ValueError is one line."""
    if forms is None:
        return {}
    if not isinstance(forms, dict):
        raise ValueError(f"{where} must map quantizer-name globs to forms, got {type(forms).__name__}")
    for glob, form in forms.items():
        if not isinstance(glob, str) or not glob:
            raise ValueError(f"{where}: a key must be a quantizer-name glob, got {glob!r}")
        if form not in FORMS:
            raise ValueError(f"{where}[{glob!r}]: unknown form {form!r}; choose from {', '.join(FORMS)}")
    return dict(forms)


def log_grid_at(form: str, bits: int) -> bool:
    """Whether a quantizer of ``form`` rounds to its log grid at ``bits``."""
    return form in LOG_STEPS and (form not in NARROW_LOG_FORMS or int(bits) <= LOG2_NARROW_TOP)


def log_steps(form: str) -> int:
    """How many powers of a log form's grid share an octave: 1 for base 2, 2 for base sqrt(2)."""
    return LOG_STEPS[form]


def check_refinement(method: str) -> list[str]:
    """The refinement steps of ``method`` (``adaround`` or ``adaround,bias-correction``: run in that order); one
    line naming an unknown step."""
    steps = [m.strip() for m in str(method).split(",")]
    unknown = next((m for m in steps if m not in REFINEMENTS), None)
    if unknown is not None:
        raise ValueError(f"unknown refinement {unknown!r}; choose from {', '.join(REFINEMENTS)} (several: "
                         "comma-separated, run in that order)")
    return steps


# integer operators (quantize/integer): the implementations each kind of nonlinear operator may take
INTEGER_KINDS = {"softmax": ("float", "ivit", "fqvit"), "gelu": ("float", "ivit"),
                 "layernorm": ("float", "ivit", "fqvit"), "add": ("float", "ivit")}
INTEGER_PRESETS = {  # a preset names an implementation per kind
    "float": {kind: "float" for kind in INTEGER_KINDS},
    "integer-only": {kind: "ivit" for kind in INTEGER_KINDS},  # I-ViT: Shiftmax, ShiftGELU, I-LayerNorm, int adds
    "fqvit": {"softmax": "fqvit", "gelu": "ivit", "layernorm": "fqvit", "add": "ivit"},  # FQ-ViT's LIS and PTF
}
INTEGER_ADD_BITS = (8, 16)  # residual adds: the widths they may take (16 by default)


def check_integer_ops(spec, where: str = "integer-ops"):
    """A preset name or ``{operator-name glob: implementation}``, checked; a ValueError's message is one line."""
    if spec is None or isinstance(spec, str):
        if spec is not None and spec not in INTEGER_PRESETS:
            raise ValueError(f"{where}: unknown preset {spec!r}; choose from {', '.join(INTEGER_PRESETS)}, or map "
                             "operator-name globs to implementations")
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a preset name or map operator-name globs to implementations, "
                         f"got {type(spec).__name__}")
    impls = sorted({i for kinds in INTEGER_KINDS.values() for i in kinds})
    for glob, impl in spec.items():
        if not isinstance(glob, str) or not glob:
            raise ValueError(f"{where}: a key must be an operator-name glob, got {glob!r}")
        if impl not in impls:
            raise ValueError(f"{where}[{glob!r}]: unknown implementation {impl!r}; choose from {', '.join(impls)}")
    return dict(spec)
