"""One error hierarchy for everything QuBLAST refuses to do.

The CLI turns any ``QublastError`` into one line on stderr and exit code 2.
"""


class QublastError(Exception):
    """Base class: bad input or a request the tool cannot honour."""


class UnsupportedModelError(QublastError):
    """The model's architecture has no registry entry."""


class BudgetError(QublastError):
    """The size or perplexity budget cannot be met by any allocation."""


class RecipeError(QublastError):
    """A recipe file is missing, corrupt, of an unknown version or for another model."""


class InputError(QublastError):
    """A file, text or argument given by the user is unusable."""


class GraphError(QublastError):
    """An ONNX graph does not have the structure a pass or a target requires."""
