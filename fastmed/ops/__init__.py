"""torch.library ops (``torch.ops.fastmed.*``), one module per kernel family."""
from . import dice_ce  # noqa: F401
