"""Moved to :mod:`sgdph_tools.curvature.gauss_newton`; this module keeps the old import path working."""

from .curvature.gauss_newton import GGNVectorProduct, SubBatchGNB, gauss_newton_bartlett, ggn_vector_product

__all__ = ["GGNVectorProduct", "SubBatchGNB", "gauss_newton_bartlett", "ggn_vector_product"]
