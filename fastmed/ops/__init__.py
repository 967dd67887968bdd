"""torch.library ops (``torch.ops.fastmed.*``), one module per kernel family; importing fastmed
registers them all."""
from . import dice_ce  # noqa: F401
from . import norm_act  # noqa: F401
from . import conv_norm_act  # noqa: F401
from . import upconv  # noqa: F401
from . import resample  # noqa: F401
from . import sliding_window  # noqa: F401
