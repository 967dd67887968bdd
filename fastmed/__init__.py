"""fastmed: fast, MONAI-compatible ops for 3D medical image segmentation and classification."""
from __future__ import annotations

__version__ = "0.1.0"

from ._ext import build_info  # noqa: E402
from . import ops  # noqa: E402,F401  (registers the torch.library ops)
from . import losses  # noqa: E402,F401



def optimize(model, inplace: bool = False, verbose: bool = False, channels_last=None, onednn: bool = True,
             upconv: bool = True):
    """Fuse the supported norm -> activation patterns of an existing model, send its batch-1
    float32 CPU convolutions to oneDNN and its decoders' upsampling to fastmed's kernel, written
    into the skip concatenation (see fastmed.nn.optimize)."""
    from .nn import optimize as _optimize

    return _optimize(model, inplace=inplace, verbose=verbose, channels_last=channels_last, onednn=onednn,
                      upconv=upconv)


__all__ = ["build_info", "losses", "ops", "optimize", "__version__"]
