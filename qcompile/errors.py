"""Every error qcompile raises on purpose is a ``QCompileError``.

Messages name the node, parameter or key at fault and say what to do about it, so that a user
never has to read a traceback to learn why a model was refused.
"""


class QCompileError(Exception):
    """Base class of qcompile's deliberate errors."""


class ModelNotFoundError(QCompileError):
    """A model spec that names nothing loadable (with the command that would install it)."""


class CaptureError(QCompileError):
    """``torch.export`` could not capture the model; the message names the failing construct."""


class MatchError(QCompileError):
    """The graph's structure does not match a supported transformer pattern."""


class UnsafeRewriteError(QCompileError):
    """A rewrite would not be exact at a node; the message names the node and the reason."""


class RecipeError(QCompileError):
    """A recipe key, value or combination is invalid."""


class CalibrationError(QCompileError):
    """Calibration saw NaN/inf activations or a singular Hessian; the message names the layer."""


class ShapeError(QCompileError):
    """A kernel or format constraint on a shape is not met; the message names the constraint."""


class ArtifactError(QCompileError):
    """A saved model directory is missing, tampered with, truncated or of another version."""


class ExportError(QCompileError):
    """A model cannot be exported to (or an exported folder cannot be read back from) ONNX."""
