"""cpjax: Curvature Propagation in JAX.

Unbiased estimates of the Hessian diagonal (and more) from one fused backward sweep, after
Martens, Sutskever and Swersky, "Estimating the Hessian by Back-propagating Curvature"
(ICML 2012).
"""

from cpjax import optax, score_matching
from cpjax._api import (
    becker_lecun_hessian_diag,
    cp_hessian_diag,
    cp_value_grad_and_hessian_diag,
)
from cpjax._errors import CurvatureError
from cpjax._full import cp_hessian, cp_hessian_factors, cp_hessian_trace
from cpjax.baselines import exact_hessian_diag, hutchinson_hessian_diag
from cpjax.ggn import cp_ggn_diag, cp_value_grad_and_ggn_diag, exact_ggn_diag
from cpjax.rules import FallbackWarning
from cpjax.rules.custom import CustomRuleWarning

__all__ = [
    "CurvatureError",
    "CustomRuleWarning",
    "becker_lecun_hessian_diag",
    "FallbackWarning",
    "cp_ggn_diag",
    "cp_value_grad_and_ggn_diag",
    "cp_hessian",
    "cp_hessian_diag",
    "cp_hessian_factors",
    "cp_hessian_trace",
    "cp_value_grad_and_hessian_diag",
    "exact_ggn_diag",
    "exact_hessian_diag",
    "hutchinson_hessian_diag",
    "optax",
    "score_matching",
]

__version__ = "0.1.0"
