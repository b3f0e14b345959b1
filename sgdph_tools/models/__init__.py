"""Model definitions registered with timm (importing this package registers them)."""
from . import small  # noqa: F401  (registers small_cnn)
