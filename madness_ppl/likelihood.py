r"""The Gaussian pixel likelihood of MADNESS and its weights, in one place.

A field :math:`y` (``(B, H, W)``, electrons) is modelled by an image :math:`m` under
independent Gaussian noise,

.. math::

    \log p(y \mid m) = \sum_{bp} M_{bp} \Big[
        -\frac{(y_{bp} - m_{bp})^2}{2 V_{bp}} - \tfrac12 \log(2 \pi V_{bp}) \Big],
    \qquad
    V_{bp} = \sigma^2_{bp} + (\epsilon_b\, m_{bp})^2,
    \qquad
    \sigma^2_{bp} = \sigma^2_{\mathrm{sky},b} + \max(y_{bp}, 0),

with :math:`M` the pixel mask (1 = use the pixel), :math:`\sigma^2` the pixel variance
(:func:`pixel_variance`: sky plus source Poisson term) and :math:`\epsilon` an optional
model-error fraction (:func:`model_error_fraction`) standing for what the decoder cannot draw
(:func:`total_variance`). Everything that weighs pixels by this likelihood uses the same
Gauss-Newton weights and :math:`\chi^2`,

.. math::

    W_{bp} = \frac{M_{bp}}{V_{bp}} \quad (:func:`inverse_variance`), \qquad
    \chi^2_{bp} = W_{bp}\,(y_{bp} - m_{bp})^2 \quad (:func:`chi2_map`),

with :math:`W = 0` exactly where a pixel is masked or its variance is not finite and positive.
The NumPyro observe site is :func:`gaussian_likelihood` (:func:`student_t_likelihood`: the
same with Student-t noise, robust to unmasked outliers); :func:`normal_chi2` is the
:math:`\chi^2` of any observed Normal or Student-t site (used by
:func:`madness_ppl.infer.fit_map`).

JAX and NumPyro are imported on first use only, so the simulator (which needs
:func:`pixel_variance` alone) does not load them.

Why one module of ~500 lines: the likelihood, its weights and its chi2 once lived in five
places; they stay together here so that a change of the noise model is a change of this file.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from madness_ppl.errors import MadnessInputError

if TYPE_CHECKING:
    import jax
    from jax.typing import ArrayLike
else:
    ArrayLike = Any

__all__ = [
    "chi2_map",
    "gaussian_likelihood",
    "inverse_variance",
    "model_error_fraction",
    "normal_chi2",
    "pixel_variance",
    "student_t_likelihood",
    "total_variance",
]


def pixel_variance(
    signal: Any,
    sky_variance: Any,
    *,
    unit: Any = None,
    dtype: Any = None,
    xp: Any = np,
) -> Any:
    r"""Sky plus source Poisson variance, :math:`\sigma^2_\mathrm{sky} + \max(y, 0)`.

    The simulator draws its noise with it, the training loss and validation weight residuals by
    it, and the scene and the pipeline fit with it (in electrons², for an image in electrons
    with gain 1).

    Parameters
    ----------
    signal
        :math:`y`, ``(..., B, H, W)``: electrons, or ``unit`` electrons per count.
    sky_variance
        :math:`\sigma^2_\mathrm{sky}` in electrons²: a scalar, per band ``(B,)`` (broadcast
        over the pixels) or a full map.
    unit
        Electrons per unit of ``signal`` (:math:`\nu`, e.g. the networks' normalisation):
        the variance of :math:`y` in those units is
        :math:`\sigma^2_\mathrm{sky} / \nu^2 + \max(y, 0) / \nu`.
    dtype
        Data type of the sky term (default: that of ``sky_variance``).
    xp
        Array module: ``numpy`` (default) or ``jax.numpy`` (inside traced code).

    Returns
    -------
    array
        The variance, broadcast to ``signal``'s shape.

    Examples
    --------
    >>> import numpy as np
    >>> pixel_variance(np.array([[[-3.0, 0.0, 5.0]]]), [2.0]).tolist()
    [[[2.0, 2.0, 7.0]]]
    """
    sky = xp.asarray(sky_variance, dtype)
    if sky.ndim == 1:
        sky = sky[:, None, None]
    if unit is None:
        return sky + xp.maximum(signal, 0.0)
    return sky / unit**2 + xp.maximum(signal, 0.0) / unit


def _is_tracer(x: Any) -> bool:
    """Whether ``x`` is a JAX tracer (never, when JAX is not loaded)."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.core.Tracer)


def _is_zero(model_error: Any) -> bool:
    """The Python number 0: no model error at all (the plain likelihood, traced unchanged)."""
    return isinstance(model_error, int | float) and model_error == 0


def model_error_fraction(model_error: ArrayLike, n_bands: int, *, dtype: Any = None) -> Any:
    r"""Check a model-error fraction :math:`\epsilon` and shape it to broadcast over a field.

    :math:`\epsilon` is a scalar (all bands) or one value per band, each finite and
    :math:`\ge 0`; the model image's variance becomes :math:`\sigma^2_{bp} + (\epsilon_b
    m_{bp})^2` (:func:`total_variance`).

    Parameters
    ----------
    model_error
        A scalar, ``(B,)`` or ``(B, 1, 1)``. A JAX tracer (inside ``jit``/``vmap``) is not
        checked, only reshaped.
    n_bands
        :math:`B`, the number of bands of the field.
    dtype
        Data type of the result (default: float64 for a concrete value, the tracer's own).

    Returns
    -------
    array
        Shape ``()`` or ``(B, 1, 1)``, broadcastable to ``(B, H, W)``: a numpy array, or a JAX
        array for a tracer.

    Raises
    ------
    madness_ppl.errors.MadnessInputError
        A wrong shape, or a negative or non-finite value.

    Examples
    --------
    >>> model_error_fraction([0.1, 0.2], 2).shape
    (2, 1, 1)
    >>> model_error_fraction(-0.1, 2)
    Traceback (most recent call last):
    ...
    madness_ppl.errors.MadnessInputError: model_error must be finite and >= 0, got -0.1
    """
    if _is_tracer(model_error):
        import jax.numpy as jnp

        eps = jnp.asarray(model_error, dtype)
    else:
        eps = np.asarray(model_error, float if dtype is None else dtype)
        if eps.ndim == 3 and eps.shape[1:] == (1, 1):
            eps = eps.reshape(-1)
        if eps.ndim > 1 or (eps.ndim == 1 and len(eps) != n_bands):
            raise MadnessInputError(
                f"model_error must be a scalar or one value per band ({n_bands}), got shape "
                f"{eps.shape}",
                value=eps,
            )
        if not np.all(np.isfinite(eps) & (eps >= 0)):
            raise MadnessInputError(f"model_error must be finite and >= 0, got {eps}", value=eps)
    return eps.reshape(-1, 1, 1) if eps.ndim == 1 else eps


def total_variance(
    variance: ArrayLike, model: ArrayLike, model_error: ArrayLike, *, xp: Any = None
) -> Any:
    r"""The likelihood's variance with the model error, :math:`V = \sigma^2 + (\epsilon m)^2`.

    Parameters
    ----------
    variance
        :math:`\sigma^2`, ``(B, H, W)`` or broadcastable, electrons².
    model
        :math:`m`, ``(B, H, W)``, electrons.
    model_error
        :math:`\epsilon`: a scalar or one per band (:func:`model_error_fraction`, which checks
        it). The Python number ``0`` returns ``variance`` itself, unchanged (so the plain
        likelihood traces exactly as without a model error).
    xp
        Array module: ``jax.numpy`` (default) or ``numpy``.

    Returns
    -------
    array
        :math:`V`, ``(B, H, W)``.

    Examples
    --------
    >>> import numpy as np
    >>> total_variance(np.ones((2, 1, 2)), np.full((2, 1, 2), 10.0), [0.1, 0.0], xp=np).tolist()
    [[[2.0, 2.0]], [[1.0, 1.0]]]
    """
    if _is_zero(model_error):
        return variance
    if xp is None:
        import jax.numpy as xp
    model = xp.asarray(model)
    n_bands = model.shape[-3] if model.ndim >= 3 else 1
    eps = xp.asarray(model_error_fraction(model_error, n_bands), model.dtype)
    return xp.asarray(variance) + (eps * model) ** 2


def inverse_variance(
    variance: ArrayLike,
    pixel_mask: ArrayLike | None = None,
    *,
    model: ArrayLike | None = None,
    model_error: ArrayLike = 0.0,
    xp: Any = np,
) -> Any:
    r"""The Gauss-Newton pixel weights :math:`W = M / (\sigma^2 + (\epsilon m)^2)`.

    .. math::

        W_{bp} = \begin{cases}
            1 / \big(\sigma^2_{bp} + (\epsilon_b m_{bp})^2\big)
                & M_{bp} = 1,\ \sigma^2_{bp} \text{ finite and } > 0, \\
            0 & \text{otherwise,}
        \end{cases}

    exactly 0 (no NaN, no division warning) where a pixel is masked or its variance is not
    finite and positive. :math:`J^\top W J` is the curvature of the data term of
    :func:`gaussian_likelihood` (the Laplace precision of
    :func:`~madness_ppl.uncertainty.laplace_flux_errors`, the preconditioner of
    :func:`~madness_ppl.initialise.latent_scales`).

    Parameters
    ----------
    variance
        :math:`\sigma^2`, ``(B, H, W)``, electrons².
    pixel_mask
        Optional booleans :math:`M`, ``(B, H, W)`` or ``(H, W)``, ``True`` = use.
    model
        :math:`m`, ``(B, H, W)``: needed only with a model error.
    model_error
        :math:`\epsilon`, a scalar or one per band (:func:`model_error_fraction`).
    xp
        Array module: ``numpy`` (default) or ``jax.numpy``.

    Returns
    -------
    array
        :math:`W`, the broadcast shape of ``variance``, ``pixel_mask`` and ``model``, in the
        variance's floating type.

    Examples
    --------
    >>> import numpy as np
    >>> inverse_variance(np.array([[[4.0, 0.0, np.nan, 2.0]]]), [[True, True, True, False]])
    array([[[0.25, 0.  , 0.  , 0.  ]]])
    """
    variance = xp.asarray(variance)
    if model is None:
        if not _is_zero(model_error):
            raise ValueError("inverse_variance needs the model image to apply a model_error")
        total = variance
    else:
        total = total_variance(variance, model, model_error, xp=xp)
    ok = xp.isfinite(variance) & (variance > 0)
    if pixel_mask is not None:
        ok = ok & xp.asarray(pixel_mask, bool)
    return xp.where(ok, 1.0 / xp.where(ok, total, 1.0), 0.0)


def chi2_map(
    field: ArrayLike,
    model: ArrayLike,
    variance: ArrayLike,
    pixel_mask: ArrayLike | None = None,
    *,
    model_error: ArrayLike = 0.0,
) -> np.ndarray:
    r"""Per-pixel :math:`\chi^2 = W\,(y - m)^2`, the weights :math:`W` of
    :func:`inverse_variance`.

    .. math::

        \chi^2_{bp} = \frac{(y_{bp} - m_{bp})^2}{\sigma^2_{bp} + (\epsilon_b m_{bp})^2}

    where the pixel is used, its data finite and its variance finite and positive; 0 elsewhere
    (numpy, host side).

    Parameters
    ----------
    field
        :math:`y`, ``(B, H, W)``, electrons; NaN/inf pixels count as masked.
    model
        :math:`m`, ``(B, H, W)`` or broadcastable, electrons.
    variance
        :math:`\sigma^2`, ``(B, H, W)``, electrons².
    pixel_mask
        Optional booleans :math:`M`, ``(B, H, W)`` or ``(H, W)``, ``True`` = use.
    model_error
        :math:`\epsilon`, a scalar or one per band (default 0: pixel noise only).

    Returns
    -------
    numpy.ndarray
        ``(B, H, W)``.

    Examples
    --------
    >>> import numpy as np
    >>> chi2_map(np.array([[[3.0, np.nan, 1.0]]]), 1.0, np.array([[[2.0, 1.0, 0.0]]])).tolist()
    [[[2.0, 0.0, 0.0]]]
    """
    field = np.asarray(field)
    variance = np.asarray(variance)
    ok = np.isfinite(field) & np.isfinite(variance) & (variance > 0)
    if pixel_mask is not None:
        ok = ok & np.asarray(pixel_mask, bool)
    total = total_variance(variance, model, model_error, xp=np)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf off ``ok`` only
        residual = np.where(ok, field - model, 0.0)
    return np.where(ok, residual**2 / np.where(ok, total, 1.0), 0.0)


def normal_chi2(value: ArrayLike, loc: ArrayLike, scale: ArrayLike, mask: ArrayLike) -> jax.Array:
    r"""The :math:`\chi^2` of an observed Normal site over its unmasked elements.

    .. math::

        \chi^2 = \sum_k M_k \Big(\frac{x_k - \mu_k}{s_k}\Big)^2

    Parameters
    ----------
    value
        :math:`x`, the observed values.
    loc, scale
        :math:`\mu` and :math:`s` of the Normal (broadcast to ``value``).
    mask
        :math:`M`, booleans broadcast to ``value`` (``True`` = counted).

    Returns
    -------
    jax.Array
        The scalar :math:`\chi^2`.

    Examples
    --------
    >>> float(normal_chi2([1.0, 5.0, 9.0], 1.0, 2.0, [True, True, False]))
    4.0
    """
    import jax.numpy as jnp

    r = (jnp.asarray(value) - loc) / scale
    return jnp.sum(jnp.where(jnp.asarray(mask), r * r, 0.0))


def gaussian_likelihood(
    name: str,
    model_image: ArrayLike,
    field: ArrayLike,
    variance: ArrayLike,
    *,
    pixel_mask: ArrayLike | None = None,
    model_error: ArrayLike = 0.0,
) -> jax.Array:
    r"""Observe ``field`` under independent Gaussian noise around ``model_image``.

    .. math::

        \log p(y \mid m) = \sum_{b,h,w} M_{bhw} \left[
            -\frac{(y_{bhw} - m_{bhw})^2}{2 V_{bhw}}
            - \tfrac12 \log(2 \pi V_{bhw}) \right],
        \qquad V = \sigma^2 + (\epsilon\, m)^2,

    with :math:`M` the pixel mask (1 = use the pixel) and :math:`\epsilon` the model-error
    fraction (:func:`total_variance`). Masked pixels contribute nothing; their data and
    variance are replaced by harmless values *before* the distribution is built, so NaN/inf
    or zero variance there cannot poison values or gradients.

    Parameters
    ----------
    name
        Observed site name.
    model_image
        Model ``(B, H, W)``, electrons.
    field
        Data ``(B, H, W)``, electrons, or ``None`` to draw the site from the likelihood
        (NumPyro's ``obs=None``; e.g. under ``Predictive``). Masked pixels of a drawn field
        are 0 (to ~1e-19: they carry no data).
    variance
        Per-pixel variance ``(B, H, W)`` (or broadcastable), electrons².
    pixel_mask
        Optional booleans, ``(B, H, W)`` or ``(H, W)`` (same for all bands), ``True`` = use.
    model_error
        :math:`\epsilon`, a scalar or one per band (:func:`model_error_fraction`, checked
        unless it is a tracer). The Python number ``0`` (default) is the plain likelihood.

    Returns
    -------
    jax.Array
        The observed value (``field`` with masked pixels set to 0).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from numpyro import handlers
    >>> site = handlers.trace(
    ...     lambda: gaussian_likelihood("obs", jnp.zeros((1, 1, 2)), jnp.ones((1, 1, 2)), 1.0)
    ... ).get_trace()["obs"]
    >>> round(float(site["fn"].log_prob(site["value"])), 4)  # 2 (-1/2 - log(2 pi)/2)
    -2.8379
    """
    import numpyro.distributions as dist

    return _observe(name, dist.Normal, model_image, field, variance, pixel_mask, model_error)


def student_t_likelihood(
    name: str,
    model_image: ArrayLike,
    field: ArrayLike,
    variance: ArrayLike,
    *,
    df: float = 5.0,
    pixel_mask: ArrayLike | None = None,
    model_error: ArrayLike = 0.0,
) -> jax.Array:
    r"""Observe ``field`` under independent Student-t noise around ``model_image``: a robust
    likelihood for data with outliers the mask missed (cosmic rays, hot pixels, satellite
    trails), whose pull on the fit it bounds.

    .. math::

        \log p(y \mid m) = \sum_{b,h,w} M_{bhw}\, \log t_\nu\!\Big(\frac{y_{bhw} - m_{bhw}}
        {\sqrt{V_{bhw}}}\Big) - \tfrac12 \log V_{bhw},
        \qquad V = \sigma^2 + (\epsilon\, m)^2,

    :math:`t_\nu` the standard Student-t density with :math:`\nu` = ``df`` degrees of
    freedom. The scale is the Gaussian's standard deviation, so well-fitted pixels weigh as
    under :func:`gaussian_likelihood` (the two agree as :math:`\nu \to \infty`), while a
    residual of :math:`k\sigma` pulls with a force that falls as :math:`1/k` beyond
    :math:`\sqrt{\nu}\sigma` instead of growing as :math:`k`. Masking, ``field=None``
    (drawing), ``model_error`` and the returned value are as in :func:`gaussian_likelihood`;
    :func:`madness_ppl.infer.fit_map`'s ``chi2`` counts the site's standardised residuals
    :math:`(y - m)^2 / V`.

    Parameters
    ----------
    name, model_image, field, variance, pixel_mask, model_error
        As in :func:`gaussian_likelihood`.
    df
        :math:`\nu > 0`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from numpyro import handlers
    >>> model = lambda: student_t_likelihood("obs", jnp.zeros((1, 1, 1)), jnp.ones((1, 1, 1)), 1.0)
    >>> site = handlers.trace(model).get_trace()["obs"]
    >>> round(float(site["fn"].log_prob(site["value"])), 4)  # scipy.stats.t(5).logpdf(1)
    -1.5156
    """
    import functools

    import numpyro.distributions as dist

    if not (np.isfinite(df) and df > 0):
        raise MadnessInputError(f"df must be finite and > 0, got {df}", df)
    make = functools.partial(dist.StudentT, float(df))
    return _observe(name, make, model_image, field, variance, pixel_mask, model_error)


def _observe(name, make, model_image, field, variance, pixel_mask, model_error) -> jax.Array:
    """The observe site of a location-scale noise ``make(loc, scale)`` (see
    :func:`gaussian_likelihood` for the masking)."""
    import jax.numpy as jnp
    import numpyro

    field = None if field is None else jnp.asarray(field)
    model_image = jnp.asarray(model_image)
    variance = total_variance(jnp.asarray(variance), model_image, model_error, xp=jnp)
    shapes = (model_image.shape, variance.shape) + (() if field is None else (field.shape,))
    shape = jnp.broadcast_shapes(*shapes)
    ndim = len(shape)
    if pixel_mask is None:
        fn = make(jnp.broadcast_to(model_image, shape), jnp.sqrt(variance)).to_event(ndim)
        return numpyro.sample(name, fn, obs=field)
    mask = jnp.broadcast_to(jnp.asarray(pixel_mask, bool), shape)
    obs = None if field is None else jnp.where(mask, field, 0.0)
    if field is None:  # drawn: negligible widths at masked pixels, which come out 0
        scale = jnp.where(mask, jnp.sqrt(variance), jnp.sqrt(jnp.finfo(variance.dtype).tiny))
    else:  # observed: harmless unit scales at masked pixels, masked out of the density
        scale = jnp.sqrt(jnp.where(mask, variance, 1.0))
    loc = jnp.where(mask, model_image, 0.0)
    fn = make(loc, scale).mask(mask).to_event(ndim)
    return numpyro.sample(name, fn, obs=obs)
