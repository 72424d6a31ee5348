"""Integrate flows with torchdiffeq.

:func:`simulate` returns a flow's states at given step times (:func:`neuralflow.compare.compare` sets them
beside the GD experiment).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchdiffeq import odeint
from tqdm.auto import tqdm

from .._validate import renamed
from ..errors import DivergenceError, InputError
from ..solvers import Solver
from .base import Flow

__all__ = ["simulate", "DEFAULT_SOLVER"]

#: The solver of a flow that states no preference: dopri5 with ``rtol=1e-7, atol=1e-9``.
DEFAULT_SOLVER = Solver()


class _NonFinite(Exception):
    def __init__(self, t: float) -> None:
        self.t = t


class _Guarded(torch.nn.Module):
    """The flow, plus a progress bar over step time and a check that every evaluation is finite."""

    def __init__(self, flow: Flow, bar: tqdm) -> None:
        super().__init__()
        self.flow, self.bar = flow, bar
        self.t_reached = -math.inf

    def forward(self, t: Tensor, theta: Tensor) -> Tensor:
        tf = float(t)
        if not torch.isfinite(theta).all():
            raise _NonFinite(tf)
        out = self.flow(t, theta)
        if not torch.isfinite(out).all():
            raise _NonFinite(tf)
        if tf > self.t_reached:
            self.bar.update(max(0.0, min(tf, self.bar.total) - self.bar.n))
            self.t_reached = tf
        return out


def simulate(
    flow: Flow,
    theta0: Tensor,
    t: Tensor,
    solver: str | Solver | None = None,
    step_size: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    progress: bool = False,
    extra0: Tensor | None = None,
    return_extra: bool = False,
    reset: bool = True,
    method: str | None = None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """Integrate ``dtheta/dt = flow(t, theta)`` from ``theta0`` at ``t[0]`` and return the states at ``t``.

    A flow that carries state beyond ``theta`` (``flow.extra_state``, e.g. the oscillation flow's covariance
    ``X``) is integrated from one output time to the next, with ``flow.rebase`` in between (output times one
    step apart keep its basis fresh).

    Parameters
    ----------
    flow : Flow
        The physics (or a corrected flow); its ``solver`` attribute, if set, is its preferred integrator.
    theta0 : Tensor
        The initial state, one parameter vector ``(d,)``, finite.
    t : Tensor
        Strictly increasing step times (iterate ``k`` at ``t = k``), at least two.
    solver : str or Solver, optional
        A torchdiffeq method name such as ``"euler"``, or a :class:`~neuralflow.solvers.Solver`; None: the
        flow's own choice (``flow.solver``: explicit Euler with 2 substeps per step for ``CentralFlow``), or
        else ``dopri5`` with ``rtol=1e-7, atol=1e-9``.
    step_size : float, optional
        Overrides the solver's fixed step, in steps.
    rtol : float, optional
        Overrides the solver's relative tolerance.
    atol : float, optional
        Overrides the solver's absolute tolerance.
    progress : bool, default False
        Show a tqdm bar over step time.
    extra0 : Tensor, optional
        The extra state at ``t[0]``; None: ``flow.initial_extra(theta0)``.
    return_extra : bool, default False
        Also return the extra states.
    reset : bool, default True
        Reset a stateful flow's warm starts first; False keeps them (to resume a saved simulation,
        :func:`neuralflow.checkpoint.load_simulation`).
    method : str, optional
        Deprecated old name of ``solver`` (``method`` is the fit's gradient method); a ``DeprecationWarning``.

    Returns
    -------
    Tensor or tuple of (Tensor, Tensor or None)
        The states ``(len(t), d)``; with ``return_extra=True``, ``(thetas, extras)``, the extras
        ``(len(t), *shape)`` (None for a flow without extra state).

    Raises
    ------
    InputError
        On a flow that is not a :class:`Flow`, a bad ``theta0``, times that do not increase, or a bad solver.
    DivergenceError
        On a non-finite state or velocity, or a step-size underflow; it names the time reached.

    Examples
    --------
    >>> import torch, neuralflow as nf
    >>> problem = nf.problems.quadratic([[1.0, 0.0], [0.0, 10.0]])
    >>> states = nf.simulate(nf.GradientFlow(problem, 0.1), problem.theta0, torch.arange(3.0))
    >>> states.shape
    torch.Size([3, 2])
    """
    if not isinstance(flow, Flow):
        raise InputError(f"simulate: flow must be a neuralflow Flow, got {type(flow).__name__}.")
    flow.problem.check_theta(theta0, "theta0")
    if theta0.dim() != 1:
        raise InputError("simulate: theta0 must be one parameter vector (d,).")
    if not torch.isfinite(theta0).all():
        raise InputError("simulate: theta0 contains NaN or inf values.")
    t = torch.as_tensor(t, dtype=theta0.dtype, device=theta0.device)
    if t.dim() != 1 or len(t) < 2 or not bool((t.diff() > 0).all()):
        raise InputError("simulate: t must be a 1-D tensor of at least 2 strictly increasing step times.")
    solver = renamed(solver, method, "method -> solver", "simulate")
    preferred = getattr(flow, "solver", None)
    base = solver if isinstance(solver, Solver) else DEFAULT_SOLVER if not preferred else Solver.from_options(preferred)
    solver = base.override(None if isinstance(solver, Solver) else solver, step_size, rtol, atol)
    if reset:
        flow.reset()
    if flow.extra_state is not None and extra0 is None:
        extra0 = flow.initial_extra(theta0)
    y0 = flow.join(theta0.detach(), extra0)
    span = float(t[-1] - t[0])
    with tqdm(total=span, desc=f"{flow.name} flow", unit="step", disable=not progress) as bar:
        func = _Guarded(flow, bar)
        try:
            with torch.no_grad():
                if flow.extra_state is None:
                    states = odeint(func, y0, t, **solver.odeint_options())
                else:
                    ys = [y0]
                    for i in range(len(t) - 1):
                        ys.append(flow.rebase(odeint(func, ys[-1], t[i : i + 2], **solver.odeint_options())[-1]))
                    states = torch.stack(ys)
        except _NonFinite as err:
            raise DivergenceError(
                f"{flow.name} flow blew up: non-finite state or velocity at t = {err.t:.6g} (step time; "
                f"integrating {float(t[0]):g}..{float(t[-1]):g}). Lower lr or integrate a shorter span."
            ) from None
        except AssertionError as err:  # torchdiffeq's "underflow in dt"
            raise DivergenceError(
                f"{flow.name} flow: the solver's step size underflowed at t = {func.t_reached:.6g} ({err}); the "
                "flow blows up or is too stiff there. Try solver='euler' with a small step_size."
            ) from None
    if not torch.isfinite(states).all():
        bad = int(torch.nonzero(~torch.isfinite(states).all(dim=1))[0])
        raise DivergenceError(f"{flow.name} flow produced non-finite states at t = {float(t[bad]):.6g}.")
    thetas, extras = flow.split(states)
    return (thetas, extras) if return_extra else thetas
